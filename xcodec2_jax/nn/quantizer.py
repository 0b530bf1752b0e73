"""Finite scalar quantization (FSQ) with X-Codec2's projections: one code in [0, prod(levels)) per frame.

FSQ always runs in float32. Quirk kept for parity: ``bound`` is applied twice (once by the quantizer
wrapper "for consistency with the original checkpoint", once inside FSQ) before rounding.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import Xcodec2Config
from .layers import Array, Linear, Numerics

BOUND_EPS = 1e-3


class FSQ:
    """Per-dimension constants of an FSQ with the given levels (float32, as the reference)."""

    def __init__(self, levels: tuple[int, ...]):
        levels_f = np.asarray(levels, np.float32)
        self.levels = np.asarray(levels, np.int32)
        self.half_width = (self.levels // 2).astype(np.float32)
        self.half_range = (levels_f - 1) * np.float32(1 + BOUND_EPS) / np.float32(2)
        self.offset = np.where(self.levels % 2 == 0, np.float32(0.5), np.float32(0.0)).astype(np.float32)
        self.shift = np.arctanh(self.offset / self.half_range).astype(np.float32)
        self.basis = np.cumprod([1, *levels[:-1]]).astype(np.int32)

    def bound(self, z: Array) -> Array:
        """Soft-clip to [-(L-1)/2, (L-1)/2] (shifted by 0.5 for even L) with a scaled tanh."""
        return jnp.tanh(z + self.shift) * self.half_range - self.offset

    def quantize(self, z: Array) -> tuple[Array, Array]:
        """z (..., D) float32, already bounded once -> (codes in [-1, 1] (..., D), indices (...) int32)."""
        rounded = jnp.round(self.bound(z))
        codes = rounded / self.half_width
        indices = ((codes * self.half_width + self.half_width) * self.basis).sum(-1)
        return codes, indices.astype(jnp.int32)

    def codes_from_indices(self, indices: Array) -> Array:
        """indices (...) int -> codes (..., D) float32 in [-1, 1]: the codebook, computed not stored."""
        level_index = (indices[..., None] // self.basis) % self.levels
        return (level_index - self.half_width) / self.half_width


class Quantizer(nnx.Module):
    """project_in -> bound -> FSQ -> project_out, and the inverse path from indices."""

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, input_numerics: Numerics | None = None,
                 rngs: nnx.Rngs):
        """``input_numerics``: project_in's policy (its output picks the codes), default ``numerics``."""
        dims = len(config.quantization_levels)
        self.project_in = Linear(config.quantization_dim, dims, numerics=input_numerics or numerics, rngs=rngs)
        self.project_out = Linear(dims, config.quantization_dim, numerics=numerics, rngs=rngs)
        self.levels = tuple(config.quantization_levels)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        """x (B, F, quantization_dim) -> (quantized latents (B, F, quantization_dim), indices (B, F))."""
        fsq = FSQ(self.levels)
        z = fsq.bound(self.project_in(x).astype(jnp.float32))
        codes, indices = fsq.quantize(z)
        return self.project_out(codes), indices

    def from_indices(self, indices: Array) -> Array:
        """indices (B, F) int -> quantized latents (B, F, quantization_dim)."""
        return self.project_out(FSQ(self.levels).codes_from_indices(indices))
