"""Per-item lengths: the extractor's padding rule and the checks on lengths given to the pure functions.

Transformers' extractor appends one zero sample to every clip and counts it as valid (``padding_mask``), then
zero-pads to a multiple of the hop; only codec frames fully covered by valid samples count as codes
(``audio_codes_mask``). The host extractor, the engine and the model all size clips with the functions below.
"""

from __future__ import annotations

import jax
import numpy as np


def valid_samples(clip_samples):
    """Samples the extractor counts as valid for a clip of ``clip_samples`` (int or integer array)."""
    return clip_samples + 1


def padded_frames(samples, hop_length: int):
    """Frames of ``samples`` valid samples zero-padded up to a multiple of the hop (rounded up)."""
    return -(-samples // hop_length)


def whole_frames(samples, hop_length: int):
    """Frames fully covered by ``samples`` valid samples: the clip's codes (rounded down)."""
    return samples // hop_length


def _check(name: str, lengths, batch: int, low: int, high: int, multiple: int = 1) -> None:
    if not hasattr(lengths, "shape"):
        lengths = np.asarray(lengths)
    shape, dtype = tuple(lengths.shape), lengths.dtype
    if shape != (batch,) or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must be an integer array of shape ({batch},); got {dtype} {shape}")
    if isinstance(lengths, jax.core.Tracer):
        return  # values unknown while tracing; the eager entry points check them
    values = np.asarray(lengths)
    bad = (values < low) | (values > high) | (values % multiple != 0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        rule = f"in [{low}, {high}]" + (f" and multiples of {multiple}" if multiple > 1 else "")
        raise ValueError(f"{name}[{index}] = {int(values[index])}: lengths must be {rule}")


def check_sample_lengths(sample_lengths, batch: int, total: int, hop_length: int) -> None:
    """``sample_lengths`` (B,) must be multiples of the hop in [hop, T] (T: the padded waveform's length).

    Shape and dtype are always checked; values when they are concrete (not inside ``jax.jit``).
    """
    _check("sample_lengths", sample_lengths, batch, hop_length, total, hop_length)


def check_frame_lengths(frame_lengths, batch: int, frames: int) -> None:
    """``frame_lengths`` (B,) must lie in [0, F] (F: the padded number of frames); checked like sample lengths."""
    _check("frame_lengths", frame_lengths, batch, 0, frames)


__all__ = ["check_frame_lengths", "check_sample_lengths", "padded_frames", "valid_samples", "whole_frames"]
