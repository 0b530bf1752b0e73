"""The output folder of a tokenization job: shards of rows, error logs and a manifest, each written atomically.

Layout
------
``codes-PPPPP-SSSSS.parquet`` (``--format parquet``, the default)
    Shard ``S`` of process ``P``: up to ``shard_size`` rows (:func:`row_schema`).
``codes-PPPPP-SSSSS.array_record`` + ``index-PPPPP-SSSSS.parquet`` (``--format arrayrecord``)
    One record per row (:func:`encode_record`), and the same rows without their codes, in record order. The
    index is written last: a shard is finished once its index exists.
``errors-PPPPP.jsonl``
    Process ``P``'s log of bad inputs, ``{"id", "error", "time"}`` a line, append-only (one writer).
``errors.jsonl``, the ``counts`` of ``manifest.json``
    Views rebuilt from the shards and logs: every id without a row, with its latest error, sorted by id.
``manifest.json``
    What made the codes (``fingerprint``: weights, config, numerics), the output layout (``output``: format
    and kept columns), model, versions, settings, counts and the last run's padding.

Exactly once
------------
An input is *done* when its id is in a finished shard (any process's) or, unless errors are retried, in an
error log. Shards are written to a hidden temporary file, fsynced, and published under their final name with
``os.link``, which fails if the name exists (an ``O_EXCL`` claim file where the file system has no hard
links): a finished shard is complete or absent, never overwritten, and a second job running with the same
process index stops instead of overwriting the first one's shard. Rows waiting for the next shard are lost
in a crash and encoded again (the codes are deterministic). Error lines are appended and fsynced one by one; a
line torn by a crash does not parse, so its input is tried again, and the owner drops it on its next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import Xcodec2Error

MANIFEST_FORMAT = "xcodec2-jax codes v2"
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
FORMATS = ("parquet", "arrayrecord")
BASE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("codes", pa.list_(pa.int32())),
    ("num_codes", pa.int32()),
    ("duration_s", pa.float64()),
    ("orig_sampling_rate", pa.int32()),
])
_SHARD_NUMBERS = re.compile(r"(?:codes|index)-(\d{5})-(\d{5})\.(?:parquet|array_record)")
# Errors of operating systems whose file systems have no hard links (then a claim file guards the name).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


class TokenizeError(Xcodec2Error, ValueError):
    """The job cannot run as asked: an incompatible output folder, bad settings, a name claimed by another job."""


def row_schema(columns: Sequence[str] = ()) -> pa.Schema:
    """The rows' schema: ``BASE_SCHEMA`` then one string column per kept metadata field."""
    return pa.schema([*BASE_SCHEMA, *(pa.field(c, pa.string()) for c in columns)])


def check_columns(columns: Sequence[str]) -> None:
    """Kept metadata columns must be new, distinct names."""
    clashes = sorted({c for c in columns if c in BASE_SCHEMA.names} | {c for c in columns if columns.count(c) > 1})
    if clashes:
        raise TokenizeError(f"keep_columns {clashes} repeat a name or clash with the columns {BASE_SCHEMA.names}")


