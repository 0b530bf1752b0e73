"""Reading tokenized rows for training: a Grain ``RandomAccessDataSource`` over either output format.

``CodesDataSource(out_dir)[i]`` is row ``i`` of the folder (shards in name order, rows in shard order) as
``{"id": str, "codes": int32 (num_codes,), "num_codes", "duration_s", "orig_sampling_rate", <kept columns>}``.
It needs neither Grain nor JAX (Grain's data sources are a protocol: ``__len__`` and ``__getitem__``), and it
pickles, so Grain's worker processes can each open their own copy. ArrayRecord reads a record per row
(random access, the format to shuffle a large corpus with); Parquet shards are read whole on first use and the
last few are kept, which suits sequential reading.
"""

from __future__ import annotations

import bisect
import collections
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from .store import OutputDir, TokenizeError, decode_record, row_schema, shard_table

# Parquet shards kept decoded by a CodesDataSource: enough for sequential reading across shard borders.
PARQUET_SHARDS_CACHED = 4


class CodesDataSource:
    """Random access to the rows of a ``tokenize`` output folder (Parquet or ArrayRecord)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        out = OutputDir.existing(self.out_dir)
        self.format, self.columns = out.format, out.columns()
        self._shards = out.shards()
        if not self._shards:
            raise TokenizeError(f"{out_dir} holds no finished shards")
        self._starts = [0, *itertools.accumulate(s.num_rows() for s in self._shards)]
        self._records = None
        self._cache: collections.OrderedDict[int, list[dict[str, Any]]] = collections.OrderedDict()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        index %= len(self)
        if self.format == "arrayrecord":
            return decode_record(self._record_source()[index])
        shard = bisect.bisect_right(self._starts, index) - 1
        return self._parquet_rows(shard)[index - self._starts[shard]]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        if self.format == "arrayrecord":
            return [decode_record(r) for r in self._record_source().__getitems__(list(indices))]
        return [self[i] for i in indices]

    def __repr__(self) -> str:  # Grain's checkpoints identify a source by its repr
        return f"CodesDataSource({str(self.out_dir)!r}, format={self.format!r}, rows={len(self)})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_records": None, "_cache": collections.OrderedDict()}

    def _record_source(self):
        if self._records is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._records = ArrayRecordDataSource([str(s.data) for s in self._shards])
        return self._records

    def _parquet_rows(self, shard: int) -> list[dict[str, Any]]:
        if shard not in self._cache:
            table = shard_table(self._shards[shard], self.format, row_schema(self.columns))
            codes = [np.asarray(c, np.int32) for c in table.column("codes").to_numpy(zero_copy_only=False)]
            rows = table.drop_columns(["codes"]).to_pylist()
            self._cache[shard] = [{"id": r.pop("id"), "codes": c, **r} for r, c in zip(rows, codes, strict=True)]
            while len(self._cache) > PARQUET_SHARDS_CACHED:
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard)
        return self._cache[shard]


__all__ = ["PARQUET_SHARDS_CACHED", "CodesDataSource"]
