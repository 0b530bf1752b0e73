"""Corpus tokenization: rows and errors, codes equal to ``encode_audio``, resume after SIGKILL, split jobs.

Every clip is under 1.6 s and every run uses one 1.6 s bucket with batch size 4, so all runs (in-process and
subprocesses, through the persistent compilation cache set up in conftest) share one encode compilation.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jaxlib
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import assert_nontrivial

from convert.speech import speech_clip
from xcodec2_jax.cli import main
from xcodec2_jax.engine import EngineSettings
from xcodec2_jax.tokenize import (
    TokenizeError,
    detokenize_corpus,
    load_model,
    read_codes,
    read_errors,
    row_schema,
    tokenize_corpus,
    wav_path,
)
from xcodec2_jax.tokenize.sources import CorpusError, list_corpus, partition

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS = EngineSettings(batch_size=4, bucket_seconds=(1.6,))
OPTIONS = {"batch_size": 4, "buckets": (1.6,), "workers": 2, "progress": False}
CLI_OPTIONS = ["--batch-size", "4", "--buckets", "1.6", "--workers", "2", "--no-progress"]
RATES = (8000, 22050, 44100, 48000)
BAD = {"bad/corrupt.wav": "corrupt", "bad/empty.flac": "empty", "bad/nan.wav": "NaN", "bad/short.wav": "too short"}
PCM16_TOL = 2 / 32768


# --------------------------------------------------------------------------------------------- corpus
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """22 speech files (8 / 22.05 / 44.1 / 48 kHz, mono and stereo, WAV and FLAC, 0.5-1.55 s) in speaker
    folders, the four bad files of ``BAD``, and a text file that is not an input."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(22):
        rate, stereo = RATES[i % 4], i % 3 == 0
        wave = speech_clip(0.5 + 0.05 * i, sampling_rate=rate, seed=i)
        if stereo:
            wave = np.stack([wave, 0.5 * np.roll(wave, 37)], axis=1)
        path = root / f"spk{i % 3}" / f"utt{i:02d}.{'flac' if i % 2 else 'wav'}"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, wave, rate)
    (root / "bad").mkdir()
    (root / "bad" / "corrupt.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEfmt " + os.urandom(200))
    (root / "bad" / "empty.flac").write_bytes(b"")
    nan = speech_clip(1.0, seed=99)
    nan[100] = np.nan
    sf.write(root / "bad" / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(root / "bad" / "short.wav", speech_clip(0.01, seed=1), 16000)  # 160 samples: less than a frame
    (root / "notes.txt").write_text("not audio")
    return root


def good_ids(corpus: Path) -> list[str]:
    return sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("utt*"))


def rows_of(out: Path) -> dict[str, list[int]]:
    """id -> codes of every row in ``out``; fails on a repeated id."""
    table = read_codes(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id appears in more than one row"
    return dict(zip(ids, table.column("codes").to_pylist(), strict=True))


def error_ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (out / "errors.jsonl").read_text().splitlines()]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "xcodec2_jax.cli", *map(str, args)]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture(scope="module")
def full_run(reference, corpus, tmp_path_factory):
    """One uninterrupted in-process run, shards of 5 rows: (summary, output directory)."""
    out = tmp_path_factory.mktemp("full")
    summary = tokenize_corpus(corpus, out, model=str(reference.checkpoint), shard_size=5, **OPTIONS)
    return summary, out