def metadata_value(value: Any) -> str | None:
    """A metadata field as stored: strings as they are, other JSON values as JSON text, None (null) when absent."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Row:
    """One output row: ``codes`` int32 (num_codes,), the 16 kHz ``duration_s`` encoded, kept ``metadata``."""

    id: str
    codes: np.ndarray
    duration_s: float
    orig_sampling_rate: int
    metadata: tuple[str | None, ...] = ()


def rows_table(rows: Sequence[Row], columns: Sequence[str], with_codes: bool = True) -> pa.Table:
    """Rows as a table of :func:`row_schema` (without the ``codes`` column when not ``with_codes``)."""
    lengths = np.array([r.codes.size for r in rows], np.int32)
    arrays = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "codes": pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                                          pa.array(np.concatenate([r.codes for r in rows]).astype(np.int32))),
        "num_codes": pa.array(lengths),
        "duration_s": pa.array([r.duration_s for r in rows], pa.float64()),
        "orig_sampling_rate": pa.array([r.orig_sampling_rate for r in rows], pa.int32()),
        **{c: pa.array([r.metadata[i] for r in rows], pa.string()) for i, c in enumerate(columns)},
    }
    schema = row_schema(columns)
    if not with_codes:
        schema = schema.remove(schema.get_field_index("codes"))
    return pa.Table.from_arrays([arrays[name] for name in schema.names], schema=schema)


# -------------------------------------------------------------------------------------- ArrayRecord rows
def encode_record(row: Mapping[str, Any]) -> bytes:
    """An ArrayRecord record: uint32 LE header length, the UTF-8 JSON of every field but ``codes``, then the
    codes as int32 LE."""
    header = json.dumps({k: v for k, v in row.items() if k != "codes"}, ensure_ascii=False).encode()
    return struct.pack("<I", len(header)) + header + np.asarray(row["codes"], "<i4").tobytes()


def decode_record(record: bytes) -> dict[str, Any]:
    """:func:`encode_record`'s inverse: the row as a dict, ``codes`` an int32 (num_codes,) array."""
    (size,) = struct.unpack_from("<I", record)
    row = json.loads(record[4 : 4 + size])
    return {"id": row.pop("id"), "codes": np.frombuffer(record, "<i4", offset=4 + size).astype(np.int32), **row}


def _import_array_record():
    try:
        from array_record.python import array_record_module
    except ImportError as err:
        raise TokenizeError("the ArrayRecord format needs the `array_record` package: "
                            "pip install 'xcodec2-jax[grain]'") from err
    return array_record_module


# --------------------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:  # make a rename or link itself durable
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_temp(path: Path, write: Callable[[Path], None], owner: int) -> Path:
    """``write(temp)`` a hidden temp file next to ``path``, named after its owner process, and fsync it."""
    temp = path.with_name(f".{path.name}.{owner:05d}.tmp")
    write(temp)
    descriptor = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return temp


def atomic_write(path: Path, write: Callable[[Path], None], owner: int) -> None:
    """Write or replace ``path`` all or nothing (temp file, fsync, rename)."""
    os.replace(_write_temp(path, write, owner), path)
    _fsync_dir(path.parent)


def publish(temp: Path, final: Path) -> None:
    """Give a finished temp file its final name, which must be free: raises ``FileExistsError`` otherwise.

    ``os.link`` claims the name atomically and shows the file complete; on a file system without hard links
    an ``O_EXCL`` claim file serialises the check-then-rename instead.
    """
    try:
        os.link(temp, final)
    except FileExistsError:
        temp.unlink()
        raise
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
        _publish_with_claim(temp, final)
    else:
        temp.unlink()
    _fsync_dir(final.parent)


def _publish_with_claim(temp: Path, final: Path) -> None:
    claim = final.with_name(f".{final.name}.claim")
    try:
        descriptor = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        temp.unlink()
        raise
    os.close(descriptor)
    try:
        if final.exists():
            temp.unlink()
            raise FileExistsError(errno.EEXIST, "exists already", str(final))
        os.replace(temp, final)
    finally:
        claim.unlink()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def _jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


# ------------------------------------------------------------------------------------------ error logs
def error_records(path: Path) -> tuple[list[dict[str, Any]], bool]:
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


