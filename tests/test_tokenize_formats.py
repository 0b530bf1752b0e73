"""Corpus tokenization inputs and outputs: WebDataset tar shards (MP3, FLAC, Opus, WAV + JSON/TXT), 🤗 Audio
Parquet, streaming datasets, kept metadata columns, ArrayRecord read back through the Grain source, transient
read errors, atomic shard claims.

Every clip is at most 1.2 s (1.3 s once an MP3 decoder's delay is added), so every run shares the 1.6 s
bucket and batch of 4 of ``tests/test_tokenize.py``: one encode compilation for both files.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from convert.speech import speech_clip
from convert.webdataset import audio_bytes, write_shard
from xcodec2_jax.cli import main
from xcodec2_jax.engine import EngineSettings
from xcodec2_jax.tokenize import (
    Clip,
    CodesDataSource,
    CorpusItem,
    TokenizeError,
    read_codes,
    read_errors,
    tokenize_corpus,
)
from xcodec2_jax.tokenize import pipeline as pipeline_module
from xcodec2_jax.tokenize.sources import CorpusError, list_corpus, partition
from xcodec2_jax.tokenize.store import OutputDir, Row, publish

SETTINGS = EngineSettings(batch_size=4, bucket_seconds=(1.6,))
OPTIONS = {"batch_size": 4, "buckets": (1.6,), "workers": 2, "progress": False}
# (key, audio extension, format, subtype, rate, stereo, seconds, json, txt)
SAMPLES = [
    ("spk0/utt0000", "flac", "FLAC", "PCM_16", 22050, False, 0.9, {"text": "Good morning.", "speaker": "spk0"}, None),
    ("spk0/utt0001", "mp3", "MP3", "MPEG_LAYER_III", 16000, False, 1.1,
     {"text": "The quick brown fox.", "speaker": "spk0", "dnsmos": 3.25}, None),
    ("spk1/utt0002", "mp3", "MP3", "MPEG_LAYER_III", 44100, True, 1.2, {"text": "Café au lait", "speaker": "spk1"},
     None),
    ("spk1/utt0003", "opus", "OGG", "OPUS", 48000, False, 0.8, None, "She sells sea shells."),
    ("spk2/utt0004", "wav", "WAV", "PCM_16", 16000, False, 1.0, {"speaker": "spk2"}, "A transcript in a .txt file."),
    ("spk2/utt0005", "flac", "FLAC", "PCM_24", 8000, True, 0.7, {"text": "json wins", "speaker": "spk2"}, "txt loses"),
]
BAD_SAMPLES = {"bad/no_audio": "expected one audio member", "bad/corrupt": "cannot read the audio"}


@pytest.fixture(scope="module")
def webdataset(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """One WebDataset shard: the ``SAMPLES`` (members of a sample adjacent, as WebDataset writes them), a
    sample without audio, one with corrupt MP3 bytes and a macOS ``._`` stub. Also returns each good sample's
    audio bytes."""
    audio, samples = {}, []
    for seed, (key, ext, fmt, subtype, rate, stereo, seconds, fields, text) in enumerate(SAMPLES):
        wave = speech_clip(seconds, sampling_rate=rate, seed=seed)
        audio[key] = audio_bytes(np.stack([wave, 0.5 * np.roll(wave, 41)], axis=1) if stereo else wave, rate, fmt,
                                 subtype)
        members = {ext: audio[key]}
        if fields is not None:
            members["json"] = json.dumps(fields).encode()
        if text is not None:
            members["txt"] = text.encode()
        samples.append((key, members))
    samples += [("bad/._no_audio", {"json": b"\x00\x05\x16\x07"}), ("bad/no_audio", {"json": b'{"text": "?"}'}),
                ("bad/corrupt", {"mp3": os.urandom(3000)})]
    return write_shard(tmp_path_factory.mktemp("webdataset") / "shard-000000.tar", samples), audio


def expected_codes(reference, data: bytes) -> np.ndarray:
    """What a sample's row must hold: its bytes decoded by soundfile, encoded as an in-memory clip."""
    wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return reference.model.encode_audio(wave.T, sampling_rate=rate, settings=SETTINGS)[0]


def rows_of(out: Path) -> dict[str, dict]:
    return {row["id"]: row for row in read_codes(out).to_pylist()}


