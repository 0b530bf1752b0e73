"""Safetensors checkpoints read tensor by tensor with plain file reads, and the error for a bad checkpoint.

``safe_open`` memory-maps the whole file, and every mapped page it touches counts in the process's resident
memory until the file is closed: loading a checkpoint that way peaks at the parameters plus the whole
file. Reading each tensor into its own buffer instead keeps the host overhead at one tensor. The format is a
little-endian u64 header length, a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}``
and the raw data; nothing here unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER_BYTES = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset its data starts at."""
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < size <= _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + size


class SafetensorsFiles:
    """One or more safetensors files (shards) seen as one key -> tensor mapping, read lazily.

    Attributes:
        tensors: key -> :class:`TensorInfo`, from the headers only.
        metadata: file -> its ``__metadata__`` string mapping (empty when absent).
    """

    def __init__(self, files: Iterable[Path]):
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for path in map(Path, files):
            header, start = _read_header(path)
            self.metadata[path] = header.pop("__metadata__", None) or {}
            file_size = path.stat().st_size
            for key, entry in header.items():
                self.tensors[key] = self._info(path, key, entry, start, file_size)

    @staticmethod
    def _info(path: Path, key: str, entry, start: int, file_size: int) -> TensorInfo:
        try:
            dtype, shape = np.dtype(_DTYPES[entry["dtype"]]), tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: malformed header entry for {key!r}: {entry!r}") from err
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or start + end > file_size:
            raise CheckpointError(f"{path}: {key!r} claims bytes [{begin}, {end}) for {entry['dtype']} {shape}; "
                                  "the file is truncated or corrupt")
        return TensorInfo(path, dtype, shape, start + begin, nbytes)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every tensor (no tensor data is read)."""
        return {key: info.shape for key, info in self.tensors.items()}

    def describe(self, key: str) -> str:
        """The name to show for ``key`` in error messages."""
        return key

    def read(self, key: str) -> np.ndarray:
        """The tensor ``key`` as a fresh numpy array in its stored dtype."""
        info = self.tensors[key]
        array = np.empty(info.shape, info.dtype)
        with info.path.open("rb") as f:
            f.seek(info.offset)
            if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != info.nbytes:
                raise CheckpointError(f"{info.path}: truncated while reading {key!r}")
        return array
