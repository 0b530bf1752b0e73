"""Corpus tokenization: audio files or datasets in, Parquet shards of X-Codec2 codes out; resumable, multi-host.

Output directory
----------------
``codes-PPPPP-SSSSS.parquet``
    Shard ``S`` of process ``P``: ``shard_size`` rows of ``id`` (string), ``codes`` (list<int32>),
    ``num_codes`` (int32), ``duration_s`` (float64, seconds of 16 kHz audio encoded) and
    ``orig_sampling_rate`` (int32).
``errors-PPPPP.jsonl``
    Process ``P``'s log of bad inputs, one ``{"id", "error"}`` object per line, append-only.
``errors.jsonl``
    All processes' bad inputs, sorted by id (rebuilt from the logs at the end of every run).
``manifest.json``
    What made the codes (a sha256 of the weight files, config, dtype, window settings: the *fingerprint*),
    model id and revision, versions, settings and counts.

Exactly once
------------
An input is *done* when its id is in a finished shard (any process's) or in an error log. A run lists the
whole corpus, sorts it by id, takes its share (the ids whose hash falls to its process index, see
:func:`xcodec2_jax.corpus.owner`) and skips what is done.

* A shard is written to a hidden temporary file, fsynced and renamed into place (``os.replace``): a finished
  shard is complete or absent. Rows waiting for the next shard are lost in a crash and simply encoded again
  (the codes are deterministic); shards are never rewritten or renumbered: process ``P`` continues after its
  highest shard number.
* An error is appended to the process's own log (one writer per file, fsynced) as soon as it is found, so
  error and shard writes never race. A line torn by a crash does not parse, so its input is not done and is
  retried; the torn tail is dropped when the process owning the log starts again.
* Since "done" is read from all processes' files, a resumed run may use another ``process_count`` (or an
  input list with new files) without duplicating or losing an input; and since an input's process depends
  on its id alone, jobs that list the corpus differently never encode an input twice.
* ``errors.jsonl`` and the manifest's counts are views, rebuilt atomically from the shards and logs.
* A run whose fingerprint differs from ``manifest.json`` refuses to mix codes (``overwrite`` deletes the old
  outputs first).

Multi-host
----------
Under ``jax.distributed`` every process tokenizes its share on its own devices and writes its own files (the
engine's steps need no communication, so processes never wait for each other). ``process_index``/
``process_count`` instead run independent jobs (no ``jax.distributed``) that split the corpus the same way.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jax.experimental import multihost_utils
from tqdm import tqdm

from . import __version__
from .audio import AudioError, save_audio
from .corpus import CorpusError, CorpusItem, list_corpus, partition
from .engine import EngineSettings, enable_compilation_cache
from .errors import Xcodec2Error
from .hub import DEFAULT_REPO_ID, find_weights, resolve_checkpoint_dir
from .model import Xcodec2Model

FORMAT = "xcodec2-jax codes v1"
DEFAULT_SHARD_SIZE = 1000
# Threads decoding and resampling ahead of the device. libsndfile (via cffi) and soxr release the GIL, so
# threads run in parallel without pickling waves or importing JAX in every worker (a spawned process pool took
# 3.6 s to start). One thread decoded mixed 8-48 kHz WAV/FLAC at ~800x real time on a 2-core CPU; raise
# --workers on hosts whose accelerators encode faster than the default keeps up with.
DEFAULT_WORKERS = 4
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("codes", pa.list_(pa.int32())),
    ("num_codes", pa.int32()),
    ("duration_s", pa.float64()),
    ("orig_sampling_rate", pa.int32()),
])
_SHARD_NAME = re.compile(r"codes-(\d{5})-(\d{5})\.parquet")


class TokenizeError(Xcodec2Error, ValueError):
    """The job cannot run as asked: an incompatible output directory, bad process settings, unsafe ids."""


# ------------------------------------------------------------------------------------------- summary
@dataclasses.dataclass(frozen=True)
class TokenizeSummary:
    """What one process did.

    Attributes:
        out_dir: the output directory.
        process_index, process_count: this process's slot.
        inputs: this process's share of the corpus.
        resumed: inputs of the share already done (a row or an error) before this run.
        encoded: rows written by this run.
        failed: bad inputs found by this run.
        rows: rows of this process's share in ``out_dir`` now (earlier runs included).
        audio_seconds: audio encoded by this run.
        seconds: wall time of the encoding loop (compilation included, model loading not).
        shards: the shards this run wrote.
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
    shards: tuple[Path, ...]

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio encoded per second of wall time by this run."""
        return self.audio_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def all_bad(self) -> bool:
        """Every input of the share is bad: nothing to train on (the command exits non-zero)."""
        return self.inputs > 0 and self.rows == 0

    def __str__(self) -> str:
        slot = f" (process {self.process_index} of {self.process_count})" if self.process_count > 1 else ""
        return (f"{self.out_dir}{slot}: {self.inputs} inputs, {self.resumed} already done, {self.encoded} encoded, "
                f"{self.failed} bad (see {ERRORS_NAME}); {self.audio_seconds / 3600:.3f} h of audio in "
                f"{self.seconds:.1f} s = {self.realtime_factor:.1f}x real time; {len(self.shards)} new shard(s)")


# ------------------------------------------------------------------------------------------ tokenize
def tokenize_corpus(inputs: Any, out_dir: str | Path, *, model: str | Path | Xcodec2Model = DEFAULT_REPO_ID,
                    revision: str | None = None, dtype: Any = None, batch_size: int = EngineSettings.batch_size,
                    buckets: Sequence[float] = EngineSettings.bucket_seconds, shard_size: int = DEFAULT_SHARD_SIZE,
                    workers: int = DEFAULT_WORKERS, process_index: int | None = None,
                    process_count: int | None = None, split: str | None = None, audio_column: str = "audio",
                    overwrite: bool = False, progress: bool = True) -> TokenizeSummary:
    """Encode a corpus into Parquet shards of codes in ``out_dir``; re-running resumes (see the module docs).

    Args:
        inputs: a directory of audio files (recursive), a ``.txt``/``.jsonl`` manifest, a list of paths, a
            ``datasets`` dataset, a ``save_to_disk`` directory or a Hub dataset name (see
            :func:`xcodec2_jax.corpus.list_corpus`).
        out_dir: created if needed; an existing one made with the same fingerprint is resumed.
        model: a Hub repo id, a local checkpoint directory, or a loaded :class:`Xcodec2Model`.
        revision: Hub branch, tag or commit.
        dtype: ``"float32"`` (default) or ``"bfloat16"``; for a loaded model, its own (or the same) dtype.
        batch_size: clips per device step per process.
        buckets: padded lengths in seconds; each compiles once. They do not change the codes.
        shard_size: rows per shard, also the unit of work a crash can lose.
        workers: threads decoding and resampling files (and computing features) ahead of the device.
        process_index, process_count: run as one of ``process_count`` independent jobs; under
            ``jax.distributed`` they default to (and must equal) JAX's.
        split, audio_column: the dataset split and audio column.
        overwrite: delete the outputs of an incompatible earlier run (another model, config, dtype or
            window) instead of refusing. A compatible ``out_dir`` is always resumed.
        progress: show a progress bar (files, hours of audio, speed as x real time, errors).

    Raises:
        TokenizeError, CorpusError, CheckpointNotFoundError: the job cannot start. Bad audio never raises:
            it goes to the error log.
    """
    index, count = _process_slot(process_index, process_count)
    if shard_size < 1 or workers < 1:
        raise TokenizeError(f"shard_size={shard_size} and workers={workers} must be >= 1")
    settings = EngineSettings(batch_size=batch_size, bucket_seconds=tuple(buckets), workers=workers)
    items = list_corpus(inputs, split=split, audio_column=audio_column)
    if not items:
        raise CorpusError(f"no inputs found in {inputs!r}")
    codec, model_info = _load_model(model, revision, dtype)
    manifest = _manifest(codec, model_info, settings, inputs, shard_size, count)
    out = _OutputDir(Path(out_dir), index)
    out.prepare(manifest, overwrite=overwrite, shared=count > 1)
    done_rows, done_errors = out.finished()
    share = partition(items, index, count)
    todo = [item for item in share if item.id not in done_rows and item.id not in done_errors]

    begin = time.perf_counter()
    encoded, failed, audio_seconds, shards = _encode(codec, settings, todo, out, shard_size, progress, (index, count))
    seconds = time.perf_counter() - begin
    if jax.process_count() > 1:  # the views below must see every process's last shard
        multihost_utils.sync_global_devices("xcodec2_jax.tokenize: done")
    if index == 0 or jax.process_count() == 1:
        out.write_views(manifest, len(items))
    rows = encoded + sum(item.id in done_rows for item in share)
    return TokenizeSummary(out.root, index, count, len(share), len(share) - len(todo), encoded, failed, rows,
                           audio_seconds, seconds, shards)


class _Key(NamedTuple):
    """What travels through the engine with a wave: its id, 16 kHz sample count and the file's own rate."""

    id: str
    samples: int
    orig_sampling_rate: int


