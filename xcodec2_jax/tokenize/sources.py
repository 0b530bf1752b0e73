"""Corpus inputs: audio folders, manifests, WebDataset tar shards, Parquet files and Hugging Face datasets.

Every input becomes a :class:`CorpusItem`: a unique, deterministic id, the unit processes split the corpus by,
and ``load(sampling_rate) -> Clip`` (float32 mono wave at that rate, the original rate, metadata). Ids key the
output rows, so they never depend on where or when a job runs:

* a folder (searched recursively): the file's path relative to the folder, ``/``-separated;
* a ``.txt`` manifest (one path a line, relative to the manifest's folder): the line as written;
* a ``.jsonl`` manifest (``{"path": ..., "id": ...}`` a line, ``id`` optional): ``id``, else ``path``;
* WebDataset tar shards: the sample key, i.e. a member's path up to the first ``.`` of its file name
  (``spk0/utt0001.flac`` and ``spk0/utt0001.json`` are one sample, ``spk0/utt0001``);
* Parquet files with an audio column as 🤗 ``Audio`` stores it (``{"bytes", "path"}`` structs): the ``id``
  column when there is one, else ``<file name without .parquet>/<row number>``;
* a 🤗 dataset (an object, a ``save_to_disk`` folder or a Hub name; ``streaming`` for an ``IterableDataset``):
  the ``id`` column when there is one, else the row number (the position in the stream when streaming).

Metadata (what ``--keep-columns`` can carry into the output rows): a ``.jsonl`` record's other fields; a tar
sample's ``.json`` member (an object) and its ``.txt`` member as ``text`` (the JSON's own ``text`` wins);
the other columns of a Parquet file or dataset.

Order and reading: folders, manifests and (non-streaming) datasets are listed up front, sorted by id and
checked for repeated ids before anything runs. Tar shards, Parquet files and streams are read lazily in input
order (files in the order given; a glob sorted), so a corpus larger than memory starts at once; the pipeline
catches a repeated id there. ``Corpus.items(wanted)`` asks ``wanted(item)`` before any audio of an item is
read: tar members are read in place by their byte range (``os.pread``: nothing extracted, only the samples a
process encodes are read; compressed tars are refused), and a Parquet row group's audio is read only when one
of its rows is wanted.

Loading goes through the functions of :meth:`Xcodec2Model.encode_audio`: a file's codes equal
``model.encode_audio([path])`` and in-memory audio's equal ``model.encode_audio(wave, sampling_rate=rate)``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import hashlib
import io
import itertools
import json
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

from ..audio import AudioError, as_wave, load_audio_with_info, resample
from ..errors import Xcodec2Error

# Containers libsndfile reads (it sniffs the real format from the header) and their file extensions.
_EXTENSIONS_BY_FORMAT = {
    "WAV": (".wav",),
    "FLAC": (".flac",),
    "OGG": (".ogg", ".oga", ".opus"),
    "MP3": (".mp3",),
    "AIFF": (".aif", ".aiff"),
    "CAF": (".caf",),
    "W64": (".w64",),
    "RF64": (".rf64",),
    "AU": (".au", ".snd"),
}
_FORMAT_OF_EXTENSION = {ext: fmt for fmt, exts in _EXTENSIONS_BY_FORMAT.items() for ext in exts}
# Every extension is listed as an input, also those this machine's libsndfile cannot decode (MP3 needs
# libsndfile >= 1.1): such a file then fails with an error saying how to fix it, instead of being skipped.
AUDIO_EXTENSIONS = frozenset(_FORMAT_OF_EXTENSION)
# Markers of a folder written by `datasets.Dataset(Dict).save_to_disk`.
_DATASET_MARKERS = ("state.json", "dataset_dict.json")
# A Hub dataset name; anything else that is not an existing path is reported as a missing file.
_HUB_NAME = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")
# WebDataset's rule: the key is the member path up to the first "." of the file name, the rest its field.
_SAMPLE_MEMBER = re.compile(r"((?:.*/)?[^./][^./]*)\.([^/]+)")
_COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_GLOB_CHARACTERS = re.compile(r"[*?\[]")
ID_COLUMN = "id"


class CorpusError(Xcodec2Error, ValueError):
    """The corpus cannot be read: a missing input, a malformed manifest or shard, repeated ids, no ``datasets``."""


class Clip(NamedTuple):
    """A loaded input: float32 mono (samples,) wave at the asked rate, the source's rate in Hz, metadata."""

    wave: np.ndarray
    orig_sampling_rate: int
    metadata: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class CorpusItem:
    """One input: its id, ``load(sampling_rate) -> Clip``, and the unit processes split by (``group``).

    ``load`` raises :class:`~xcodec2_jax.audio.AudioError` for unusable audio (missing, corrupt, empty, NaN/Inf,
    shorter than one codec frame) and ``OSError`` when reading fails (retried by the pipeline). ``group`` is
    None when each item is its own unit; a Parquet row group is one unit, so each process reads only its own.
    """

    id: str
    load: Callable[[int], Clip] = dataclasses.field(repr=False, compare=False)
    group: str | None = None

    @property
    def owner_key(self) -> str:
        """What decides the item's process (see :func:`owner`)."""
        return self.id if self.group is None else self.group


