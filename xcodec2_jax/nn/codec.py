"""The whole X-Codec2 as one NNX module: the encode / decode math and nothing else.

Attribute names mirror Transformers' ``Xcodec2Model`` so the checkpoint table in ``weights.py`` stays a
short list of layout rules. Everything here is jit-friendly: shapes are static, per-item lengths are
arrays.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ..config import Xcodec2Config
from ..lengths import check_frame_lengths, check_sample_lengths
from .acoustic import AcousticEncoder
from .decoder import VocosDecoder
from .layers import Array, Linear, Numerics
from .quantizer import Quantizer
from .semantic import SemanticAdapter, SemanticEncoder


class Xcodec2Codec(nnx.Module):
    """Semantic + acoustic encoders, fc_encoder, FSQ quantizer and Vocos decoder."""

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics | None = None, rngs: nnx.Rngs):
        numerics = numerics or Numerics()
        fused = config.hidden_size + config.semantic.hidden_size
        self.semantic_encoder = SemanticEncoder(config.semantic, numerics=numerics, rngs=rngs)
        self.semantic_adapter = SemanticAdapter(config.semantic, numerics=numerics, rngs=rngs)
        self.acoustic_encoder = AcousticEncoder(config, numerics=numerics, rngs=rngs)
        self.fc_encoder = Linear(fused, fused, numerics=numerics, rngs=rngs)
        self.quantizer = Quantizer(config, numerics=numerics, rngs=rngs)
        self.acoustic_decoder = VocosDecoder(config, numerics=numerics, rngs=rngs)
        self.hop_length = config.hop_length
        self.numerics = numerics

    def encode(self, waveform: Array, features: Array, sample_lengths: Array | None = None,
               feature_mask: Array | None = None) -> tuple[Array, Array]:
        """Waveform and stacked log-mel features -> (codes, quantized latents).

        Args:
            waveform: (B, 1, T) float, T a multiple of the hop length.
            features: (B, T / hop, 160) float, stacked log-mel frames.
            sample_lengths: (B,) int valid samples per item (multiples of the hop in [hop, T]), or None.
                When given, every item is encoded exactly as if it were alone (padding-exact batching). Other
                values raise ``ValueError`` when they are concrete (they cannot be checked under ``jit``).
            feature_mask: (B, T / hop) valid semantic frames, or None (all valid).

        Returns:
            codes (B, F) int32 and latents (B, F, hidden + semantic hidden) in the compute dtype.
        """
        frame_mask = None
        if sample_lengths is not None:
            check_sample_lengths(sample_lengths, waveform.shape[0], waveform.shape[-1], self.hop_length)
            frames = jnp.arange(features.shape[1])
            frame_mask = frames[None, :] < (sample_lengths // self.hop_length)[:, None]
        semantic = self.semantic_encoder(features.astype(self.numerics.dtype), feature_mask)
        semantic = self.semantic_adapter(semantic, frame_mask)
        acoustic = self.acoustic_encoder(waveform.astype(self.numerics.dtype), sample_lengths)
        fused = self.fc_encoder(jnp.concatenate([semantic, acoustic.astype(semantic.dtype)], axis=-1))
        latents, codes = self.quantizer(fused)
        return codes, latents

    def decode(self, latents: Array, frame_lengths: Array | None = None) -> Array:
        """Quantized latents (B, F, D) -> waveform (B, F * hop) float32.

        ``frame_lengths`` (B,) valid frames per item in [0, F] makes decoding padding-exact; None: all valid.
        """
        if frame_lengths is not None:
            check_frame_lengths(frame_lengths, latents.shape[0], latents.shape[1])
        return self.acoustic_decoder(latents.astype(self.numerics.dtype), frame_lengths)

    def latents_from_codes(self, codes: Array) -> Array:
        """codes (B, F) int -> quantized latents (B, F, D)."""
        return self.quantizer.from_indices(codes)