@pytest.fixture(scope="module")
def tar_runs(webdataset, reference, tmp_path_factory) -> dict[str, Path]:
    """The shard tokenized to Parquet and to ArrayRecord, keeping text and speaker, 2 rows a shard."""
    outs = {}
    for output_format in ("parquet", "arrayrecord"):
        outs[output_format] = tmp_path_factory.mktemp(output_format)
        summary = tokenize_corpus(webdataset[0], outs[output_format], model=reference.model, shard_size=2,
                                  keep_columns=("text", "speaker"), output_format=output_format, **OPTIONS)
        assert (summary.encoded, summary.failed, summary.inputs) == (len(SAMPLES), 2, len(SAMPLES) + 2)
    return outs


# ------------------------------------------------------------------------------------------- inputs
def test_webdataset_tar_mp3_flac_opus_json_txt(tar_runs, webdataset, reference):
    """Ids are the sample keys; codes equal the decoded bytes encoded alone; JSON fields and .txt kept."""
    rows = rows_of(tar_runs["parquet"])
    assert sorted(rows) == sorted(key for key, *_ in SAMPLES)
    codes = []
    for key, _, _, _, rate, _, seconds, fields, text in SAMPLES:
        row = rows[key]
        np.testing.assert_array_equal(np.asarray(row["codes"], np.int32), expected_codes(reference, webdataset[1][key]),
                                      err_msg=key)
        codes.extend(row["codes"])
        assert row["orig_sampling_rate"] == rate and abs(row["duration_s"] - seconds) < 0.1, key  # MP3: + delay
        assert row["text"] == (fields or {}).get("text", text) and row["speaker"] == (fields or {}).get("speaker")
    assert rows["spk1/utt0002"]["text"] == "Café au lait" and rows["spk0/utt0000"]["speaker"] == "spk0"
    assert len(np.unique(codes)) > 0.25 * len(codes), "codes are not diverse: the test would prove little"
    errors = read_errors(tar_runs["parquet"])
    assert sorted(errors) == sorted(BAD_SAMPLES)
    for key, reason in BAD_SAMPLES.items():
        assert reason in errors[key] and f"{webdataset[0]}:{key}" in errors[key]


def test_tar_inputs_by_glob_and_refusals(webdataset, tmp_path):
    shard = webdataset[0]
    assert [i.id for i in list_corpus(str(shard.parent / "shard-*.tar"))] == \
        [*(key for key, *_ in SAMPLES), *BAD_SAMPLES]  # member order
    with pytest.raises(CorpusError, match="matches no file"):
        list_corpus(str(tmp_path / "missing-*.tar"))
    (tmp_path / "y.tar").write_bytes(b"\x1f\x8b\x08" + bytes(100))
    with pytest.raises(CorpusError, match="a gzip-compressed tar"):
        list_corpus(tmp_path / "y.tar")
    with pytest.raises(CorpusError, match="mixed inputs"):
        list_corpus([shard, tmp_path / "a.flac"])


def test_a_repeated_key_across_tar_shards_stops_the_job(reference, webdataset, tmp_path):
    """Read lazily, a repeated id is found as the job meets it: the job stops, keeping what it finished."""
    samples = [(f"spk/{i}", {"flac": webdataset[1]["spk0/utt0000"]}) for i in range(3)]
    shards = [write_shard(tmp_path / f"shard-{n}.tar", samples[n:]) for n in range(2)]  # spk/1, spk/2 twice
    with pytest.raises(CorpusError, match="id 'spk/1' appears twice in the corpus"):
        tokenize_corpus(shards, tmp_path / "out", model=reference.model, **OPTIONS)


