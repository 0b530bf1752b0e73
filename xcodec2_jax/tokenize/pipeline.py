"""Corpus tokenization: a corpus in, shards of X-Codec2 code rows out; resumable, exactly once, multi-host.

One process reads its share of the corpus (:mod:`.sources`), decodes and resamples it in background threads
(retrying transient read errors), encodes it through the engine, and writes rows and errors to the output
folder (:mod:`.store`, which describes the layout and the exactly-once rules).

Shares
------
Every process lists the whole corpus and takes the items whose key hashes to its index
(:func:`~.sources.owner`; the key is the id, or the Parquet row group), skipping what is done. Under
``jax.distributed`` the slot is JAX's and each process encodes its share on its own devices, exchanging
values only to check their numerics at the start and to total the run at the end; ``process_index`` /
``process_count`` instead run independent jobs that split the corpus the same way. Since "done" is read from
every process's files and ownership depends on the key alone, a resumed run may use another process count.

Failures
--------
Bad audio never stops a job: it goes to the error log. A transient error (``OSError`` while reading,
``MemoryError``) is retried ``retries`` times with exponential backoff first; ``retry_errors`` tries logged
inputs again. Anything else stops the job; under ``jax.distributed`` it is published first
(:func:`xcodec2_jax.multihost.fail_together`), and every process, which looks for published failures every
``PEER_CHECK_SECONDS`` while it encodes and in every exchange, stops with an error naming the process that
failed, instead of working on or waiting for it forever.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax
import jax
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from .. import __version__, multihost
from ..audio import AudioError, save_audio
from ..engine import Engine, EngineSettings
from ..hub import DEFAULT_REPO_ID
from ..model import Xcodec2Model
from .checkpoint import LoadedModel, check_same_model, fingerprint, load_model
from .sources import Corpus, CorpusError, CorpusItem, open_corpus, owner
from .store import (
    ERRORS_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    OutputDir,
    Row,
    Shard,
    TokenizeError,
    check_columns,
    check_known,
    metadata_value,
    row_schema,
    shard_table,
)

DEFAULT_SHARD_SIZE = 1000
# Threads decoding and resampling ahead of the device. libsndfile (via cffi) and soxr release the GIL, so
# threads run in parallel without pickling waves or importing JAX in every worker (a spawned process pool took
# 3.6 s to start). One thread decoded mixed 8-48 kHz WAV/FLAC at ~800x real time on a 2-core CPU; raise
# --workers on hosts whose accelerators encode faster than the default keeps up with.
DEFAULT_WORKERS = 4
# Transient read errors (a network file system's hiccup, a full page cache) are retried this many times,
# waiting RETRY_BACKOFF_SECONDS, then twice as long at each attempt (1 + 2 + 4 s by default).
DEFAULT_RETRIES = 3
RETRY_BACKOFF_SECONDS = 1.0
# Under jax.distributed, how often a process encoding its share looks for a failure published by a peer.
PEER_CHECK_SECONDS = 5.0
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- summary
@dataclasses.dataclass(frozen=True)
class TokenizeSummary:
    """What one process did.

    Attributes:
        out_dir: the output folder.
        process_index, process_count: this process's slot.
        inputs: this process's share of the corpus.
        resumed: inputs of the share already done (a row, or an error unless retried) before this run.
        encoded: rows written by this run.
        failed: bad inputs found by this run.
        rows: rows of this process's share in ``out_dir`` now (earlier runs included).
        audio_seconds: audio encoded by this run.
        seconds: wall time of the encoding loop (compilation included, model loading not).
        shards: the shards this run wrote.
        computed_seconds: audio the device steps computed for this run (padding and filler items
            included), when the engine counts it; ``computed_seconds / audio_seconds`` is the padding waste.
    """

    out_dir: Path
    process_index: int
    process_count: int
    inputs: int
    resumed: int
    encoded: int
    failed: int
    rows: int
    audio_seconds: float
    seconds: float
    shards: tuple[Shard, ...]
    computed_seconds: float | None = None

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio encoded per second of wall time by this run."""
        return self.audio_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def padding_ratio(self) -> float | None:
        """Computed / audio seconds (1.0: no padding), when the engine counts it."""
        if self.computed_seconds is None or self.audio_seconds <= 0:
            return None
        return self.computed_seconds / self.audio_seconds

    @property
    def all_bad(self) -> bool:
        """Every input of the share is bad: nothing to train on (the command exits non-zero)."""
        return self.inputs > 0 and self.rows == 0

    def __str__(self) -> str:
        slot = f" (process {self.process_index} of {self.process_count})" if self.process_count > 1 else ""
        padding = f", {self.padding_ratio:.2f}x computed for padding" if self.padding_ratio else ""
        return (f"{self.out_dir}{slot}: {self.inputs} inputs, {self.resumed} already done, {self.encoded} encoded, "
                f"{self.failed} bad (see {ERRORS_NAME}); {self.audio_seconds / 3600:.3f} h of audio in "
                f"{self.seconds:.1f} s = {self.realtime_factor:.2f}x real time{padding}; "
                f"{len(self.shards)} new shard(s)")