Wanted = Callable[[CorpusItem], bool]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """An opened input: ``items(wanted)`` yields the items ``wanted`` accepts, in a deterministic order.

    ``description`` names the input in the manifest; ``size`` is the number of items of a corpus listed up
    front (its ids are checked unique already), None for one read lazily.
    """

    description: str
    items: Callable[[Wanted], Iterator[CorpusItem]] = dataclasses.field(repr=False, compare=False)
    size: int | None = None


def open_corpus(source: Any, *, split: str | None = None, audio_column: str = "audio", streaming: bool = False,
                columns: Sequence[str] = ()) -> Corpus:
    """Open ``source`` for tokenization; raises :class:`CorpusError` when it cannot be read.

    Args:
        source: a folder of audio files, a ``.txt``/``.jsonl`` manifest, WebDataset ``.tar`` shards or
            ``.parquet`` files (a path, a glob, or a list of them), a list of audio paths (ids are the paths
            as given), a list of :class:`CorpusItem`, a ``datasets`` object (``Dataset``, ``DatasetDict``,
            ``IterableDataset``), a ``save_to_disk`` folder, or a dataset name on the Hub.
        split: the dataset split (needed when a dataset has several).
        audio_column: the column holding the audio (datasets and Parquet).
        streaming: read a dataset name or folder as an ``IterableDataset`` (nothing downloaded up front).
        columns: metadata columns the rows will keep; datasets and Parquet files must have them.
    """
    if isinstance(source, Corpus):
        return source
    if _is_dataset(source):
        return _dataset_corpus(source, split, audio_column, columns, f"a {type(source).__name__}")
    if isinstance(source, Sequence) and not isinstance(source, str) and source \
            and all(isinstance(s, CorpusItem) for s in source):
        return _listed(f"{len(source)} items", list(source))
    if isinstance(source, (str, Path)) and (streaming or _is_dataset_path(source)):
        return _dataset_corpus(_load_dataset(str(source), split, streaming), split, audio_column, columns,
                               str(source))
    if streaming:
        raise CorpusError(f"streaming applies only to Hugging Face datasets, not to {source!r}")
    if split is not None:
        raise CorpusError(f"split={split!r} applies only to Hugging Face datasets, not to {source!r}")
    return _file_corpus(source, audio_column, columns)


def list_corpus(source: Any, **options: Any) -> list[CorpusItem]:
    """Every item of ``source`` (see :func:`open_corpus` for the options), in the corpus's order."""
    return list(open_corpus(source, **options).items(lambda item: True))