def test_hf_audio_parquet_by_row_group(reference, webdataset, tmp_path):
    """🤗 Audio structs ({"bytes", "path"}); ids <file>/<row>; processes split by row group; text kept."""
    datasets = pytest.importorskip("datasets")
    keys = [key for key, *_ in SAMPLES][:5]
    table = datasets.Dataset.from_dict({
        "audio": [{"bytes": webdataset[1][k], "path": k.replace("/", "_")} for k in keys],
        "text": [f"transcript {i}" for i in range(5)],
        "speaker": [k.split("/")[0] for k in keys],
    }).cast_column("audio", datasets.Audio())
    path = tmp_path / "parquet" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    table.to_parquet(path, batch_size=2)  # row groups of 2 rows: [0, 1], [2, 3], [4]
    assert pq.ParquetFile(path).num_row_groups == 3

    items = list_corpus(path)
    assert [i.id for i in items] == [f"train-00000-of-00001/{r}" for r in range(5)]
    assert [i.owner_key for i in items] == [f"{path.name}#{g}" for g in (0, 0, 1, 1, 2)]
    shares = [{i.id for i in partition(items, p, 2)} for p in range(2)]
    assert shares[0] | shares[1] == {i.id for i in items} and not shares[0] & shares[1]

    out = tmp_path / "out"
    for index in range(2):  # two independent jobs, each reading only its own row groups
        tokenize_corpus(path, out, model=reference.model, keep_columns=["text"], process_index=index,
                        process_count=2, **OPTIONS)
    rows = rows_of(out)
    assert sorted(rows) == [i.id for i in items]
    for row_number, key in enumerate(keys):
        row = rows[f"train-00000-of-00001/{row_number}"]
        np.testing.assert_array_equal(np.asarray(row["codes"], np.int32), expected_codes(reference,
                                                                                         webdataset[1][key]))
        assert row["text"] == f"transcript {row_number}" and "speaker" not in row
    with pytest.raises(CorpusError, match=r"no column\(s\) \['language'\]"):
        tokenize_corpus(path, tmp_path / "out2", model=reference.model, keep_columns=["language"], **OPTIONS)