# ----------------------------------------------------------------------------------- one full run
def test_one_row_per_good_file_and_bad_files_in_errors(full_run, corpus, reference):
    summary, out = full_run
    ids = good_ids(corpus)
    assert len(ids) == 22
    rows = rows_of(out)
    assert sorted(rows) == ids
    errors = read_errors(out)
    assert sorted(errors) == sorted(BAD) == error_ids(out)
    for item_id, reason in BAD.items():
        assert reason in errors[item_id] and str(corpus / item_id) in errors[item_id]
    assert (summary.inputs, summary.encoded, summary.failed, summary.resumed, summary.rows) == (26, 22, 4, 0, 22)
    assert not summary.all_bad and summary.realtime_factor > 0

    shards = sorted(p.name for p in out.glob("codes-*.parquet"))
    assert shards == [f"codes-00000-{s:05d}.parquet" for s in range(5)] == [s.data.name for s in summary.shards]
    assert [pq.read_metadata(out / s).num_rows for s in shards] == [5, 5, 5, 5, 2]
    table = read_codes(out)
    assert table.schema.equals(row_schema())
    for row in table.to_pylist():
        info = sf.info(corpus / row["id"])
        assert row["orig_sampling_rate"] == info.samplerate
        assert row["num_codes"] == len(row["codes"])
        assert abs(row["duration_s"] - info.duration) < 1e-3  # resampling keeps the length to a sample
        assert row["num_codes"] == int(row["duration_s"] * 16000 + 1) // 320  # as encode_audio counts codes

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 26, "rows": 22, "errors": 4, "shards": 5,
                                  "audio_hours": pytest.approx(table.column("duration_s").to_numpy().sum() / 3600)}
    fingerprint = manifest["fingerprint"]
    assert fingerprint["weights"].startswith("files-sha256:")
    assert {k: fingerprint[k] for k in ("dtype", "precision", "backend", "device_kind")} == {
        "dtype": "float32", "precision": "HIGHEST", "backend": "cpu", "device_kind": "cpu"}
    assert (fingerprint["jax"], fingerprint["jaxlib"]) == (jax.__version__, jaxlib.__version__)
    assert manifest["output"] == {"format": "parquet", "columns": []}
    # Padding waste: 22 clips of 0.5-1.55 s in 1.6 s buckets of 4 (6 steps, 2 filler rows).
    run = manifest["last_run"]
    assert run["audio_seconds"] == pytest.approx(summary.audio_seconds)
    assert run["computed_seconds"] == pytest.approx(6 * 4 * 1.6) == pytest.approx(summary.computed_seconds)
    assert run["padding_ratio"] == pytest.approx(summary.padding_ratio) and run["padding_ratio"] > 1
    assert manifest["model"] == {"id": str(reference.checkpoint), "revision": None,
                                 "directory": str(reference.checkpoint)}
    assert manifest["settings"]["bucket_seconds"] == [1.6]


def test_codes_equal_encode_audio_with_other_neighbours(full_run, corpus, reference):
    """The files encoded by ``encode_audio`` in reverse order (other neighbours and batch rows): same codes."""
    rows = rows_of(full_run[1])
    ids = sorted(rows, reverse=True)
    want = reference.model.encode_audio([corpus / i for i in ids], settings=SETTINGS)
    for item_id, codes in zip(ids, want, strict=True):
        np.testing.assert_array_equal(np.asarray(rows[item_id], np.int32), codes, err_msg=item_id)
    codes = np.concatenate(want)
    # Short clips start and end in silence, which repeats codes: a quarter distinct is far from constant.
    assert len(np.unique(codes)) > 0.25 * codes.size, "codes are not diverse: the test would prove little"


# ------------------------------------------------------------------------------------------- resume
def finished_files(out: Path, output_format: str) -> dict[str, str]:
    """name -> sha256 of every file of a finished shard (ArrayRecord: the index and its records)."""
    index = "codes" if output_format == "parquet" else "index"
    names = [p.name for p in out.glob(f"{index}-*.parquet")]
    if output_format == "arrayrecord":
        names += [n.replace("index-", "codes-").replace(".parquet", ".array_record") for n in names]
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in names}