# ------------------------------------------------------------------------------------------ tokenize
def tokenize_corpus(inputs: Any, out_dir: str | Path, *, model: str | Path | Xcodec2Model = DEFAULT_REPO_ID,
                    revision: str | None = None, dtype: Any = None, batch_size: int = EngineSettings.batch_size,
                    full_batch_seconds: float | None = EngineSettings.full_batch_seconds,
                    buckets: Sequence[float] = EngineSettings.bucket_seconds, shard_size: int = DEFAULT_SHARD_SIZE,
                    workers: int = DEFAULT_WORKERS, process_index: int | None = None,
                    process_count: int | None = None, split: str | None = None, audio_column: str = "audio",
                    streaming: bool = False, keep_columns: Sequence[str] = (), output_format: str = "parquet",
                    retries: int = DEFAULT_RETRIES, retry_errors: bool = False, overwrite: bool = False,
                    progress: bool = True) -> TokenizeSummary:
    """Encode a corpus into shards of code rows in ``out_dir``; re-running resumes (see :mod:`.store`).

    Args:
        inputs: anything :func:`~xcodec2_jax.tokenize.sources.open_corpus` opens: a folder of audio files, a
            ``.txt``/``.jsonl`` manifest, WebDataset ``.tar`` shards or ``.parquet`` files (paths or globs), a
            list of audio paths or of ``CorpusItem``, a ``datasets`` object, folder or Hub name.
        out_dir: created if needed; an existing one made with the same fingerprint and layout is resumed.
        model: a Hub repo id, a local checkpoint folder, or a loaded :class:`Xcodec2Model`.
        revision: Hub branch, tag or commit.
        dtype: ``"float32"`` (default) or ``"bfloat16"``; for a loaded model, its own (or the same) dtype.
        batch_size: clips per device step per process (at buckets up to ``full_batch_seconds``).
        full_batch_seconds: longer buckets take fewer clips (see :class:`~xcodec2_jax.engine.EngineSettings`).
        buckets: padded lengths in seconds; each compiles once. They do not change the codes.
        shard_size: rows per shard, also the unit of work a crash can lose.
        workers: threads decoding and resampling files (and computing features) ahead of the device.
        process_index, process_count: run as one of ``process_count`` independent jobs; under
            ``jax.distributed`` they default to (and must equal) JAX's.
        split, audio_column, streaming: the dataset split, the audio column (datasets, Parquet), and whether a
            dataset name or folder is read as a stream (``IterableDataset``).
        keep_columns: metadata fields copied into each row as string columns of the same names (a tar
            sample's JSON fields and ``text``, a manifest's fields, a dataset's or Parquet file's columns).
        output_format: ``"parquet"`` or ``"arrayrecord"`` (needs ``array_record``).
        retries: attempts after the first for an input whose reading raised ``OSError`` or ``MemoryError``.
        retry_errors: try the inputs in the error logs again.
        overwrite: delete the outputs of an incompatible earlier run (other weights, config, numerics, format
            or columns) instead of refusing. A compatible ``out_dir`` is always resumed.
        progress: show a progress bar (files, hours of audio, speed as x real time, errors).

    Raises:
        TokenizeError, CorpusError, CheckpointNotFoundError: the job cannot run. Bad audio never raises: it
            goes to the error log. Under ``jax.distributed``, :class:`~xcodec2_jax.multihost.PeerError` when
            another process failed.
    """
    with multihost.fail_together():  # from the first line: a process that cannot even start must tell the others
        index, count = _process_slot(process_index, process_count)
        if shard_size < 1 or workers < 1 or retries < 0:
            raise TokenizeError(f"shard_size={shard_size} and workers={workers} must be >= 1, retries={retries} "
                                ">= 0")
        keep_columns = tuple(keep_columns)
        check_columns(keep_columns)
        settings = EngineSettings(batch_size=batch_size, full_batch_seconds=full_batch_seconds,
                                  bucket_seconds=tuple(buckets), workers=workers)
        corpus = open_corpus(inputs, split=split, audio_column=audio_column, streaming=streaming,
                             columns=keep_columns)
        if corpus.size == 0:
            raise CorpusError(f"no inputs found in {corpus.description}")
        loaded = load_model(model, revision, dtype)
        manifest = _manifest(loaded, settings, corpus, shard_size, count, output_format, keep_columns)
        _agree_on_manifest(manifest)
        out = OutputDir(Path(out_dir), index, output_format)
        out.prepare(manifest, overwrite=overwrite, shared=count > 1)
        done_rows, done_errors = out.finished()
        share = _Share(index, count, done_rows, done_rows if retry_errors else done_rows | done_errors)

        engine = loaded.model.engine(settings)
        computed_before = _computed_seconds(engine)
        begin = time.perf_counter()
        bar, shards = _encode(engine, corpus, share, out, keep_columns, shard_size, retries, progress, (index, count))
        seconds = time.perf_counter() - begin
        computed = _computed_seconds(engine) - computed_before
        if share.listed == 0:
            raise CorpusError(f"no inputs found in {corpus.description}")
        # All processes' numbers, once every shard is written (the exchange is also the barrier before the views).
        totals = multihost.allgather(np.array([bar.audio_seconds, computed,
                                               seconds], np.float64))
        if index == 0 or jax.process_count() == 1:
            out.write_views(manifest, _last_run(totals, share.listed))
    return TokenizeSummary(out.root, index, count, share.inputs, share.resumed, bar.rows, bar.errors,
                           share.rows_before + bar.rows,
                           bar.audio_seconds, seconds, shards, computed)


