"""Vocos decoder: fc, embed conv, ResNet blocks, transformer, ResNet blocks, LayerNorm, ISTFT head.

Channels-last, (B, F, C). ``mask`` (B, F, 1) marks each item's valid frames: convs see zeros after an
item's end, GroupNorm statistics and attention keys cover only its own frames, and the ISTFT overlap-add
(audio and window envelope) only sums its own frames, so decoding is padding-exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import Xcodec2Config
from .layers import Array, Conv1d, GroupNorm, LayerNorm, Linear, Numerics, RMSNorm, activation, attention


class ResNetBlock(nnx.Module):
    """x + conv(silu(gn(conv(silu(gn(x)))))) with k=3 convs: (B, F, C) -> (B, F, C)."""

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, rngs: nnx.Rngs):
        dim, groups, eps = config.hidden_size, config.group_norm_groups, config.group_norm_eps
        self.norm1 = GroupNorm(groups, dim, eps=eps, rngs=rngs)
        self.conv1 = Conv1d(dim, dim, 3, padding=(1, 1), numerics=numerics, rngs=rngs)
        self.norm2 = GroupNorm(groups, dim, eps=eps, rngs=rngs)
        self.conv2 = Conv1d(dim, dim, 3, padding=(1, 1), numerics=numerics, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x, mask)), mask)
        h = self.conv2(jax.nn.silu(self.norm2(h, mask)), mask)
        return x + h


@functools.cache
def rope_tables(heads: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (heads, head_dim) float32 for rotary angles ``head_index * inv_freq``."""
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    angles = np.arange(heads, dtype=np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


@functools.cache
def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window (n,) float32, as ``torch.hann_window(n)``."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Attention(nnx.Module):
    """Bidirectional multi-head attention with X-Codec2's RoPE.

    The rotary angle of every query/key is its *head index* times the inverse frequencies, not its time
    step: the reference builds position ids as ``arange(num_attention_heads)`` and broadcasts over heads.
    The same rotation is applied to a head's queries and keys, so it barely changes the scores; it is
    kept anyway for bit-level parity with Transformers.
    """

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, rngs: nnx.Rngs):
        dim, heads, head_dim, bias = config.hidden_size, config.num_attention_heads, config.head_dim, \
            config.attention_bias
        self.q_proj = Linear(dim, heads * head_dim, use_bias=bias, numerics=numerics, rngs=rngs)
        self.k_proj = Linear(dim, heads * head_dim, use_bias=bias, numerics=numerics, rngs=rngs)
        self.v_proj = Linear(dim, heads * head_dim, use_bias=bias, numerics=numerics, rngs=rngs)
        self.o_proj = Linear(heads * head_dim, dim, use_bias=bias, numerics=numerics, rngs=rngs)
        self.heads, self.head_dim = heads, head_dim
        self.rope_theta = config.rope_theta
        self.numerics = numerics

    def __call__(self, x: Array, mask: Array | None) -> Array:
        """x (B, F, C), mask (B, F, 1) or None -> (B, F, C)."""
        b, f, _ = x.shape
        split = lambda h: h.reshape(b, f, self.heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        cos, sin = (jnp.asarray(t, q.dtype) for t in rope_tables(self.heads, self.head_dim, self.rope_theta))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = attention(q, k, v, numerics=self.numerics, key_mask=None if mask is None else mask[..., 0])
        return self.o_proj(out.reshape(b, f, -1))


class MLP(nnx.Module):
    """fc1 -> activation -> fc2, no biases (not gated)."""

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, rngs: nnx.Rngs):
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, use_bias=False, numerics=numerics,
                          rngs=rngs)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, use_bias=False, numerics=numerics,
                          rngs=rngs)
        self.act = activation(config.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nnx.Module):
    """Pre-norm (RMSNorm) attention and MLP with residuals."""

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, rngs: nnx.Rngs):
        self.self_attn = Attention(config, numerics=numerics, rngs=rngs)
        self.mlp = MLP(config, numerics=numerics, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None) -> Array:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def overlap_add(frames: Array, hop: int) -> Array:
    """Sum frames (B, F, N) placed every ``hop`` samples, N a multiple of hop -> (B, (F - 1) * hop + N)."""
    b, f, n = frames.shape
    per_frame = n // hop
    blocks = frames.reshape(b, f, per_frame, hop)
    out = sum(jnp.pad(blocks[:, :, r], ((0, 0), (r, per_frame - 1 - r), (0, 0))) for r in range(per_frame))
    return out.reshape(b, (f + per_frame - 1) * hop)


class ISTFTHead(nnx.Module):
    """Linear -> log-magnitude and phase -> irfft -> Hann window -> overlap-add with "same" padding.

    (B, F, C) -> (B, F * hop) float32. Always float32, the linear included: exp(log-magnitude) turns a
    bf16 rounding of the linear's output into a relative error of up to ~1% of the spectrum.
    """

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, rngs: nnx.Rngs):
        self.linear = Linear(config.hidden_size, config.n_fft + 2, numerics=numerics.float32(), rngs=rngs)
        self.n_fft, self.hop = config.n_fft, config.hop_length

    def __call__(self, x: Array, mask: Array | None) -> Array:
        spec = self.linear(x).astype(jnp.float32)
        magnitude, phase = jnp.split(spec, 2, axis=-1)
        magnitude = jnp.minimum(jnp.exp(magnitude), 1e2)
        frames = jnp.fft.irfft(jax.lax.complex(magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)),
                               n=self.n_fft, axis=-1)
        window = jnp.asarray(hann_window(self.n_fft))
        envelope = jnp.broadcast_to(jnp.square(window), frames.shape)
        frames = frames * window
        if mask is not None:
            frames, envelope = jnp.where(mask, frames, 0), jnp.where(mask, envelope, 0)
        audio, envelope = overlap_add(frames, self.hop), overlap_add(envelope, self.hop)
        crop = (self.n_fft - self.hop) // 2
        audio, envelope = audio[:, crop:-crop], envelope[:, crop:-crop]
        return audio / jnp.maximum(envelope, 1e-11)


class VocosDecoder(nnx.Module):
    """Quantized latents (B, F, hidden + semantic hidden) -> waveform (B, F * hop) float32."""

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, rngs: nnx.Rngs):
        dim = config.hidden_size
        self.fc = Linear(config.quantization_dim, dim, numerics=numerics, rngs=rngs)
        self.embed = Conv1d(dim, dim, 7, padding=(3, 3), numerics=numerics, rngs=rngs)
        self.prior_net = nnx.List([ResNetBlock(config, numerics=numerics, rngs=rngs) for _ in range(2)])
        self.layers = nnx.List([TransformerLayer(config, numerics=numerics, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.post_net = nnx.List([ResNetBlock(config, numerics=numerics, rngs=rngs) for _ in range(2)])
        self.norm = LayerNorm(dim, eps=config.decoder_layer_norm_eps, rngs=rngs)
        self.head = ISTFTHead(config, numerics=numerics, rngs=rngs)

    def __call__(self, latents: Array, frame_lengths: Array | None = None) -> Array:
        """``frame_lengths`` (B,) valid frames per item, or None when all frames are valid."""
        mask = None
        if frame_lengths is not None:
            frames = jnp.arange(latents.shape[1])
            mask = frames[None, :, None] < frame_lengths[:, None, None]
        x = self.embed(self.fc(latents), mask)
        for block in self.prior_net:
            x = block(x, mask)
        for layer in self.layers:
            x = layer(x, mask)
        for block in self.post_net:
            x = block(x, mask)
        return self.head(self.norm(x), mask)