def _listed(description: str, items: list[CorpusItem]) -> Corpus:
    """A corpus listed up front: ids checked unique, sorted by id."""
    repeated = sorted(item_id for item_id, n in collections.Counter(item.id for item in items).items() if n > 1)
    if repeated:
        raise CorpusError(f"{len(repeated)} repeated id(s), ids must be unique: {repeated[:5]}")
    items = sorted(items, key=lambda item: item.id)
    return Corpus(description, lambda wanted: (item for item in items if wanted(item)), len(items))


# ------------------------------------------------------------------------------------------- decoding
def _check_decodable(name: str, extension: str) -> None:
    """Say how to fix a format this libsndfile cannot decode, rather than calling the file corrupt."""
    fmt = _FORMAT_OF_EXTENSION.get(extension.lower())
    if fmt is not None and fmt not in sf.available_formats():
        raise AudioError(f"{name}: this soundfile's libsndfile ({sf.__libsndfile_version__}) cannot decode {fmt}; "
                         "install soundfile >= 0.12 from its wheels (they bundle libsndfile >= 1.1, which reads "
                         "MP3 and Opus), or convert the audio with ffmpeg")


def _file_clip(path: Path, sampling_rate: int, metadata: Mapping[str, Any] | None = None) -> Clip:
    _check_decodable(str(path), path.suffix)
    wave, rate = load_audio_with_info(path, sampling_rate)
    return Clip(wave, rate, metadata or {})


def _bytes_clip(data: bytes, name: str, sampling_rate: int, metadata: Mapping[str, Any]) -> Clip:
    """Encoded audio bytes -> Clip, checked as :meth:`Xcodec2Model.encode_audio` checks an in-memory clip."""
    if not data:
        raise AudioError(f"{name}: the file is empty (0 bytes)")
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, TypeError) as err:  # soundfile's LibsndfileError is a RuntimeError
        raise AudioError(f"{name}: cannot read the audio, the file is corrupt or not a supported format ({err})") \
            from err
    return _array_clip(wave.T, rate, name, sampling_rate, metadata)


def _array_clip(wave: Any, rate: int, name: str, sampling_rate: int, metadata: Mapping[str, Any]) -> Clip:
    """(samples,) or (channels, samples) audio -> Clip: check, mix to mono, resample, check the length."""
    wave = resample(as_wave(wave, name, min_samples=1), rate, sampling_rate)
    return Clip(as_wave(wave, name), rate, metadata)


def _value_clip(value: Any, name: str, sampling_rate: int, metadata: Mapping[str, Any], base: Path | None) -> Clip:
    """An audio cell: ``{"bytes", "path"}`` (🤗 ``Audio``) or ``{"array", "sampling_rate"}`` (decoded)."""
    if not isinstance(value, Mapping):
        raise AudioError(f"{name}: expected an audio dict, got {type(value).__name__}")
    if value.get("array") is not None:
        return _array_clip(np.asarray(value["array"]), int(value["sampling_rate"]), name, sampling_rate, metadata)
    if value.get("bytes") is not None:
        _check_decodable(name, Path(value.get("path") or "").suffix)
        return _bytes_clip(value["bytes"], name, sampling_rate, metadata)
    if value.get("path") is not None:
        path = Path(value["path"])
        return _file_clip(path if base is None or path.is_absolute() else base / path, sampling_rate, metadata)
    raise AudioError(f"{name}: the audio has neither samples, bytes nor a path")