class ErrorLog:
    """Appends ``{"id", "error", "time"}`` lines to one process's log, each fsynced before the job moves on."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by __exit__)

    def add(self, item_id: str, error: str) -> None:
        record = {"id": item_id, "error": error, "time": round(time.time(), 3)}
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def __enter__(self) -> ErrorLog:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------- shards
@dataclasses.dataclass(frozen=True)
class Shard:
    """A finished shard: ``index`` holds its rows without codes (the shard itself for Parquet), ``data`` the
    rows with codes (the ``.array_record`` for ArrayRecord)."""

    process: int
    number: int
    index: Path
    data: Path

    def ids(self) -> list[str]:
        return pq.read_table(self.index, columns=["id"]).column("id").to_pylist()

    def num_rows(self) -> int:
        return pq.read_metadata(self.index).num_rows


def shard_paths(root: Path, output_format: str, process: int, number: int) -> Shard:
    name = f"{process:05d}-{number:05d}"
    if output_format == "parquet":
        path = root / f"codes-{name}.parquet"
        return Shard(process, number, path, path)
    return Shard(process, number, root / f"index-{name}.parquet", root / f"codes-{name}.array_record")


def finished_shards(root: Path, output_format: str) -> list[Shard]:
    """Every process's finished shards, sorted by (process, number)."""
    pattern = "codes-*.parquet" if output_format == "parquet" else "index-*.parquet"
    numbers = sorted(tuple(map(int, match.groups())) for p in root.glob(pattern)
                     if (match := _SHARD_NUMBERS.fullmatch(p.name)))
    return [shard_paths(root, output_format, *n) for n in numbers]


class ShardWriter:
    """Buffers rows and writes them ``shard_size`` at a time as this process's next numbered shard."""

    def __init__(self, root: Path, output_format: str, process: int, next_number: int, shard_size: int,
                 columns: Sequence[str]):
        self.root, self.format, self.process, self.next_number = root, output_format, process, next_number
        self.shard_size, self.columns = shard_size, tuple(columns)
        self.rows: list[Row] = []
        self.written: list[Shard] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        shard = shard_paths(self.root, self.format, self.process, self.next_number)
        try:
            if self.format == "arrayrecord":
                self._publish(shard.data, self._write_records)
            self._publish(shard.index, lambda path: pq.write_table(
                rows_table(self.rows, self.columns, with_codes=self.format == "parquet"), path))
        except FileExistsError as err:
            raise TokenizeError(f"{err.filename} exists already: another job is writing as process "
                                f"{self.process} to {self.root}; stop one of them") from err
        self.written.append(shard)
        self.next_number += 1
        self.rows = []

    def _publish(self, path: Path, write: Callable[[Path], None]) -> None:
        publish(_write_temp(path, write, self.process), path)

    def _write_records(self, path: Path) -> None:
        """ArrayRecord rows (group_size 1: each record is read on its own, as random access wants)."""
        writer = _import_array_record().ArrayRecordWriter(str(path), "group_size:1")
        for row in rows_table(self.rows, self.columns).to_pylist():
            writer.write(encode_record(row))
        writer.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()  # rows are complete results, so keeping them is right even when the loop failed