@pytest.mark.parametrize("output_format", ["parquet", "arrayrecord"])
def test_resume_after_sigkill_gives_the_uninterrupted_output(full_run, corpus, reference, tmp_path, output_format):
    """kill -9 once the first shard exists (rows of the next shard are in memory), then run again."""
    out = tmp_path / "out"
    command = cli("tokenize", corpus, "-o", out, "--model", reference.checkpoint, "--shard-size", 3,
                  "--format", output_format, *CLI_OPTIONS)
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(command, env=env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not finished_files(out, output_format) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        alive = proc.poll() is None
        proc.kill()
        proc.wait()
    assert alive, f"the run ended before it could be killed:\n{(tmp_path / 'log.txt').read_text()[-3000:]}"
    before = finished_files(out, output_format)
    assert 0 < len(read_codes(out)) < 22, "not killed mid-run"

    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already done" in result.stdout
    assert rows_of(out) == rows_of(full_run[1])
    assert error_ids(out) == sorted(BAD)
    after = finished_files(out, output_format)
    assert {k: after[k] for k in before} == before, "finished shards must never be rewritten"
    assert len(after) == (8 if output_format == "parquet" else 16)  # 22 rows in shards of 3
    assert not list(out.glob(".*tmp")) and not list(out.glob(".*claim"))


def test_resume_retries_an_error_torn_by_a_crash(full_run, reference, corpus, tmp_path):
    """A torn last line of the error log and a stale temp shard are repaired; nothing else is redone."""
    out = tmp_path / "out"
    shutil.copytree(full_run[1], out)
    log = out / "errors-00000.jsonl"
    log.write_bytes(log.read_bytes()[:-10])  # the last record lost its end in the crash
    (out / ".codes-00000-00005.parquet.00000.tmp").write_bytes(b"half a shard")
    summary = tokenize_corpus(corpus, out, model=str(reference.checkpoint), shard_size=5, **OPTIONS)
    assert (summary.resumed, summary.encoded, summary.failed, summary.rows) == (25, 0, 1, 22)
    assert sorted(read_errors(out)) == error_ids(out) == sorted(BAD)
    assert log.read_text().count("\n") == 4 and all(json.loads(line) for line in log.read_text().splitlines())
    assert not list(out.glob(".*tmp")) and len(list(out.glob("codes-*.parquet"))) == 5
    assert rows_of(out) == rows_of(full_run[1])


def test_refuses_another_fingerprint_unless_overwrite(reference, corpus, tmp_path):
    files = [corpus / "spk0" / "utt00.wav", corpus / "spk1" / "utt01.flac"]
    out = tmp_path / "out"
    first = rows_of(tokenize_corpus(files, out, model=reference.model, **OPTIONS).out_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fingerprint"]["dtype"] = "bfloat16"  # as if a bfloat16 run had made the codes
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenizeError, match=r"differs in fingerprint\.dtype"):
        tokenize_corpus(files, out, model=reference.model, **OPTIONS)
    manifest["fingerprint"].update(dtype="float32", device_kind="TPU v5 lite", jaxlib="0.4.30")  # other numerics
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenizeError, match=r"differs in fingerprint\.device_kind, fingerprint\.jaxlib"):
        tokenize_corpus(files, out, model=reference.model, **OPTIONS)
    with pytest.raises(TokenizeError, match="differs from the given model's float32"):
        tokenize_corpus(files, out, model=reference.model, dtype="bfloat16", **OPTIONS)

    summary = tokenize_corpus(files, out, model=reference.model, overwrite=True, **OPTIONS)
    assert (summary.resumed, summary.encoded) == (0, 2)
    assert [p.name for p in out.glob("codes-*.parquet")] == ["codes-00000-00000.parquet"]
    assert rows_of(out) == first and sorted(first) == sorted(map(str, files))
    assert json.loads((out / "manifest.json").read_text())["fingerprint"]["dtype"] == "float32"


# ---------------------------------------------------------------------------------------- many jobs
def test_two_independent_jobs_cover_every_input_once(full_run, corpus, reference, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(cli("tokenize", corpus, "-o", out, "--model", reference.checkpoint, "--shard-size", 4,
                                  "--process-index", index, "--process-count", 2, *CLI_OPTIONS),
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for index in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert rows_of(out) == rows_of(full_run[1])
    items = list_corpus(corpus)
    for index in range(2):
        share = {item.id for item in partition(items, index, 2)}
        for shard in out.glob(f"codes-{index:05d}-*.parquet"):
            assert set(pq.read_table(shard).column("id").to_pylist()) <= share
    assert sorted(read_errors(out)) == sorted(BAD)
    assert read_errors(out).keys() == set(error_ids(out))  # rebuilt by whichever job finished last


MULTIHOST = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
    port, rank, corpus, checkpoint, out = sys.argv[1:]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(rank))
    from xcodec2_jax.tokenize import tokenize_corpus
    summary = tokenize_corpus(corpus, out, model=checkpoint, batch_size=2, buckets=(1.6,), shard_size=4,
                              progress=False)
    print(summary)
    assert (summary.process_index, summary.process_count) == (int(rank), 2)
    """
)


@pytest.mark.slow
def test_jax_distributed_processes_split_the_corpus(full_run, corpus, reference, tmp_path):
    """Two processes under jax.distributed: lockstep with unequal shares, one output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST, str(port), str(rank), str(corpus),
                               str(reference.checkpoint), str(out)], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert rows_of(out) == rows_of(full_run[1])
    assert error_ids(out) == sorted(BAD)
    assert {p.name[:11] for p in out.glob("codes-*.parquet")} == {"codes-00000", "codes-00001"}