# ----------------------------------------------------------------------------------- files and manifests
def _expand(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Paths, with globs (``*``, ``?``, ``[``) expanded in sorted order; a glob matching nothing is an error."""
    paths = []
    for entry in [source] if isinstance(source, (str, Path)) else source:
        text = str(entry)
        if _GLOB_CHARACTERS.search(text) and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise CorpusError(f"{text}: the pattern matches no file")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(entry))
    return paths


def _file_corpus(source: str | Path | Sequence[str | Path], audio_column: str, columns: Sequence[str]) -> Corpus:
    paths = _expand(source)
    kinds = {".tar" if p.suffix == ".tar" else ".parquet" if p.suffix == ".parquet" else "audio" for p in paths}
    if kinds == {".tar"}:
        return _tar_corpus(paths)
    if kinds == {".parquet"}:
        return _parquet_corpus(paths, audio_column, columns)
    if len(kinds) > 1:
        raise CorpusError(f"mixed inputs ({', '.join(sorted(kinds))}): give tar shards, Parquet files or audio "
                          "files, one kind per run")
    if isinstance(source, (str, Path)) and not _GLOB_CHARACTERS.search(str(source)):
        return _one_path_corpus(Path(source))
    return _listed(f"{len(paths)} audio files", [_file_item(str(p), p) for p in paths])


def _one_path_corpus(path: Path) -> Corpus:
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if path.is_dir():
        return _listed(str(path), [_file_item(file.relative_to(path).as_posix(), file) for file in _audio_files(path)])
    if path.suffix == ".txt":
        return _listed(str(path), _txt_manifest(path))
    if path.suffix == ".jsonl":
        return _listed(str(path), _jsonl_manifest(path))
    if path.suffix.lower() in AUDIO_EXTENSIONS:
        return _listed(str(path), [_file_item(str(path), path)])
    raise CorpusError(f"{path}: expected a folder of audio files, a .txt or .jsonl manifest, .tar shards, "
                      ".parquet files or a Hugging Face dataset")


def _file_item(item_id: str, path: Path, metadata: Mapping[str, Any] | None = None) -> CorpusItem:
    return CorpusItem(item_id, functools.partial(_file_clip, path, metadata=metadata))


def _audio_files(root: Path) -> list[Path]:
    """Audio files under ``root`` by extension; hidden files (such as macOS ``._x.wav`` stubs) are skipped."""
    return [p for p in root.rglob("*")
            if p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith(".") and p.is_file()]


def _txt_manifest(manifest: Path) -> list[CorpusItem]:
    lines = [line.strip() for line in manifest.read_text(encoding="utf-8").splitlines()]
    return [_file_item(line, manifest.parent / line) for line in lines if line and not line.startswith("#")]


def _jsonl_manifest(manifest: Path) -> list[CorpusItem]:
    items = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{manifest}:{number}: not valid JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise CorpusError(f"{manifest}:{number}: expected an object with a string 'path', got {line.strip()!r}")
        items.append(_file_item(str(record.get(ID_COLUMN, record["path"])), manifest.parent / record["path"],
                                record))
    return items


# ------------------------------------------------------------------------------------ WebDataset shards
def _tar_corpus(paths: list[Path]) -> Corpus:
    for path in paths:
        if not path.is_file():
            raise CorpusError(f"{path}: no such tar shard")
        with open(path, "rb") as file:
            head = file.read(6)
        compression = next((name for magic, name in _COMPRESSION_MAGIC.items() if head.startswith(magic)), None)
        if compression:
            raise CorpusError(f"{path}: a {compression}-compressed tar; samples are read in place by byte range, "
                              "which needs an uncompressed .tar (WebDataset audio shards usually are)")

    def items(wanted: Wanted) -> Iterator[CorpusItem]:
        for path in paths:
            yield from _tar_items(path, wanted)

    shown = f"{paths[0]} ... ({len(paths)} tar shards)" if len(paths) > 1 else str(paths[0])
    return Corpus(shown, items)


def _tar_items(path: Path, wanted: Wanted) -> Iterator[CorpusItem]:
    """The samples of one shard in member order; reads headers only (tarfile seeks over the data)."""
    try:
        with tarfile.open(path, "r:") as tar:
            fields = (_sample_field(member) for member in tar)
            for key, members in itertools.groupby(filter(None, fields), key=lambda f: f[0]):
                extents = {ext: extent for _, ext, extent in members}
                item = CorpusItem(key, functools.partial(_tar_clip, path, key, extents))
                if wanted(item):
                    yield item
    except tarfile.TarError as err:
        raise CorpusError(f"{path}: not a readable tar shard ({err})") from err


def _sample_field(member: tarfile.TarInfo) -> tuple[str, str, tuple[int, int]] | None:
    """(sample key, lowercase field extension, (data offset, size)) of a regular file; None for the rest."""
    match = _SAMPLE_MEMBER.fullmatch(member.name.removeprefix("./"))
    if not member.isfile() or match is None:
        return None
    return match[1], match[2].lower(), (member.offset_data, member.size)


def _tar_clip(path: Path, key: str, extents: dict[str, tuple[int, int]], sampling_rate: int) -> Clip:
    """Read one sample's members by their byte ranges and decode it."""
    name = f"{path}:{key}"
    audio = [ext for ext in extents if f".{ext}" in AUDIO_EXTENSIONS]
    if len(audio) != 1:
        found = ", ".join(sorted(extents))
        raise AudioError(f"{name}: expected one audio member (.flac, .mp3, .wav, .ogg, .opus, ...), found: {found}")
    _check_decodable(name, f".{audio[0]}")
    with open(path, "rb") as file:
        data = {ext: _read_extent(file.fileno(), extent, name) for ext, extent in extents.items()
                if ext in (audio[0], "json", "txt")}
    metadata: dict[str, Any] = {}
    if "txt" in data:
        metadata["text"] = data["txt"].decode("utf-8", errors="replace").strip()
    if "json" in data:
        try:
            fields = json.loads(data["json"])
        except ValueError as err:
            raise AudioError(f"{name}.json: not valid JSON ({err})") from err
        if not isinstance(fields, dict):
            raise AudioError(f"{name}.json: expected a JSON object, got {type(fields).__name__}")
        metadata.update(fields)
    return _bytes_clip(data[audio[0]], name, sampling_rate, metadata)


def _read_extent(fd: int, extent: tuple[int, int], name: str) -> bytes:
    """``size`` bytes at ``offset``: a positioned read, so threads share nothing (no file position)."""
    offset, size = extent
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise AudioError(f"{name}: the tar shard is truncated ({len(data)} of {size} bytes)")
    return data


# ------------------------------------------------------------------------------------------- Parquet
def _parquet_corpus(paths: list[Path], audio_column: str, columns: Sequence[str]) -> Corpus:
    stems = collections.Counter(p.stem for p in paths)
    for path in paths:
        if not path.is_file():
            raise CorpusError(f"{path}: no such Parquet file")
        try:
            schema = pq.read_schema(path)
        except Exception as err:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
            raise CorpusError(f"{path}: not a readable Parquet file ({err})") from err
        _check_columns(str(path), schema.names, audio_column, columns)
        if ID_COLUMN not in schema.names and stems[path.stem] > 1:
            raise CorpusError(f"{path}: several inputs are named {path.stem}.parquet and there is no "
                              f"'{ID_COLUMN}' column, so row ids '{path.stem}/<row>' would repeat")

    def items(wanted: Wanted) -> Iterator[CorpusItem]:
        for path in paths:
            yield from _parquet_items(path, audio_column, tuple(columns), wanted)

    shown = f"{paths[0]} ... ({len(paths)} Parquet files)" if len(paths) > 1 else str(paths[0])
    return Corpus(shown, items)


def _check_columns(name: str, names: Sequence[str], audio_column: str, columns: Sequence[str]) -> None:
    missing = [c for c in (audio_column, *columns) if c not in names]
    if missing:
        raise CorpusError(f"{name} has no column(s) {missing}; it has {list(names)} (choose the audio with "
                          "--audio-column, metadata with --keep-columns)")


class _RowGroup:
    """One Parquet row group's wanted rows (audio and metadata), read by the first item that loads, once."""

    def __init__(self, path: Path, index: int, columns: list[str], rows: list[int]):
        self.path, self.index, self.columns, self.rows = path, index, columns, rows
        self.lock = threading.Lock()
        self.values: dict[int, dict[str, Any]] | None = None

    def row(self, row: int) -> dict[str, Any]:
        with self.lock:  # the first caller reads; a failed read (OSError) leaves it to the next attempt
            if self.values is None:
                table = pq.ParquetFile(self.path).read_row_group(self.index, columns=self.columns).take(self.rows)
                self.values = dict(zip(self.rows, table.to_pylist(), strict=True))
            return self.values[row]


def _parquet_items(path: Path, audio_column: str, columns: tuple[str, ...], wanted: Wanted) -> Iterator[CorpusItem]:
    """Items row group by row group; the ids are read first, the audio only for the wanted rows."""
    file = pq.ParquetFile(path)
    has_ids = ID_COLUMN in file.schema_arrow.names
    start = 0
    for index in range(file.num_row_groups):
        count = file.metadata.row_group(index).num_rows
        ids = ([str(v) for v in file.read_row_group(index, columns=[ID_COLUMN]).column(0).to_pylist()] if has_ids
               else [f"{path.stem}/{start + row}" for row in range(count)])
        group = _RowGroup(path, index, [audio_column, *columns], [])
        candidates = [CorpusItem(item_id, functools.partial(_parquet_clip, group, row, audio_column, columns,
                                                            f"{path}:{item_id}"), group=f"{path.name}#{index}")
                      for row, item_id in enumerate(ids)]
        chosen = [(row, item) for row, item in enumerate(candidates) if wanted(item)]
        group.rows = [row for row, _ in chosen]
        yield from (item for _, item in chosen)
        start += count


def _parquet_clip(group: _RowGroup, row: int, audio_column: str, columns: tuple[str, ...], name: str,
                  sampling_rate: int) -> Clip:
    values = group.row(row)
    return _value_clip(values[audio_column], name, sampling_rate, {c: values[c] for c in columns}, group.path.parent)


# -------------------------------------------------------------------------------------------- datasets
def _import_datasets(source: Any):
    try:
        import datasets
    except ImportError as err:
        raise CorpusError(f"{source!r}: reading a Hugging Face dataset needs the `datasets` package: "
                          "pip install 'xcodec2-jax[datasets]'") from err
    return datasets


def _is_dataset(source: Any) -> bool:
    """A ``datasets`` object (duck-typed, so ``datasets`` stays optional)."""
    return type(source).__module__.startswith("datasets.")


def _is_dataset_path(source: str | Path) -> bool:
    """A ``save_to_disk`` folder, or no local path but shaped like a Hub name (``name`` or ``owner/name``)."""
    path = Path(source)
    if path.is_dir():
        return any((path / marker).is_file() for marker in _DATASET_MARKERS)
    if path.suffix in (".txt", ".jsonl", ".tar", ".parquet") or _GLOB_CHARACTERS.search(str(source)):
        return False
    return not path.exists() and _HUB_NAME.fullmatch(str(source)) is not None


def _load_dataset(name: str, split: str | None, streaming: bool):
    datasets = _import_datasets(name)
    path = Path(name)
    if path.is_dir() and any((path / marker).is_file() for marker in _DATASET_MARKERS):
        dataset = datasets.load_from_disk(name)
        if not streaming:
            return dataset
        if hasattr(dataset, "keys"):
            return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dataset.items()})
        return dataset.to_iterable_dataset()
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except FileNotFoundError as err:  # also what `datasets` raises for an unknown Hub name
        raise CorpusError(f"{name!r} is neither a local file or folder nor a loadable dataset ({err})") from err