class _Share:
    """``wanted(item)`` for :meth:`Corpus.items`: this process's items that are not done, with counts.

    A lazily read corpus is checked here for repeated ids (among this process's items).
    """

    def __init__(self, index: int, count: int, rows: set[str], done: set[str]):
        self.index, self.count, self.rows, self.done = index, count, rows, done
        self.listed = self.inputs = self.resumed = self.rows_before = 0
        self.seen: set[str] = set()

    def __call__(self, item: CorpusItem) -> bool:
        self.listed += 1
        if owner(item.owner_key, self.count) != self.index:
            return False
        self.inputs += 1
        if item.id in self.seen:
            raise CorpusError(f"id {item.id!r} appears twice in the corpus; ids must be unique")
        self.seen.add(item.id)
        self.rows_before += item.id in self.rows
        if item.id in self.done:
            self.resumed += 1
            return False
        return True


class _Key(NamedTuple):
    """What travels through the engine with a wave: id, 16 kHz sample count, the source's rate, kept metadata."""

    id: str
    samples: int
    orig_sampling_rate: int
    metadata: tuple[str | None, ...]


def _encode(engine: Engine, corpus: Corpus, share: _Share, out: OutputDir, columns: tuple[str, ...],
            shard_size: int, retries: int, progress: bool, slot: tuple[int, int]) -> tuple[_Progress, tuple]:
    """Load this process's items in background threads and encode them; -> (counts, new shards)."""
    rate = engine.config.sampling_rate
    items: Iterable[CorpusItem] = corpus.items(share)
    if corpus.size is not None:  # listed up front: the bar knows the total
        items = list(items)
    bar = _Progress(len(items) if isinstance(items, list) else None, progress, slot)
    with out.error_log() as log, out.shard_writer(shard_size, columns) as writer:
        def bad(item_id: str, message: str) -> None:
            log.add(item_id, message)
            bar.error()

        workers = engine.settings.workers
        loaded = _load_ahead(items, rate, columns, retries, workers, ahead=4 * workers)
        checked = time.monotonic()
        for key, codes in engine.encode_stream(_good_waves(loaded, bad)):
            writer.add(Row(key.id, codes, key.samples / rate, key.orig_sampling_rate, key.metadata))
            bar.row(key.samples / rate)
            if time.monotonic() - checked > PEER_CHECK_SECONDS:  # a failed peer stops this process too
                multihost.raise_if_failed()
                checked = time.monotonic()
    bar.close()
    return bar, tuple(writer.written)


