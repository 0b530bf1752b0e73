"""Test and benchmark scaffolding: WebDataset tar shards of encoded audio, written without the `webdataset`
package (a shard is a plain tar whose members of one sample share a key and sit next to each other)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import soundfile as sf


def audio_bytes(wave: np.ndarray, sampling_rate: int, fmt: str, subtype: str | None = None) -> bytes:
    """``wave`` ((samples,) or (samples, channels) float) encoded by libsndfile, e.g. ("MP3", "MPEG_LAYER_III"),
    ("OGG", "OPUS"), ("FLAC", "PCM_16")."""
    buffer = io.BytesIO()
    sf.write(buffer, wave, sampling_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def write_shard(path: str | Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> Path:
    """Write ``(key, {extension: bytes})`` samples as ``key.extension`` members, in order; returns the path."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