def test_process_slot_is_checked(corpus, reference, tmp_path):
    with pytest.raises(TokenizeError, match="give both"):
        tokenize_corpus(corpus, tmp_path, model=reference.model, process_index=0)
    with pytest.raises(TokenizeError, match=r"must be in \[0, process_count=2\)"):
        tokenize_corpus(corpus, tmp_path, model=reference.model, process_index=2, process_count=2)


# ------------------------------------------------------------------------------------- bad corpora
def test_all_bad_inputs_exit_non_zero(corpus, reference, tmp_path, capsys):
    shutil.copytree(corpus / "bad", tmp_path / "bad")
    out = tmp_path / "out"
    code = main(["tokenize", str(tmp_path / "bad"), "-o", str(out), "--model", str(reference.checkpoint),
                 "--no-progress"])
    assert code == 1
    assert "error: all 4 inputs are bad" in capsys.readouterr().err
    assert len(error_ids(out)) == 4 and not list(out.glob("codes-*"))


def test_no_inputs_is_an_error(reference, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["tokenize", str(tmp_path / "empty"), "-o", str(tmp_path / "out"),
                 "--model", str(reference.checkpoint)]) == 1
    assert "no inputs found" in capsys.readouterr().err
    with pytest.raises(CorpusError, match="no such file or directory"):
        list_corpus(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------ input kinds
def test_manifests_ids_and_partition(corpus, tmp_path):
    (tmp_path / "list.txt").write_text(f"# a comment\n\n{corpus}/spk0/utt00.wav\ncorpus_link/spk1/utt01.flac\n")
    (tmp_path / "corpus_link").symlink_to(corpus)
    items = list_corpus(tmp_path / "list.txt")  # relative paths are resolved against the manifest's folder
    assert [i.id for i in items] == sorted(["corpus_link/spk1/utt01.flac", f"{corpus}/spk0/utt00.wav"])
    wave, rate, metadata = items[-1].load(16000)  # utt01.flac
    assert rate == 22050 and wave.dtype == np.float32 and wave.ndim == 1 and metadata == {}

    (tmp_path / "list.jsonl").write_text(json.dumps({"path": f"{corpus}/spk0/utt00.wav", "id": "a"}) + "\n\n"
                                         + json.dumps({"path": "corpus_link/spk1/utt01.flac"}) + "\n")
    items = list_corpus(tmp_path / "list.jsonl")
    assert [i.id for i in items] == ["a", "corpus_link/spk1/utt01.flac"]
    assert items[0].load(16000).metadata == {"path": f"{corpus}/spk0/utt00.wav", "id": "a"}  # for keep_columns
    (tmp_path / "dup.txt").write_text("x.wav\nx.wav\n")
    with pytest.raises(CorpusError, match="repeated id"):
        list_corpus(tmp_path / "dup.txt")
    (tmp_path / "bad.jsonl").write_text('{"id": "no path"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:1: expected an object with a string 'path'"):
        list_corpus(tmp_path / "bad.jsonl")

    items = list_corpus(corpus)
    ids = [i.id for i in items]
    assert ids == sorted([*good_ids(corpus), *BAD])  # notes.txt is no audio file
    shares = [[i.id for i in partition(items, index, 3)] for index in range(3)]
    assert sorted(i for share in shares for i in share) == ids and all(shares)
    # An id's process depends on the id alone: listing one more file moves no other input.
    more = sorted([*items, *list_corpus([corpus / "notes.txt"])], key=lambda item: item.id)
    assert [[i.id for i in partition(more, index, 3) if i.id in ids] for index in range(3)] == shares


def test_dataset_on_disk(reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    clips = [(speech_clip(0.9, sampling_rate=22050, seed=3), 22050),
             (np.stack([speech_clip(1.4, sampling_rate=44100, seed=4)] * 2, axis=1), 44100)]
    encoded = []
    for wave, rate in clips:
        buffer = io.BytesIO()
        sf.write(buffer, wave, rate, format="FLAC")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    encoded.append({"bytes": b"not audio at all", "path": None})
    # What the rows must equal: the FLAC bytes decoded, (channels, samples), encoded as an in-memory clip.
    decoded = [sf.read(io.BytesIO(e["bytes"]), dtype="float32", always_2d=True) for e in encoded[:2]]
    want = [reference.model.encode_audio(wave.T, sampling_rate=rate, settings=SETTINGS)[0] for wave, rate in decoded]
    table = datasets.Dataset.from_dict({"audio": encoded, "id": ["spk/a", "spk/b", "spk/c"], "text": ["x"] * 3})
    table.cast_column("audio", datasets.Audio()).save_to_disk(tmp_path / "ds")

    summary = tokenize_corpus(str(tmp_path / "ds"), tmp_path / "out", model=reference.model, **OPTIONS)
    assert (summary.encoded, summary.failed) == (2, 1)
    rows = rows_of(tmp_path / "out")
    for item_id, codes in zip(["spk/a", "spk/b"], want, strict=True):
        np.testing.assert_array_equal(np.asarray(rows[item_id], np.int32), codes)
    assert "dataset row 2 (id 'spk/c')" in read_errors(tmp_path / "out")["spk/c"]
    with pytest.raises(CorpusError, match="no split 'test'"):
        list_corpus(datasets.DatasetDict({"train": table}), split="test")
    with pytest.raises(CorpusError, match=r"no column\(s\) \['speech'\]"):
        list_corpus(table, audio_column="speech")


def test_dataset_needs_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(CorpusError, match=r"needs the `datasets` package: pip install 'xcodec2-jax\[datasets\]'"):
        list_corpus("someone/speech-corpus")


# --------------------------------------------------------------------------------------- detokenize
def test_detokenize_writes_the_decoded_audio(full_run, reference, tmp_path):
    out, wavs = full_run[1], tmp_path / "wavs"
    ids = ["spk1/utt01.flac", "spk0/utt00.wav"]
    code = main(["detokenize", str(out), "-o", str(wavs), "--ids", *ids, "--model", str(reference.checkpoint),
                 "--batch-size", "2", "--buckets", "1.6", "--no-progress"])
    assert code == 0
    assert sorted(p.relative_to(wavs).as_posix() for p in wavs.rglob("*.wav")) == \
        ["spk0/utt00.wav", "spk1/utt01.flac.wav"]
    codes = [np.asarray(c, np.int32) for c in read_codes(out, ids).column("codes").to_pylist()]
    want = reference.model.decode_codes(codes, settings=EngineSettings(batch_size=2, bucket_seconds=(1.6,)))
    for item_id, item_codes, expected in zip(ids, codes, want, strict=True):
        got, rate = sf.read(wav_path(wavs, item_id), dtype="float32")
        assert rate == 16000 and got.shape == (item_codes.size * 320,)
        assert np.abs(got - np.clip(expected, -1, 1)).max() < PCM16_TOL
        assert_nontrivial(item_codes, got)


def test_detokenize_refuses_another_model_and_unknown_ids(full_run, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(full_run[1], out)
    with pytest.raises(TokenizeError, match=r"1 id\(s\) not in"):
        read_codes(out, ["spk0/utt00.wav", "nope"])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fingerprint"]["weights"] = "files-sha256:" + "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenizeError, match="made by another model"):
        detokenize_corpus(out, tmp_path / "wavs", model=str(reference.checkpoint), progress=False)


def test_checkpoint_identity_does_not_depend_on_dtype(reference):
    """Codes made in float32 decode in bfloat16 (and back): the weight files identify the model."""
    loaded = [load_model(str(reference.checkpoint), None, dtype) for dtype in ("float32", "bfloat16")]
    assert loaded[0].weights == loaded[1].weights and loaded[0].weights.startswith("files-sha256:")
    assert loaded[0].source == loaded[1].source


@pytest.mark.parametrize("item_id, expected", [("a.wav", "a.wav"), ("spk/b.flac", "spk/b.flac.wav"),
                                               ("/data/c.WAV", "data/c.WAV"), ("17", "17.wav")])
def test_wav_path_mirrors_ids(tmp_path, item_id, expected):
    assert wav_path(tmp_path, item_id) == tmp_path / expected


@pytest.mark.parametrize("item_id", ["../x", "a/../../b", "a//b", "./a", "a\\b", ""])
def test_wav_path_refuses_unsafe_ids(tmp_path, item_id):
    with pytest.raises(TokenizeError, match="cannot be made a file name"):
        wav_path(tmp_path, item_id)
