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

# Parts that a reduced-precision policy can keep in float32 (``float32_parts``). "quantizer_input" is
# fc_encoder -> project_in, whose output FSQ rounds to pick the codes.
PARTS = ("semantic_encoder", "semantic_adapter", "acoustic_encoder", "quantizer_input", "acoustic_decoder")
# The default bf16/fp16 policy, chosen from the agreement table in benchmarks/RESULTS.md (issue 10): with the
# acoustic encoder in float32 too, 98% of the codes equal float32's (45% without it, no better than all-bf16).
DEFAULT_FLOAT32_PARTS = ("quantizer_input", "acoustic_encoder")


class Xcodec2Codec(nnx.Module):
    """Semantic + acoustic encoders, fc_encoder, FSQ quantizer and Vocos decoder.

    ``numerics`` is the compute policy; the parts named in ``float32_parts`` (see :data:`PARTS`) compute
    in float32 whatever its dtype. Norms, FSQ, the anti-aliased activations and the ISTFT head always do.
    """

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics | None = None,
                 float32_parts: tuple[str, ...] = DEFAULT_FLOAT32_PARTS, rngs: nnx.Rngs):
        numerics = numerics or Numerics()
        unknown = sorted(set(float32_parts) - set(PARTS))
        if unknown:
            raise ValueError(f"float32_parts={unknown} are not parts of the codec; expected some of {PARTS}")
        part = lambda name: numerics.float32() if name in float32_parts else numerics
        fused = config.hidden_size + config.semantic.hidden_size
        self.semantic_encoder = SemanticEncoder(config.semantic, numerics=part("semantic_encoder"), rngs=rngs)
        self.semantic_adapter = SemanticAdapter(config.semantic, numerics=part("semantic_adapter"), rngs=rngs)
        self.acoustic_encoder = AcousticEncoder(config, numerics=part("acoustic_encoder"), rngs=rngs)
        self.fc_encoder = Linear(fused, fused, numerics=part("quantizer_input"), rngs=rngs)
        self.quantizer = Quantizer(config, numerics=part("acoustic_decoder"),
                                   input_numerics=part("quantizer_input"), rngs=rngs)
        self.acoustic_decoder = VocosDecoder(config, numerics=part("acoustic_decoder"), rngs=rngs)
        self.hop_length = config.hop_length
        self.semantic_frame_lag = config.semantic_frame_lag
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
            feature_mask: (B, F_s) valid semantic frames, or None (all valid).

        ``F_s`` is ``T / hop`` (NeuCodec: ``T / hop - 1``, its features skip the edge padding); both branches
        are trimmed to the shorter one, as NeuCodec does.

        Returns:
            codes (B, F) int32 and latents (B, F, hidden + semantic hidden) in the compute dtype.
        """
        semantic_mask = None
        if sample_lengths is not None:
            check_sample_lengths(sample_lengths, waveform.shape[0], waveform.shape[-1], self.hop_length)
            frames = jnp.arange(features.shape[1])
            semantic_frames = sample_lengths // self.hop_length - self.semantic_frame_lag
            semantic_mask = frames[None, :] < semantic_frames[:, None]
        # Each layer casts its input to its own compute dtype.
        semantic = self.semantic_encoder(features, feature_mask)
        semantic = self.semantic_adapter(semantic, semantic_mask)
        acoustic = self.acoustic_encoder(waveform, sample_lengths)
        frames = min(semantic.shape[1], acoustic.shape[1])
        return self.quantize(semantic[:, :frames], acoustic[:, :frames])

    def quantize(self, semantic: Array, acoustic: Array) -> tuple[Array, Array]:
        """Semantic (B, F, semantic hidden) and acoustic (B, F, hidden) features -> (codes, latents)."""
        fused = self.fc_encoder(jnp.concatenate([semantic, acoustic.astype(semantic.dtype)], axis=-1))
        latents, codes = self.quantizer(fused)
        return codes, latents

    def decode(self, latents: Array, frame_lengths: Array | None = None) -> Array:
        """Quantized latents (B, F, D) -> waveform (B, F * output hop) float32.

        ``frame_lengths`` (B,) valid frames per item in [0, F] makes decoding padding-exact; None: all valid.
        """
        if frame_lengths is not None:
            check_frame_lengths(frame_lengths, latents.shape[0], latents.shape[1])
        return self.acoustic_decoder(latents, frame_lengths)

    def latents_from_codes(self, codes: Array) -> Array:
        """codes (B, F) int -> quantized latents (B, F, D)."""
        return self.quantizer.from_indices(codes)