# ------------------------------------------------------------------------------------------ the folder
class OutputDir:
    """The output folder as one process sees it: every process's finished files, this process's writers."""

    def __init__(self, root: Path, process_index: int, output_format: str = "parquet"):
        if output_format not in FORMATS:
            raise TokenizeError(f"format {output_format!r} is not one of {FORMATS}")
        self.root, self.process_index, self.format = root, process_index, output_format

    @classmethod
    def existing(cls, root: str | Path) -> OutputDir:
        """A finished job's folder, its format read from the manifest (else from the files there)."""
        root = Path(root)
        manifest = root / MANIFEST_NAME
        if manifest.is_file():
            return cls(root, 0, _read_json(manifest).get("output", {}).get("format", "parquet"))
        return cls(root, 0, "arrayrecord" if list(root.glob("index-*.parquet")) else "parquet")

    def shards(self) -> list[Shard]:
        return finished_shards(self.root, self.format)

    def columns(self) -> list[str]:
        """The kept metadata columns of the rows here."""
        shards = self.shards()
        names = pq.read_schema(shards[0].index).names if shards else BASE_SCHEMA.names
        return [n for n in names if n not in BASE_SCHEMA.names]

    def error_logs(self) -> list[Path]:
        return sorted(self.root.glob("errors-*.jsonl"))

    def prepare(self, manifest: dict[str, Any], *, overwrite: bool, shared: bool) -> None:
        """Claim or check the manifest, delete an incompatible run's outputs if asked, clean up after a crash."""
        self.root.mkdir(parents=True, exist_ok=True)
        problem = self._incompatibility(manifest)
        if problem and not overwrite:
            raise TokenizeError(f"{self.root} holds codes of another run ({problem}); use another output "
                                "folder, or --overwrite to delete them")
        if problem:
            if shared:  # other processes may be scanning or writing: no safe moment to delete under them
                raise TokenizeError(f"{self.root}: {problem}; with several processes, delete the old outputs "
                                    "before starting instead of using --overwrite")
            for path in [*self.root.glob("codes-*"), *self.root.glob("index-*"), *self.error_logs(),
                         self.root / ERRORS_NAME, self.root / MANIFEST_NAME]:
                path.unlink(missing_ok=True)
        self._clean_up_after_crash()
        if not (self.root / MANIFEST_NAME).exists():
            with contextlib.suppress(FileExistsError):  # another job claimed it first: check theirs
                publish(_write_temp(self.root / MANIFEST_NAME, lambda path: path.write_bytes(_json_bytes(manifest)),
                                    self.process_index), self.root / MANIFEST_NAME)
            problem = self._incompatibility(manifest)
            if problem:
                raise TokenizeError(f"{self.root}: a job started at the same time with other settings ({problem})")

    def _incompatibility(self, manifest: dict[str, Any]) -> str | None:
        """Why existing outputs cannot be resumed with ``manifest``'s fingerprint and layout, or None."""
        path = self.root / MANIFEST_NAME
        if not path.exists():
            leftovers = [*self.root.glob("codes-*"), *self.root.glob("index-*")]
            return f"shards but no {MANIFEST_NAME}" if leftovers else None
        old = _read_json(path)
        changed = [f"{section}.{key}" for section in ("fingerprint", "output")
                   for key in sorted(old.get(section, {}).keys() | manifest[section].keys())
                   if old.get(section, {}).get(key) != manifest[section].get(key)]
        return f"{MANIFEST_NAME} differs in {', '.join(changed)}" if changed else None

    def _clean_up_after_crash(self) -> None:
        """This process's temp and claim files, its ArrayRecord data without an index, a torn error line."""
        mine = f"{self.process_index:05d}"
        for temp in self.root.glob(f".*.{mine}.tmp"):
            temp.unlink()  # this process's own, left by a crash (no one else writes these names)
        for claim in self.root.glob(f".*-{mine}-*.claim"):
            claim.unlink()
        if self.format == "arrayrecord":
            indexed = {s.data for s in self.shards()}
            for data in self.root.glob(f"codes-{mine}-*.array_record"):
                if data not in indexed:
                    data.unlink()  # published, but the crash came before its index: not finished
        log = self.error_log_path()
        if log.exists():
            records, damaged = error_records(log)
            if damaged:
                atomic_write(log, lambda path: path.write_bytes(_jsonl(records)), self.process_index)

    def error_log_path(self) -> Path:
        return self.root / f"errors-{self.process_index:05d}.jsonl"

    def finished(self) -> tuple[set[str], set[str]]:
        """Ids in finished shards, ids in error logs (every process's)."""
        rows: set[str] = set()
        for shard in self.shards():
            ids = shard.ids()
            repeated = rows.intersection(ids)
            if repeated or len(set(ids)) != len(ids):
                raise TokenizeError(f"{shard.index} repeats ids of other rows ({sorted(repeated)[:3]}...); the "
                                    "output folder was edited by hand")
            rows.update(ids)
        return rows, {r["id"] for log in self.error_logs() for r in error_records(log)[0]}

    def errors(self, rows: set[str] | None = None) -> dict[str, str]:
        """id -> latest error of every logged input that has no row (a retried input may have one now)."""
        rows = self.finished()[0] if rows is None else rows
        latest: dict[str, tuple[float, str]] = {}
        for log in self.error_logs():
            for record in error_records(log)[0]:
                when = float(record.get("time", 0.0))
                if record["id"] not in rows and when >= latest.get(record["id"], (-1.0, ""))[0]:
                    latest[record["id"]] = (when, record.get("error", ""))
        return {item_id: message for item_id, (_, message) in sorted(latest.items())}

    def error_log(self) -> ErrorLog:
        return ErrorLog(self.error_log_path())

    def shard_writer(self, shard_size: int, columns: Sequence[str]) -> ShardWriter:
        mine = [s.number for s in self.shards() if s.process == self.process_index]
        return ShardWriter(self.root, self.format, self.process_index, max(mine, default=-1) + 1, shard_size,
                           columns)

    def write_views(self, manifest: dict[str, Any], extra: Mapping[str, Any]) -> None:
        """Rebuild errors.jsonl and the manifest's counts from the shards and logs; add ``extra`` fields."""
        shards = self.shards()
        rows = {i for s in shards for i in s.ids()}
        errors = self.errors(rows)
        lines = _jsonl({"id": k, "error": v} for k, v in errors.items())
        atomic_write(self.root / ERRORS_NAME, lambda path: path.write_bytes(lines), self.process_index)
        seconds = sum(float(pq.read_table(s.index, columns=["duration_s"]).column(0).to_numpy().sum())
                      for s in shards)
        counts = {"rows": len(rows), "errors": len(errors), "shards": len(shards), "audio_hours": seconds / 3600}
        view = {**manifest, **extra, "counts": {**extra.get("counts", {}), **counts}}
        atomic_write(self.root / MANIFEST_NAME, lambda path: path.write_bytes(_json_bytes(view)), self.process_index)