_Loaded = tuple[np.ndarray, int, tuple[str | None, ...]] | str


def _load(item: CorpusItem, sampling_rate: int, columns: tuple[str, ...], retries: int) -> _Loaded:
    """An item's (wave, original rate, kept metadata), or why it cannot be used.

    ``OSError`` and ``MemoryError`` may pass (a busy network file system, memory freed by other work):
    they are retried with exponential backoff before the item counts as bad.
    """
    for attempt in itertools.count():
        try:
            clip = item.load(sampling_rate)
            return clip.wave, clip.orig_sampling_rate, tuple(metadata_value(clip.metadata.get(c)) for c in columns)
        except AudioError as err:
            return str(err)
        except (OSError, MemoryError) as err:
            if attempt >= retries:
                return f"{item.id}: {type(err).__name__} on each of {attempt + 1} attempts: {err}"
            wait = RETRY_BACKOFF_SECONDS * 2**attempt
            _log.warning("%s: %s: %s; retrying in %.1f s", item.id, type(err).__name__, err, wait)
            time.sleep(wait)
        except Exception as err:  # any other failure of one input (a decoder bug, odd metadata) must not stop the job
            return f"{item.id}: unexpected {type(err).__name__}: {err}"
    raise AssertionError("unreachable")


def _load_ahead(items: Iterable[CorpusItem], sampling_rate: int, columns: tuple[str, ...], retries: int,
                workers: int, ahead: int) -> Iterator[tuple[CorpusItem, _Loaded]]:
    """(item, :func:`_load` result) in input order, loaded by ``workers`` threads at most ``ahead`` items ahead.

    Threads rather than processes: libsndfile (through cffi) and soxr release the GIL while decoding and
    resampling, and threads avoid pickling waves and importing JAX again in every worker.
    """
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xcodec2-load") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.submit(_load, item, sampling_rate, columns, retries)))
            if len(pending) >= ahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _good_waves(loaded: Iterable[tuple[CorpusItem, _Loaded]],
                bad: Callable[[str, str], None]) -> Iterator[tuple[_Key, np.ndarray]]:
    """The engine's input, (key, float32 (samples,) 16 kHz wave); failures go to ``bad(id, message)``."""
    for item, result in loaded:
        if isinstance(result, str):
            bad(item.id, result)
            continue
        wave, orig_rate, metadata = result
        yield _Key(item.id, wave.size, orig_rate, metadata), wave