def test_streaming_iterable_dataset_from_the_command_line(reference, webdataset, tmp_path, monkeypatch, capsys):
    """``--streaming``: the folder read by 🤗 datasets as an IterableDataset; ids are stream positions."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    keys = [key for key, *_ in SAMPLES][2:]
    folder = tmp_path / "dataset"
    folder.mkdir()
    datasets.Dataset.from_dict({
        "audio": [{"bytes": webdataset[1][k], "path": None} for k in keys], "text": keys,
    }).cast_column("audio", datasets.Audio()).to_parquet(folder / "train.parquet")
    stream = datasets.load_dataset(str(folder), split="train", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)

    out = tmp_path / "out"
    code = main(["tokenize", str(folder), "--streaming", "--split", "train", "--keep-columns", "text", "-o", str(out),
                 "--model", str(reference.checkpoint), "--batch-size", "4", "--buckets", "1.6", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = rows_of(out)
    assert sorted(rows) == [str(i) for i in range(len(keys))]
    for position, key in enumerate(keys):
        np.testing.assert_array_equal(np.asarray(rows[str(position)]["codes"], np.int32),
                                      expected_codes(reference, webdataset[1][key]))
        assert rows[str(position)]["text"] == key
    summary = tokenize_corpus(stream, out, model=str(reference.checkpoint), keep_columns=["text"], **OPTIONS)
    assert (summary.resumed, summary.encoded) == (len(keys), 0)


# ------------------------------------------------------------------------------------------ outputs
def test_arrayrecord_through_the_grain_source_equals_the_parquet_rows(tar_runs):
    grain = pytest.importorskip("grain")
    parquet, arrayrecord = (CodesDataSource(tar_runs[f]) for f in ("parquet", "arrayrecord"))
    assert isinstance(arrayrecord, grain.sources.RandomAccessDataSource)
    assert len(parquet) == len(arrayrecord) == len(SAMPLES)
    assert sorted(p.name for p in tar_runs["arrayrecord"].glob("*-00000-*")) == [
        "codes-00000-00000.array_record", "codes-00000-00001.array_record", "codes-00000-00002.array_record",
        "index-00000-00000.parquet", "index-00000-00001.parquet", "index-00000-00002.parquet"]
    table = read_codes(tar_runs["parquet"]).to_pylist()
    assert read_codes(tar_runs["arrayrecord"]).to_pylist() == table
    for index, want in enumerate(table):
        for source in (parquet, arrayrecord):
            row = source[index]
            assert row["codes"].dtype == np.int32 and row["codes"].tolist() == want["codes"]
            assert {k: v for k, v in row.items() if k != "codes"} == {k: v for k, v in want.items() if k != "codes"}

    # README's recipe: rows -> LM token ids, speech codes shifted past a text vocabulary.
    offset = 32000
    dataset = grain.MapDataset.source(arrayrecord).map(lambda row: {"text": row["text"],
                                                                    "ids": row["codes"] + offset})
    for got, want in zip(dataset, table, strict=True):
        assert got["text"] == want["text"] and got["ids"].tolist() == [c + offset for c in want["codes"]]


def test_transient_read_errors_are_retried_then_logged(reference, tmp_path, monkeypatch, caplog):
    """OSError / MemoryError: retried with backoff; still failing after the retries: logged;
    ``retry_errors`` tries it again."""
    monkeypatch.setattr(pipeline_module, "RETRY_BACKOFF_SECONDS", 0.01)
    clips = {name: speech_clip(0.6 + 0.1 * i, seed=20 + i) for i, name in enumerate(("fine", "flaky", "mem", "nfs"))}
    calls = dict.fromkeys(clips, 0)
    failures = {"fine": (0, None), "flaky": (2, OSError(5, "Input/output error")),
                "mem": (1, MemoryError("decoder")), "nfs": (99, OSError(116, "Stale file handle"))}

    def loader(name):
        def load(rate: int) -> Clip:
            calls[name] += 1
            count, error = failures[name]
            if calls[name] <= count:
                raise error
            return Clip(clips[name], rate, {"n": calls[name]})
        return load

    items = [CorpusItem(name, loader(name)) for name in clips]
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger=pipeline_module.__name__):
        summary = tokenize_corpus(items, out, model=reference.model, retries=2, keep_columns=["n"], **OPTIONS)
    assert (summary.encoded, summary.failed) == (3, 1)
    assert calls == {"fine": 1, "flaky": 3, "mem": 2, "nfs": 3}
    assert "flaky: OSError: [Errno 5] Input/output error; retrying in" in caplog.text
    assert read_errors(out) == {"nfs": "nfs: OSError on each of 3 attempts: [Errno 116] Stale file handle"}
    rows = rows_of(out)
    want = reference.model.encode_audio([clips[n] for n in ("fine", "flaky", "mem")], settings=SETTINGS)
    for name, codes in zip(("fine", "flaky", "mem"), want, strict=True):
        np.testing.assert_array_equal(np.asarray(rows[name]["codes"], np.int32), codes)
        assert rows[name]["n"] == str(calls[name])  # kept metadata: non-strings as JSON text

    assert tokenize_corpus(items, out, model=reference.model, keep_columns=["n"], **OPTIONS).resumed == 4
    failures["nfs"] = (0, None)  # the file system is back
    summary = tokenize_corpus(items, out, model=reference.model, keep_columns=["n"], retry_errors=True, **OPTIONS)
    assert (summary.resumed, summary.encoded, summary.failed, summary.rows) == (3, 1, 0, 4)
    assert read_errors(out) == {} and (out / "errors.jsonl").read_text() == ""
    assert json.loads((out / "manifest.json").read_text())["counts"]["errors"] == 0


def test_shard_names_are_claimed_atomically(tmp_path, monkeypatch):
    """Publishing never overwrites: with hard links, and with the O_EXCL claim where there are none."""
    for links in (True, False):
        root = tmp_path / f"links-{links}"
        root.mkdir()
        if not links:
            monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "no hard links")))
        for text in ("first", "second"):
            (root / f"{text}.tmp").write_text(text)
        publish(root / "first.tmp", root / "final")
        with pytest.raises(FileExistsError):
            publish(root / "second.tmp", root / "final")
        assert (root / "final").read_text() == "first" and sorted(p.name for p in root.iterdir()) == ["final"]
        monkeypatch.undo()

    # Two jobs running as process 0 in one folder: the second to finish a shard stops.
    writers = [OutputDir(tmp_path / "out", 0).shard_writer(1, ()) for _ in range(2)]
    (tmp_path / "out").mkdir()
    writers[0].add(Row("a", np.arange(3, dtype=np.int32), 0.06, 16000))
    with pytest.raises(TokenizeError, match="another job is writing as process 0"):
        writers[1].add(Row("b", np.arange(3, dtype=np.int32), 0.06, 16000))
    assert read_codes(tmp_path / "out").column("id").to_pylist() == ["a"]


def test_keep_columns_clash_with_row_columns(reference, webdataset, tmp_path):
    with pytest.raises(TokenizeError, match=r"keep_columns \['codes'\]"):
        tokenize_corpus(webdataset[0], tmp_path, model=reference.model, keep_columns=["codes"], **OPTIONS)