def _select_split(dataset, split: str | None):
    """The split ``split`` of a ``DatasetDict`` (or its only split); a single dataset as is."""
    if not hasattr(dataset, "keys"):
        if split is not None and getattr(dataset, "split", None) is not None and str(dataset.split) != split:
            raise CorpusError(f"the dataset is split {dataset.split!r}, not {split!r}")
        return dataset
    if split is None:
        if len(dataset) != 1:
            raise CorpusError(f"the dataset has splits {sorted(dataset)}; choose one with --split")
        split = next(iter(dataset))
    if split not in dataset:
        raise CorpusError(f"the dataset has no split {split!r}; it has {sorted(dataset)}")
    return dataset[split]


def _dataset_corpus(dataset, split: str | None, audio_column: str, columns: Sequence[str],
                    description: str) -> Corpus:
    import datasets  # installed: the dataset came from it

    dataset = _select_split(dataset, split)
    names = dataset.column_names  # None for a stream whose features are unknown until read
    if names is not None:
        _check_columns("the dataset", names, audio_column, columns)
        dataset = dataset.select_columns([c for c in dict.fromkeys([ID_COLUMN, audio_column, *columns]) if c in names])
    if dataset.features is not None and isinstance(dataset.features.get(audio_column), datasets.Audio):
        # Raw bytes/paths, decoded here with soundfile: `datasets` itself would need torch + torchcodec.
        dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    if isinstance(dataset, datasets.IterableDataset):
        return Corpus(description, functools.partial(_stream_items, dataset, audio_column, tuple(columns)))
    ids = [str(v) for v in dataset[ID_COLUMN]] if ID_COLUMN in dataset.column_names else \
        [str(i) for i in range(len(dataset))]
    load = functools.partial(_row_clip, dataset, audio_column=audio_column, columns=tuple(columns))
    return _listed(description, [CorpusItem(item_id, functools.partial(load, row, item_id=item_id))
                                 for row, item_id in enumerate(ids)])