def _computed_seconds(engine: Engine) -> float:
    """Audio seconds the engine's encode steps have computed so far (padding and filler rows included)."""
    return engine.stats.encode.computed_seconds


class _Progress:
    """A tqdm bar over files with hours of audio, speed (x real time) and errors; counts even when hidden."""

    def __init__(self, total: int | None, enabled: bool, slot: tuple[int, int]):
        desc = "tokenize" if slot[1] == 1 else f"tokenize {slot[0]}/{slot[1]}"
        self.bar = tqdm(total=total, desc=desc, unit="file", disable=not enabled, dynamic_ncols=True)
        self.rows = self.errors = 0
        self.audio_seconds = 0.0
        self.begin = time.perf_counter()

    def row(self, seconds: float) -> None:
        self.rows += 1
        self.audio_seconds += seconds
        self._update()

    def error(self) -> None:
        self.errors += 1
        self._update()

    def _update(self) -> None:
        speed = self.audio_seconds / max(time.perf_counter() - self.begin, 1e-9)
        self.bar.set_postfix_str(f"{self.audio_seconds / 3600:.2f} h, {speed:.2f}x real time, "
                                 f"{self.errors} errors", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------- manifest
def _process_slot(index: int | None, count: int | None) -> tuple[int, int]:
    """(process index, process count): JAX's under ``jax.distributed``, else the given ones, else (0, 1)."""
    if jax.process_count() > 1:
        slot = (jax.process_index(), jax.process_count())
        if (index, count) not in ((None, None), slot):
            raise TokenizeError(f"process_index={index}, process_count={count} contradict jax.distributed's "
                                f"{slot}; leave them out under jax.distributed")
        return slot
    if (index is None) != (count is None):
        raise TokenizeError("give both process_index and process_count, or neither")
    if index is None or count is None:
        return 0, 1
    if not 0 <= index < count:
        raise TokenizeError(f"process_index={index} must be in [0, process_count={count})")
    return index, count


def _manifest(loaded: LoadedModel, settings: EngineSettings, corpus: Corpus, shard_size: int, process_count: int,
              output_format: str, columns: tuple[str, ...]) -> dict[str, Any]:
    """manifest.json without counts: ``fingerprint`` and ``output`` must match for a run to resume."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": fingerprint(loaded, settings),
        "output": {"format": output_format, "columns": list(columns)},
        "model": loaded.source,
        "versions": {"xcodec2_jax": __version__, "flax": flax.__version__, "numpy": np.__version__,
                     "pyarrow": pa.__version__},
        "input": corpus.description,
        "settings": {"batch_size": settings.batch_size, "full_batch_seconds": settings.full_batch_seconds,
                     "bucket_seconds": list(settings.bucket_seconds),
                     "shard_size": shard_size, "workers": settings.workers, "process_count": process_count},
    }
    return json.loads(json.dumps(manifest))


def _agree_on_manifest(manifest: dict[str, Any]) -> None:
    """Under ``jax.distributed``, refuse to start unless every process computes with the same numerics."""
    if jax.process_count() == 1:
        return
    text = json.dumps({k: manifest[k] for k in ("fingerprint", "output")}, sort_keys=True)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
    everyone = multihost.allgather(digest).ravel()
    differ = [p for p, d in enumerate(everyone) if d != everyone[0]]
    if differ:
        raise TokenizeError(f"processes {differ} would make codes with other weights, config or numerics than "
                            f"process 0 (backend, device kind, precision, dtype, JAX versions, format or columns); "
                            "every process must match")


def _last_run(totals: np.ndarray, listed: int) -> dict[str, Any]:
    """The manifest's ``last_run`` (all processes of the run) and input count, from the per-process numbers."""
    audio, computed, seconds = totals.T
    padding = None if np.isnan(computed).any() else float(computed.sum())
    return {
        "counts": {"inputs": listed},
        "last_run": {
            "processes": len(totals),
            "seconds": float(seconds.max()),
            "audio_seconds": float(audio.sum()),
            "computed_seconds": padding,
            "padding_ratio": None if padding is None or audio.sum() <= 0 else padding / float(audio.sum()),
        },
    }


# ------------------------------------------------------------------------------------------ detokenize
def wav_path(root: str | Path, item_id: str) -> Path:
    """Where detokenize writes ``item_id``: ``/`` in ids make subfolders, ``.wav`` is appended unless there.

    Leading ``/`` are dropped (absolute manifest paths are mirrored under ``root``); empty, ``.`` and ``..``
    parts and backslashes are refused, so no id can write outside ``root``.
    """
    parts = item_id.lstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in item_id or "\0" in item_id:
        raise TokenizeError(f"id {item_id!r} cannot be made a file name safely ('..', '.', empty parts or '\\')")
    if not parts[-1].lower().endswith(".wav"):
        parts[-1] += ".wav"
    return Path(root).joinpath(*parts)


def detokenize_corpus(out_dir: str | Path, wav_dir: str | Path, *,
                      model: str | Path | Xcodec2Model = DEFAULT_REPO_ID, revision: str | None = None,
                      dtype: Any = None, ids: Sequence[str] | None = None,
                      batch_size: int = EngineSettings.batch_size,
                      full_batch_seconds: float | None = EngineSettings.full_batch_seconds,
                      buckets: Sequence[float] = EngineSettings.bucket_seconds, progress: bool = True) -> list[Path]:
    """Decode the rows of ``out_dir`` (all, or those of ``ids``) to 16 kHz PCM-16 WAVs under ``wav_dir``.

    File names come from :func:`wav_path`. Shards are read one at a time, so memory does not grow with the
    corpus. Refuses a model whose weights or config differ from those that made the codes (``manifest.json``).
    Returns the paths written, in shard order.
    """
    out = OutputDir.existing(out_dir)
    shards = out.shards()
    if not shards:
        raise TokenizeError(f"{out_dir} holds no finished shards")
    every_id = [i for shard in shards for i in shard.ids()]
    wanted = set(every_id if ids is None else ids)
    check_known(wanted, every_id, out_dir)
    paths = {item_id: wav_path(wav_dir, item_id) for item_id in wanted}
    clashes = sorted(str(p) for p, n in collections.Counter(paths.values()).items() if n > 1)
    if clashes:
        raise TokenizeError(f"ids that map to the same file name: {clashes[:5]}")
    loaded = load_model(model, revision, dtype)
    manifest_path = Path(out_dir) / MANIFEST_NAME
    made_by = json.loads(manifest_path.read_text("utf-8")).get("fingerprint") if manifest_path.exists() else None
    check_same_model(loaded, made_by, manifest_path)
    codec = loaded.model
    settings = EngineSettings(batch_size=batch_size, full_batch_seconds=full_batch_seconds,
                              bucket_seconds=tuple(buckets))
    chunk = 16 * settings.batch_size  # bounds the audio held in memory
    schema = row_schema(out.columns())
    written = []
    with tqdm(total=len(wanted), desc="detokenize", unit="file", disable=not progress) as bar:
        for shard in shards:
            table = shard_table(shard, out.format, schema).select(["id", "codes"]).to_pydict()
            rows = [(i, np.asarray(c, np.int32)) for i, c in zip(table["id"], table["codes"], strict=True)
                    if i in wanted]
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                waves = codec.decode_codes([codes for _, codes in part], settings=settings)
                for (item_id, _), wave in zip(part, waves, strict=True):
                    written.append(save_audio(paths[item_id], wave, codec.output_sampling_rate))
                    bar.update()
    return written


__all__ = ["DEFAULT_RETRIES", "DEFAULT_SHARD_SIZE", "DEFAULT_WORKERS", "TokenizeSummary", "detokenize_corpus",
           "tokenize_corpus", "wav_path"]