def _encode(model: Xcodec2Model, settings: EngineSettings, todo: list[CorpusItem], out: _OutputDir,
            shard_size: int, progress: bool, slot: tuple[int, int]) -> tuple[int, int, float, tuple[Path, ...]]:
    """Load ``todo`` in background threads and encode it; -> (rows, bad inputs, audio seconds, new shards)."""
    rate = model.config.sampling_rate
    bar = _Progress(len(todo), progress, slot)
    with out.error_log() as log, out.shard_writer(shard_size) as writer:
        def bad(item_id: str, message: str) -> None:
            log.add(item_id, message)
            bar.error()

        loaded = _load_ahead(todo, rate, settings.workers, ahead=4 * settings.workers)
        for key, codes in model.engine(settings).encode_stream(_good_waves(loaded, bad)):
            writer.add(key.id, codes, key.samples / rate, key.orig_sampling_rate)
            bar.row(key.samples / rate)
    bar.close()
    return bar.rows, bar.errors, bar.audio_seconds, tuple(writer.written)


def _load(item: CorpusItem, sampling_rate: int) -> tuple[np.ndarray, int] | str:
    """An item's (wave, original rate), or why it cannot be used."""
    try:
        return item.load(sampling_rate)
    except AudioError as err:
        return str(err)
    except Exception as err:  # any other failure of one input (a decoder bug, odd metadata) must not stop the job
        return f"{item.id}: unexpected {type(err).__name__}: {err}"


