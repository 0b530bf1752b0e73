"""Compiled encode/decode: pure functions of ``(graphdef, state)`` under ``jax.jit``.

The module graph is merged only while tracing; each call after the first dispatches straight to the
compiled executable.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from .nn.codec import Xcodec2Codec
from .nn.layers import Array


@functools.partial(jax.jit, static_argnames="graphdef")
def encode(graphdef: nnx.GraphDef, state: nnx.State, waveform: Array, features: Array,
           sample_lengths: Array | None, feature_mask: Array | None) -> tuple[Array, Array]:
    """See :meth:`Xcodec2Codec.encode`: (codes (B, F) int32, latents (B, F, D))."""
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.encode(waveform, features, sample_lengths, feature_mask)


@functools.partial(jax.jit, static_argnames="graphdef")
def decode(graphdef: nnx.GraphDef, state: nnx.State, latents: Array, frame_lengths: Array | None) -> Array:
    """See :meth:`Xcodec2Codec.decode`: waveform (B, F * hop) float32."""
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.decode(latents, frame_lengths)


@functools.partial(jax.jit, static_argnames="graphdef")
def latents_from_codes(graphdef: nnx.GraphDef, state: nnx.State, codes: Array) -> Array:
    """codes (B, F) -> quantized latents (B, F, D)."""
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.latents_from_codes(codes)