def _row_clip(dataset, row: int, sampling_rate: int, *, audio_column: str, columns: tuple[str, ...],
              item_id: str) -> Clip:
    values = dataset[row]
    return _value_clip(values[audio_column], f"dataset row {row} (id {item_id!r})", sampling_rate,
                       {c: values[c] for c in columns}, None)


def _stream_items(dataset, audio_column: str, columns: tuple[str, ...], wanted: Wanted) -> Iterator[CorpusItem]:
    """Rows of an ``IterableDataset`` in stream order; each row's audio comes with it (decoded when loaded)."""
    for position, values in enumerate(dataset):
        item_id = str(values[ID_COLUMN]) if ID_COLUMN in values else str(position)
        name = f"stream row {position} (id {item_id!r})"
        if audio_column not in values:
            raise CorpusError(f"{name} has no column {audio_column!r}; it has {sorted(values)}")
        metadata = {c: values.get(c) for c in columns}
        item = CorpusItem(item_id, functools.partial(_value_clip, values[audio_column], name, metadata=metadata,
                                                     base=None))
        if wanted(item):
            yield item


# ------------------------------------------------------------------------------------------- processes
def owner(key: str, count: int) -> int:
    """The process (of ``count``) that tokenizes the items of ``key`` (an id or a group): a hash of the key."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % count


def partition(items: Iterable[CorpusItem], index: int, count: int) -> list[CorpusItem]:
    """Process ``index`` of ``count``'s share of ``items``: those it :func:`owns <owner>`, in the given order.

    Shares are disjoint and cover ``items``. An item's owner depends on its own key alone, so jobs whose
    listings differ (files added between two starts, a stale network-file-system view) still never encode
    the same input twice. Shares of n keys differ by about sqrt(n / count), a small fraction for real corpora.
    """
    return [item for item in items if owner(item.owner_key, count) == index]


__all__ = ["AUDIO_EXTENSIONS", "ID_COLUMN", "Clip", "Corpus", "CorpusError", "CorpusItem", "list_corpus",
           "open_corpus", "owner", "partition"]