def _load_ahead(items: list[CorpusItem], sampling_rate: int, workers: int, ahead: int
                ) -> Iterator[tuple[CorpusItem, tuple[np.ndarray, int] | str]]:
    """(item, :func:`_load` result) in input order, loaded by ``workers`` threads at most ``ahead`` items ahead.

    Threads rather than processes: libsndfile (through cffi) and soxr release the GIL while decoding and
    resampling, and threads avoid pickling waves and importing JAX again in every worker.
    """
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xcodec2-load") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.submit(_load, item, sampling_rate)))
            if len(pending) >= ahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _good_waves(loaded: Iterable[tuple[CorpusItem, tuple[np.ndarray, int] | str]],
                bad: Callable[[str, str], None]) -> Iterator[tuple[_Key, np.ndarray]]:
    """The engine's input, (key, float32 (samples,) 16 kHz wave); failures go to ``bad(id, message)``."""
    for item, result in loaded:
        if isinstance(result, str):
            bad(item.id, result)
            continue
        wave, orig_rate = result
        yield _Key(item.id, wave.size, orig_rate), wave


class _Progress:
    """A tqdm bar over files with hours of audio, speed (x real time) and errors; counts even when hidden."""

    def __init__(self, total: int, enabled: bool, slot: tuple[int, int]):
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
        self.bar.set_postfix_str(f"{self.audio_seconds / 3600:.2f} h, {speed:.1f}x real time, "
                                 f"{self.errors} errors", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------- model and manifest
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


def _dtype_name(dtype: Any) -> str:
    return np.dtype(jnp.dtype(dtype)).name


def _load_model(model: str | Path | Xcodec2Model, revision: str | None, dtype: Any
                ) -> tuple[Xcodec2Model, dict[str, Any]]:
    """The model and its identity ``{"id", "revision", "directory", "weights"}`` (see :func:`_files_sha256`)."""
    if isinstance(model, Xcodec2Model):
        if dtype is not None and _dtype_name(dtype) != _dtype_name(model.dtype):
            raise TokenizeError(f"dtype={_dtype_name(dtype)} differs from the given model's "
                                f"{_dtype_name(model.dtype)}")
        return model, {"id": None, "revision": None, "directory": None, "weights": _params_sha256(model)}
    directory = resolve_checkpoint_dir(model, revision)
    loaded = Xcodec2Model.from_pretrained(directory, dtype=jnp.dtype(dtype or "float32"))
    return loaded, {"id": str(model), "revision": revision, "directory": str(directory),
                    "weights": _files_sha256(find_weights(directory)[1])}


def _files_sha256(files: list[Path]) -> str:
    """``"files-sha256:<hex>"`` over the checkpoint's weight files (names and bytes).

    The files, not the loaded parameters, identify a checkpoint: a bfloat16 model keeps some parameters in
    bfloat16, yet its codes decode with the float32 model of the same files.
    """
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0".encode())
        with open(path, "rb") as file:
            while block := file.read(1 << 24):
                digest.update(block)
    return f"files-sha256:{digest.hexdigest()}"


def _params_sha256(model: Xcodec2Model) -> str:
    """``"params-sha256:<hex>"`` over every parameter (path, dtype, shape, bytes) of an in-memory model."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(model.state)[0]
    for name, leaf in sorted((jax.tree_util.keystr(path), leaf) for path, leaf in leaves):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.view(np.uint8))
    return f"params-sha256:{digest.hexdigest()}"


def _manifest(model: Xcodec2Model, model_info: dict[str, Any], settings: EngineSettings, inputs: Any,
              shard_size: int, process_count: int) -> dict[str, Any]:
    """manifest.json without counts. ``fingerprint`` holds everything the codes depend on."""
    fingerprint = {
        "weights": model_info["weights"],
        "config": model.config.to_dict(),
        "dtype": _dtype_name(model.dtype),
        "window_seconds": settings.window_seconds,
        "overlap_seconds": settings.overlap_seconds,
    }
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "model": {k: v for k, v in model_info.items() if k != "weights"},
        "versions": {"xcodec2_jax": __version__, "jax": jax.__version__, "flax": flax.__version__,
                     "numpy": np.__version__, "pyarrow": pa.__version__},
        "input": str(inputs) if isinstance(inputs, (str, Path)) else type(inputs).__name__,
        "settings": {"batch_size": settings.batch_size, "bucket_seconds": list(settings.bucket_seconds),
                     "shard_size": shard_size, "workers": settings.workers, "process_count": process_count},
        "counts": None,
    }
    return json.loads(json.dumps(manifest))  # JSON types (lists, not tuples) so that it compares with the file


# -------------------------------------------------------------------------------------- output dir
def _atomic_write(path: Path, write: Callable[[BinaryIO], None], owner: int) -> None:
    """Write ``path`` all or nothing: a hidden temp file named after its owner process, fsync, rename."""
    temp = path.with_name(f".{path.name}.{owner:05d}.tmp")
    with open(temp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(directory)
    finally:
        os.close(directory)


def _error_records(path: Path) -> tuple[list[dict[str, str]], bool]:
    """The complete records of an error log, and whether it holds anything else (a torn or bad line)."""
    *lines, tail = path.read_bytes().split(b"\n")  # a complete log ends with "\n": the tail is empty
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            records.append(record)
    return records, bool(tail) or len(records) != len(lines)


class _ErrorLog:
    """Appends ``{"id", "error"}`` lines to this process's log, each fsynced before the job moves on."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by __exit__)

    def add(self, item_id: str, error: str) -> None:
        self.file.write(json.dumps({"id": item_id, "error": error}, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def __enter__(self) -> _ErrorLog:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class _ShardWriter:
    """Buffers rows and writes them ``shard_size`` at a time as this process's next numbered shard."""

    def __init__(self, out: _OutputDir, shard_size: int, next_shard: int):
        self.out, self.shard_size, self.next_shard = out, shard_size, next_shard
        self.rows: list[tuple[str, np.ndarray, float, int]] = []
        self.written: list[Path] = []

    def add(self, item_id: str, codes: np.ndarray, duration_s: float, orig_sampling_rate: int) -> None:
        self.rows.append((item_id, codes, duration_s, orig_sampling_rate))
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        path = self.out.root / f"codes-{self.out.process_index:05d}-{self.next_shard:05d}.parquet"
        if path.exists():
            raise TokenizeError(f"{path} exists already: is another job running with process index "
                                f"{self.out.process_index}?")
        table = _rows_table(self.rows)
        _atomic_write(path, lambda file: pq.write_table(table, file), self.out.process_index)
        self.written.append(path)
        self.next_shard += 1
        self.rows = []

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()  # rows are complete results, so keeping them is right even when the loop failed


def _rows_table(rows: list[tuple[str, np.ndarray, float, int]]) -> pa.Table:
    ids, codes, durations, rates = zip(*rows, strict=True)
    lengths = np.array([c.size for c in codes], np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.concatenate(codes).astype(np.int32))
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.ListArray.from_arrays(offsets, values),
                                 pa.array(lengths), pa.array(durations, pa.float64()),
                                 pa.array(rates, pa.int32())], schema=SHARD_SCHEMA)


class _OutputDir:
    """OUT_DIR as one process sees it: every process's finished files, this process's writers."""

    def __init__(self, root: Path, process_index: int):
        self.root, self.process_index = root, process_index

    def shards(self) -> list[Path]:
        return sorted(p for p in self.root.glob("codes-*.parquet") if _SHARD_NAME.fullmatch(p.name))

    def error_logs(self) -> list[Path]:
        return sorted(self.root.glob("errors-*.jsonl"))

    def prepare(self, manifest: dict[str, Any], *, overwrite: bool, shared: bool) -> None:
        """Check (or write) the manifest, delete an incompatible run's outputs if asked, drop stale temp files."""
        self.root.mkdir(parents=True, exist_ok=True)
        problem = self._incompatibility(manifest)
        if problem and not overwrite:
            raise TokenizeError(f"{self.root} holds codes of another run ({problem}); use another output "
                                "directory, or --overwrite to delete them")
        if problem:
            if shared:  # other processes may be scanning or writing: no safe moment to delete under them
                raise TokenizeError(f"{self.root}: {problem}; with several processes, delete the old outputs "
                                    "before starting instead of using --overwrite")
            for path in [*self.shards(), *self.error_logs(), self.root / ERRORS_NAME]:
                path.unlink(missing_ok=True)
        for temp in self.root.glob(f".*.{self.process_index:05d}.tmp"):
            temp.unlink()  # this process's own, left by a crash (no one else writes these names)
        if problem or not (self.root / MANIFEST_NAME).exists():
            self._write_json(MANIFEST_NAME, manifest)
        self._repair_error_log()

    def _incompatibility(self, manifest: dict[str, Any]) -> str | None:
        """Why existing outputs cannot be resumed with ``manifest``'s fingerprint, or None."""
        path = self.root / MANIFEST_NAME
        if not path.exists():
            return f"shards but no {MANIFEST_NAME}" if self.shards() else None
        old = json.loads(path.read_text(encoding="utf-8")).get("fingerprint", {})
        new = manifest["fingerprint"]
        changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        return f"{MANIFEST_NAME} differs in {', '.join(changed)}" if changed else None

    def _repair_error_log(self) -> None:
        """Drop a line torn by a crash from this process's log (its input is then tried again)."""
        path = self._error_log_path()
        if path.exists():
            records, damaged = _error_records(path)
            if damaged:
                _atomic_write(path, lambda file: file.write(_jsonl(records)), self.process_index)

    def _error_log_path(self) -> Path:
        return self.root / f"errors-{self.process_index:05d}.jsonl"

    def finished(self) -> tuple[set[str], set[str]]:
        """Ids in finished shards, ids in error logs (all processes')."""
        rows: set[str] = set()
        for shard in self.shards():
            ids = pq.read_table(shard, columns=["id"]).column("id").to_pylist()
            repeated = rows.intersection(ids)
            if repeated or len(set(ids)) != len(ids):
                raise TokenizeError(f"{shard} repeats ids of other rows ({sorted(repeated)[:3]}...); the output "
                                    "directory was edited by hand")
            rows.update(ids)
        return rows, set(self.errors())

    def errors(self) -> dict[str, str]:
        """id -> error message, from every process's log."""
        return {r["id"]: r.get("error", "") for log in self.error_logs() for r in _error_records(log)[0]}

    def error_log(self) -> _ErrorLog:
        return _ErrorLog(self._error_log_path())

    def shard_writer(self, shard_size: int) -> _ShardWriter:
        mine = [int(_SHARD_NAME.fullmatch(p.name)[2]) for p in self.shards()
                if int(_SHARD_NAME.fullmatch(p.name)[1]) == self.process_index]
        return _ShardWriter(self, shard_size, max(mine, default=-1) + 1)

    def write_views(self, manifest: dict[str, Any], inputs: int) -> None:
        """Rebuild errors.jsonl (sorted by id) and the manifest's counts from the shards and logs."""
        errors = self.errors()
        records = [{"id": k, "error": errors[k]} for k in sorted(errors)]
        _atomic_write(self.root / ERRORS_NAME, lambda file: file.write(_jsonl(records)), self.process_index)
        shards = self.shards()
        durations = [pq.read_table(s, columns=["duration_s"]).column("duration_s").to_numpy() for s in shards]
        seconds = float(sum(d.sum() for d in durations))
        counts = {"inputs": inputs, "rows": sum(d.size for d in durations), "errors": len(errors),
                  "shards": len(shards), "audio_hours": seconds / 3600}
        self._write_json(MANIFEST_NAME, {**manifest, "counts": counts})

    def _write_json(self, name: str, value: dict[str, Any]) -> None:
        text = (json.dumps(value, indent=2) + "\n").encode()
        _atomic_write(self.root / name, lambda file: file.write(text), self.process_index)


def _jsonl(records: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


# ------------------------------------------------------------------------------------- reading back
def read_codes(out_dir: str | Path, ids: Sequence[str] | None = None) -> pa.Table:
    """All rows of ``out_dir``'s shards (or those of ``ids``, in that order) as one pyarrow Table."""
    table = pa.concat_tables(pq.read_table(s, schema=SHARD_SCHEMA) for s in _shards_of(out_dir))
    if ids is None:
        return table
    row_of = {item_id: row for row, item_id in enumerate(table.column("id").to_pylist())}
    _check_known(ids, row_of.keys(), out_dir)
    return table.take([row_of[i] for i in ids])


def _shards_of(out_dir: str | Path) -> list[Path]:
    shards = _OutputDir(Path(out_dir), 0).shards()
    if not shards:
        raise TokenizeError(f"{out_dir} holds no codes-*.parquet shards")
    return shards


def _check_known(ids: Iterable[str], known: Iterable[str], out_dir: str | Path) -> None:
    missing = sorted(set(ids).difference(known))
    if missing:
        raise TokenizeError(f"{len(missing)} id(s) not in {out_dir}: {missing[:5]}")


def read_errors(out_dir: str | Path) -> dict[str, str]:
    """id -> error of every bad input recorded in ``out_dir`` (from the per-process logs)."""
    return _OutputDir(Path(out_dir), 0).errors()


def wav_path(root: str | Path, item_id: str) -> Path:
    """Where detokenize writes ``item_id``: ``/`` in ids make subdirectories, ``.wav`` is appended unless there.

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
                      buckets: Sequence[float] = EngineSettings.bucket_seconds, progress: bool = True) -> list[Path]:
    """Decode the rows of ``out_dir`` (all, or those of ``ids``) to 16 kHz PCM-16 WAVs under ``wav_dir``.

    File names come from :func:`wav_path`. Shards are read one at a time, so memory does not grow with the
    corpus. Refuses a model whose weights or config differ from those that made the codes (``manifest.json``).
    Returns the paths written, in shard order.
    """
    shards = _shards_of(out_dir)
    every_id = [i for shard in shards for i in pq.read_table(shard, columns=["id"]).column("id").to_pylist()]
    wanted = set(every_id if ids is None else ids)
    _check_known(wanted, every_id, out_dir)
    paths = {item_id: wav_path(wav_dir, item_id) for item_id in wanted}
    clashes = sorted(str(p) for p, n in collections.Counter(paths.values()).items() if n > 1)
    if clashes:
        raise TokenizeError(f"ids that map to the same file name: {clashes[:5]}")
    codec, model_info = _load_model(model, revision, dtype)
    _check_decoder(codec, model_info, Path(out_dir) / MANIFEST_NAME)
    settings = EngineSettings(batch_size=batch_size, bucket_seconds=tuple(buckets))
    chunk = 16 * settings.batch_size  # bounds the audio held in memory
    written = []
    with tqdm(total=len(wanted), desc="detokenize", unit="file", disable=not progress) as bar:
        for shard in shards:
            table = pq.read_table(shard, columns=["id", "codes"]).to_pydict()
            rows = [(i, np.asarray(c, np.int32)) for i, c in zip(table["id"], table["codes"], strict=True)
                    if i in wanted]
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                waves = codec.decode_codes([codes for _, codes in part], settings=settings)
                for (item_id, _), wave in zip(part, waves, strict=True):
                    written.append(save_audio(paths[item_id], wave, codec.output_sampling_rate))
                    bar.update()
    return written


def _check_decoder(model: Xcodec2Model, model_info: dict[str, Any], manifest_path: Path) -> None:
    """Refuse to decode with weights or a config other than those recorded in the manifest."""
    if not manifest_path.exists():
        return
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    made_by = {k: manifest.get("fingerprint", {}).get(k) for k in ("weights", "config")}
    ours = json.loads(json.dumps({"weights": model_info["weights"], "config": model.config.to_dict()}))
    if made_by != ours:
        raise TokenizeError(f"the codes in {manifest_path.parent} were made by another model "
                            f"({manifest.get('model')}, see {manifest_path}); decode them with that one")


# ------------------------------------------------------------------------------------------------ CLI
TOKENIZE_EPILOG = """\
Writes OUT/codes-PPPPP-SSSSS.parquet (columns id, codes, num_codes, duration_s, orig_sampling_rate),
OUT/errors.jsonl (bad inputs and why) and OUT/manifest.json. Ids are paths relative to INPUT, manifest ids,
or dataset ids / row numbers. Running the same command again resumes, also after kill -9: every input ends
up in exactly one row or one error. Exit status 1 when every input is bad.

examples:
  xcodec2-jax tokenize data/wavs -o tokens/
  xcodec2-jax tokenize train.jsonl -o tokens/ --batch-size 32 --buckets 5 10 20 30
  xcodec2-jax tokenize ./saved_dataset --split train --audio-column audio -o tokens/
  xcodec2-jax tokenize data/wavs -o tokens/ --process-index 3 --process-count 8   # job 3 of 8
"""

DETOKENIZE_EPILOG = """\
Writes WAV_DIR/<id>.wav (16 kHz, 16-bit PCM): "/" in ids become subdirectories, ".wav" is appended unless
the id ends with it; ids with ".." are refused. The model must be the one that made the codes.

examples:
  xcodec2-jax detokenize tokens/ -o decoded/
  xcodec2-jax detokenize tokens/ -o decoded/ --ids spk1/utt01.flac spk2/utt07.wav
"""


def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    """``tokenize`` options; ``--model --revision --dtype --batch-size --no-progress`` come from the parent."""
    parser.epilog = TOKENIZE_EPILOG
    parser.add_argument("input", help="a directory of audio files (recursive), a .txt manifest (one path a line), "
                                      "a .jsonl manifest ({'path', 'id'}), or a Hugging Face dataset (a name or "
                                      "a save_to_disk directory; needs `datasets`)")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="output directory for the Parquet shards; an existing one is resumed")
    _add_buckets_argument(parser)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"threads decoding audio ahead of the device (default {DEFAULT_WORKERS})")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"rows per Parquet shard (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--process-index", type=int, help="this job's index of --process-count independent jobs")
    parser.add_argument("--process-count", type=int, help="split the corpus among this many independent jobs")
    parser.add_argument("--split", help="dataset split")
    parser.add_argument("--audio-column", default="audio", help="dataset audio column (default: audio)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the outputs of a run with another model/config/dtype instead of refusing")


def add_detokenize_arguments(parser: argparse.ArgumentParser) -> None:
    """``detokenize`` options; the model options come from the parent parser."""
    parser.epilog = DETOKENIZE_EPILOG
    parser.add_argument("codes_dir", help="a directory written by `tokenize`")
    parser.add_argument("-o", "--output", required=True, type=Path, help="directory for the 16 kHz WAV files")
    parser.add_argument("--ids", nargs="+", help="decode only these ids (default: all)")
    _add_buckets_argument(parser)


def _add_buckets_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--buckets", type=float, nargs="+", metavar="SECONDS",
                        help="padded lengths, each compiled once (default: "
                             f"{' '.join(f'{b:g}' for b in EngineSettings.bucket_seconds)})")


def _common_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "revision": args.revision, "dtype": args.dtype,
            "batch_size": args.batch_size or EngineSettings.batch_size,
            "buckets": args.buckets or EngineSettings.bucket_seconds, "progress": not args.no_progress}


def run_tokenize(args: argparse.Namespace) -> int:
    """``tokenize``: 0 when done, 1 when every input was bad. Errors that stop the job before it starts
    (``TokenizeError``, ``CorpusError``, a missing checkpoint) propagate to the command line's handler."""
    summary = tokenize_corpus(args.input, args.output, workers=args.workers, shard_size=args.shard_size,
                              process_index=args.process_index, process_count=args.process_count,
                              split=args.split, audio_column=args.audio_column, overwrite=args.overwrite,
                              **_common_options(args))
    print(summary)
    if summary.all_bad:
        print(f"error: all {summary.inputs} inputs are bad; reasons in {args.output / ERRORS_NAME}", file=sys.stderr)
        return 1
    return 0


def run_detokenize(args: argparse.Namespace) -> int:
    """``detokenize``: 0 when every WAV was written (errors propagate as for :func:`run_tokenize`)."""
    paths = detokenize_corpus(args.codes_dir, args.output, ids=args.ids, **_common_options(args))
    print(f"wrote {len(paths)} WAV file(s) under {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``python -m xcodec2_jax.tokenize {tokenize,detokenize}``: the same commands as ``xcodec2-jax``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_REPO_ID, help=f"Hub repo id or local checkpoint directory "
                                                                 f"(default {DEFAULT_REPO_ID})")
    common.add_argument("--revision", help="Hub branch, tag or commit")
    common.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    common.add_argument("--batch-size", type=int, default=EngineSettings.batch_size, help="clips per device step")
    common.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser = argparse.ArgumentParser(prog="python -m xcodec2_jax.tokenize", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, add_arguments, summary in (("tokenize", add_tokenize_arguments, "audio -> Parquet shards of codes"),
                                         ("detokenize", add_detokenize_arguments, "Parquet shards -> WAV files")):
        add_arguments(commands.add_parser(name, parents=[common], help=summary, description=summary,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tokenize``/``detokenize`` standalone: exit 0, or 1 after a one-line error (bad inputs, an
    incompatible output directory, a missing checkpoint), as ``xcodec2-jax`` does."""
    args = build_parser().parse_args(argv)
    if jax.config.jax_compilation_cache_dir is None:  # respect JAX_COMPILATION_CACHE_DIR when set
        enable_compilation_cache()
    try:
        return run_tokenize(args) if args.command == "tokenize" else run_detokenize(args)
    except (ValueError, OSError) as err:  # TokenizeError, CorpusError, CheckpointNotFoundError, I/O
        print(f"error: {err}", file=sys.stderr)
        return 1


__all__ = [
    "SHARD_SCHEMA",
    "TokenizeError",
    "TokenizeSummary",
    "add_detokenize_arguments",
    "add_tokenize_arguments",
    "detokenize_corpus",
    "main",
    "read_codes",
    "read_errors",
    "run_detokenize",
    "run_tokenize",
    "tokenize_corpus",
    "wav_path",
]


if __name__ == "__main__":
    sys.exit(main())
