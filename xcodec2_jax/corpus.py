"""Corpus inputs for tokenization: audio directories, manifests and Hugging Face datasets.

Every input becomes a :class:`CorpusItem`: a unique, deterministic id and a way to load its audio as the codec
wants it (float32 mono at 16 kHz). Ids are what the output rows are keyed on, so they must not depend on where
or when the job runs:

* a directory (searched recursively): the file's path relative to the directory, with ``/`` separators;
* a ``.txt`` manifest (one path per line, relative paths resolved against the manifest's directory): the
  line as written;
* a ``.jsonl`` manifest (``{"path": ..., "id": ...}`` per line, ``id`` optional): ``id``, else ``path``;
* a Hugging Face dataset (a name, or a directory written by ``save_to_disk``): the ``id`` column when there
  is one, else the row index.

Loading goes through the same functions as :meth:`Xcodec2Model.encode_audio`, so a file's codes equal
``model.encode_audio([path])`` and a dataset row's equal ``model.encode_audio(array, sampling_rate=rate)``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from .audio import AudioError, as_wave, load_audio_with_info, resample
from .errors import Xcodec2Error

# File extensions of the containers libsndfile reads (it sniffs the real format from the header on reading).
_EXTENSIONS_BY_FORMAT = {
    "WAV": (".wav",),
    "WAVEX": (".wav",),
    "FLAC": (".flac",),
    "OGG": (".ogg", ".oga", ".opus"),
    "MP3": (".mp3",),
    "AIFF": (".aif", ".aiff"),
    "CAF": (".caf",),
    "W64": (".w64",),
    "RF64": (".rf64",),
    "AU": (".au", ".snd"),
}
# Those this machine's libsndfile can read (MP3 needs libsndfile >= 1.1; AAC/m4a is never supported).
AUDIO_EXTENSIONS = frozenset(
    ext for fmt, exts in _EXTENSIONS_BY_FORMAT.items() if fmt in sf.available_formats() for ext in exts
)
# Markers of a directory written by `datasets.Dataset(Dict).save_to_disk`.
_DATASET_MARKERS = ("state.json", "dataset_dict.json")
# A Hub dataset name; anything else that is not an existing path is reported as a missing file.
_HUB_NAME = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


class CorpusError(Xcodec2Error, ValueError):
    """The corpus cannot be listed: a missing input, a malformed manifest, duplicate ids, no ``datasets``."""


@dataclasses.dataclass(frozen=True)
class CorpusItem:
    """One input: its id and ``load(sampling_rate) -> (mono float32 (samples,) wave, original rate in Hz)``.

    ``load`` raises :class:`~xcodec2_jax.audio.AudioError` for unusable audio (missing, corrupt, empty, NaN/Inf,
    shorter than one codec frame after resampling).
    """

    id: str
    load: Callable[[int], tuple[np.ndarray, int]] = dataclasses.field(repr=False, compare=False)


def list_corpus(source: Any, split: str | None = None, audio_column: str = "audio") -> list[CorpusItem]:
    """All inputs of ``source``, sorted by id (ids checked unique).

    Args:
        source: a directory of audio files, a ``.txt``/``.jsonl`` manifest, a sequence of audio paths (ids are
            the paths as given), a ``datasets.Dataset``/``DatasetDict``, a ``save_to_disk`` directory, or a
            dataset name on the Hugging Face Hub (a string that is not an existing path).
        split: the dataset split (needed when a dataset has several).
        audio_column: the dataset column holding the audio.
    """
    if _is_dataset(source):
        items = _dataset_items(source, split, audio_column)
    elif isinstance(source, (str, Path)) and _is_dataset_path(source):
        items = _dataset_items(_load_dataset(str(source), split), split, audio_column)
    else:
        if split is not None:
            raise CorpusError(f"split={split!r} applies only to Hugging Face datasets, not to {source!r}")
        items = _file_items(source)
    _check_unique(items)
    return sorted(items, key=lambda item: item.id)


# ------------------------------------------------------------------------------------------------ files
def _file_items(source: str | Path | Sequence[str | Path]) -> list[CorpusItem]:
    if not isinstance(source, (str, Path)):
        return [_file_item(str(path), Path(path)) for path in source]
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"{source}: no such file or directory")
    if path.is_dir():
        return [_file_item(file.relative_to(path).as_posix(), file) for file in _audio_files(path)]
    if path.suffix == ".txt":
        return _txt_manifest(path)
    if path.suffix == ".jsonl":
        return _jsonl_manifest(path)
    raise CorpusError(
        f"{source}: expected a directory of audio files, a .txt or .jsonl manifest, or a Hugging Face dataset"
    )


def _file_item(item_id: str, path: Path) -> CorpusItem:
    return CorpusItem(item_id, functools.partial(load_audio_with_info, path))


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
        items.append(_file_item(str(record.get("id", record["path"])), manifest.parent / record["path"]))
    return items


# --------------------------------------------------------------------------------------------- datasets
def _import_datasets(source: Any):
    try:
        import datasets
    except ImportError as err:
        raise CorpusError(f"{source!r}: reading a Hugging Face dataset needs the `datasets` package: "
                          "pip install 'xcodec2-jax[datasets]'") from err
    return datasets


def _is_dataset(source: Any) -> bool:
    """A ``datasets.Dataset``/``DatasetDict`` object (duck-typed, so ``datasets`` stays optional)."""
    return type(source).__module__.startswith("datasets.")


def _is_dataset_path(source: str | Path) -> bool:
    """A ``save_to_disk`` directory, or no local path but shaped like a Hub name (``name`` or ``owner/name``)."""
    path = Path(source)
    if path.is_dir():
        return any((path / marker).is_file() for marker in _DATASET_MARKERS)
    manifest = path.suffix in (".txt", ".jsonl")
    return not path.exists() and not manifest and _HUB_NAME.fullmatch(str(source)) is not None


def _load_dataset(name: str, split: str | None):
    datasets = _import_datasets(name)
    if Path(name).is_dir():
        return datasets.load_from_disk(name)
    try:
        return datasets.load_dataset(name, split=split)
    except FileNotFoundError as err:  # also what `datasets` raises for an unknown Hub name
        raise CorpusError(f"{name!r} is neither a local file or directory nor a loadable dataset ({err})") from err


def _select_split(dataset, split: str | None):
    """The ``Dataset`` of ``split`` from a ``DatasetDict`` (or the only split); a ``Dataset`` as is."""
    if not hasattr(dataset, "keys"):
        if split is not None and dataset.split is not None and str(dataset.split) != split:
            raise CorpusError(f"the dataset is split {dataset.split!r}, not {split!r}")
        return dataset
    if split is None:
        if len(dataset) != 1:
            raise CorpusError(f"the dataset has splits {sorted(dataset)}; choose one with --split")
        split = next(iter(dataset))
    if split not in dataset:
        raise CorpusError(f"the dataset has no split {split!r}; it has {sorted(dataset)}")
    return dataset[split]


def _dataset_items(dataset, split: str | None, audio_column: str) -> list[CorpusItem]:
    import datasets  # installed: the dataset came from it

    dataset = _select_split(dataset, split)
    if audio_column not in dataset.column_names:
        raise CorpusError(f"the dataset has no column {audio_column!r}; columns: {dataset.column_names}; "
                          "choose one with --audio-column")
    ids = [str(v) for v in dataset["id"]] if "id" in dataset.column_names else [str(i) for i in range(len(dataset))]
    audio = dataset.select_columns([audio_column])
    if isinstance(audio.features[audio_column], datasets.Audio):
        # Raw bytes/paths, decoded here with soundfile: `datasets` itself would need torch + torchcodec.
        audio = audio.cast_column(audio_column, datasets.Audio(decode=False))
    return [CorpusItem(item_id, functools.partial(_load_row, audio, row, audio_column, item_id))
            for row, item_id in enumerate(ids)]


def _load_row(dataset, row: int, column: str, item_id: str, sampling_rate: int) -> tuple[np.ndarray, int]:
    """A dataset row's audio: ``{"bytes", "path"}`` (an Audio feature) or ``{"array", "sampling_rate"}``."""
    name = f"dataset row {row} (id {item_id!r})"
    value = dataset[row][column]
    if not isinstance(value, dict):
        raise AudioError(f"{name}: expected an audio dict in column {column!r}, got {type(value).__name__}")
    if value.get("array") is not None:
        wave, rate = np.asarray(value["array"]), int(value["sampling_rate"])
    elif value.get("bytes") is not None:
        wave, rate = _read_bytes(value["bytes"], name)
    elif value.get("path") is not None:
        return load_audio_with_info(value["path"], sampling_rate)
    else:
        raise AudioError(f"{name}: the audio has neither samples, bytes nor a path")
    # As `Xcodec2Model.encode_audio` treats an in-memory clip: check, mix to mono, resample, check the length.
    wave = resample(as_wave(wave, name, min_samples=1), rate, sampling_rate)
    return as_wave(wave, name), rate