# -------------------------------------------------------------------------------------------- reading
def read_codes(out_dir: str | Path, ids: Sequence[str] | None = None) -> pa.Table:
    """Every row of ``out_dir`` (or those of ``ids``, in that order) as one table of :func:`row_schema`."""
    out = OutputDir.existing(out_dir)
    shards = out.shards()
    if not shards:
        raise TokenizeError(f"{out_dir} holds no finished shards")
    schema = row_schema(out.columns())
    table = pa.concat_tables(shard_table(s, out.format, schema) for s in shards)
    if ids is None:
        return table
    row_of = {item_id: row for row, item_id in enumerate(table.column("id").to_pylist())}
    check_known(ids, row_of.keys(), out_dir)
    return table.take([row_of[i] for i in ids])


def shard_table(shard: Shard, output_format: str, schema: pa.Schema) -> pa.Table:
    """One shard's rows with their codes."""
    if output_format == "parquet":
        return pq.read_table(shard.data, schema=schema)
    reader = _import_array_record().ArrayRecordReader(str(shard.data))
    try:
        rows = [decode_record(record) for record in reader.read_all()]
    finally:
        reader.close()
    return pa.Table.from_pylist([{**row, "codes": row["codes"].tolist()} for row in rows], schema=schema)


def check_known(ids: Iterable[str], known: Iterable[str], out_dir: str | Path) -> None:
    missing = sorted(set(ids).difference(known))
    if missing:
        raise TokenizeError(f"{len(missing)} id(s) not in {out_dir}: {missing[:5]}")


def read_errors(out_dir: str | Path) -> dict[str, str]:
    """id -> error of every input of ``out_dir`` that ended as an error (its latest error), sorted by id."""
    return OutputDir.existing(out_dir).errors()


__all__ = [
    "BASE_SCHEMA",
    "ERRORS_NAME",
    "FORMATS",
    "MANIFEST_NAME",
    "OutputDir",
    "Row",
    "TokenizeError",
    "decode_record",
    "encode_record",
    "read_codes",
    "read_errors",
    "row_schema",
]