def _read_bytes(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """Encoded audio bytes -> float32 (channels, samples) and the rate, with ``read_audio``'s error messages."""
    if not data:
        raise AudioError(f"{name}: the file is empty (0 bytes)")
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, TypeError) as err:  # soundfile's LibsndfileError is a RuntimeError
        raise AudioError(f"{name}: cannot read the audio, the file is corrupt or not a supported format ({err})") \
            from err
    return wave.T, rate


# ------------------------------------------------------------------------------------------------ checks
def _check_unique(items: list[CorpusItem]) -> None:
    duplicates = sorted(item_id for item_id, n in collections.Counter(item.id for item in items).items() if n > 1)
    if duplicates:
        raise CorpusError(f"{len(duplicates)} duplicate id(s), ids must be unique: {duplicates[:5]}")


def owner(item_id: str, count: int) -> int:
    """The process (of ``count``) that tokenizes ``item_id``: a hash of the id alone, never of the listing."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") % count


def partition(items: Sequence[CorpusItem], index: int, count: int) -> list[CorpusItem]:
    """Process ``index`` of ``count``'s share of ``items``: those it :func:`owns <owner>`, in the given order.

    Shares are disjoint and cover ``items``. An id's owner does not depend on the other ids, so jobs whose
    listings differ (files added between two starts, a stale network-file-system view) still never encode
    the same input twice. Shares of n ids differ by about sqrt(n / count), a small fraction for real corpora.
    """
    return [item for item in items if owner(item.id, count) == index]


__all__ = ["AUDIO_EXTENSIONS", "CorpusError", "CorpusItem", "list_corpus", "owner", "partition"]
