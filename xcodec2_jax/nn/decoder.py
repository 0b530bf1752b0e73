"""Vocos decoder: fc, embed conv, ResNet blocks, transformer, ResNet blocks, LayerNorm, (upsampler,) ISTFT head.

Channels-last, (B, F, C). ``mask`` (B, F, 1) marks each item's valid frames: convs see zeros after an
item's end, GroupNorm statistics and attention keys cover only its own frames, and the ISTFT overlap-add
(audio and window envelope) only sums its own frames, so decoding is padding-exact.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import Xcodec2Config
from .layers import (
    Array,
    Conv1d,
    GroupNorm,
    LayerNorm,
    Linear,
    Numerics,
    RMSNorm,
    activation,
    attention,
    attention_with_memory,
)


class ResNetBlock(nnx.Module):
    """x + conv(silu(gn(conv(silu(gn(x)))))) with k=3 convs: (B, F, C) -> (B, F, C)."""

    def __init__(self, config: Xcodec2Config, dim: int | None = None, *, numerics: Numerics, rngs: nnx.Rngs):
        dim, groups, eps = dim or config.hidden_size, config.group_norm_groups, config.group_norm_eps
        self.norm1 = GroupNorm(groups, dim, eps=eps, rngs=rngs)
        self.conv1 = Conv1d(dim, dim, 3, padding=(1, 1), numerics=numerics, rngs=rngs)
        self.norm2 = GroupNorm(groups, dim, eps=eps, rngs=rngs)
        self.conv2 = Conv1d(dim, dim, 3, padding=(1, 1), numerics=numerics, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None,
                 memory: tuple[Array, Array] | None = None) -> tuple[Array, tuple[Array, Array]]:
        """-> (B, F, C) and the two GroupNorms' input moments; ``memory``: their moments of other frames."""
        first, second = memory or (None, None)
        own = [self.norm1.moments(x, mask)]
        h = self.conv1(jax.nn.silu(self.norm1(x, mask, first)), mask)
        own.append(self.norm2.moments(h, mask))
        h = self.conv2(jax.nn.silu(self.norm2(h, mask, second)), mask)
        return x + h, (own[0], own[1])


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


class KeyValues(NamedTuple):
    """Keys (after RoPE) and values (B, heads, M, head_dim) of M frames, and which of them to attend to
    (B, M) bool. Heads lead so that a query block's scores read them without a transpose."""

    keys: Array
    values: Array
    mask: Array


class FrameMemory(NamedTuple):
    """What the window-wide parts of the decoder keep of M frames outside its input (streaming decode):
    per transformer layer the keys and values (B, heads, M, head_dim), per GroupNorm (prior_net then
    post_net, norm1 then norm2) its input's moments (B, M, groups, 3), and which frames to use (B, M) bool.
    """

    keys: list[Array]
    values: list[Array]
    moments: list[Array]
    mask: Array


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

    def __call__(self, x: Array, mask: Array | None, memory: KeyValues | None = None) -> tuple[Array, KeyValues]:
        """x (B, F, C), mask (B, F, 1) or None -> (B, F, C), and x's own keys and values.

        ``memory``: keys and values of other frames to attend to as well. The scores carry no position (see
        above), so frames decoded earlier can be attended to from their cached keys and values.
        """
        b, f, _ = x.shape
        split = lambda h: h.reshape(b, f, self.heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        cos, sin = (jnp.asarray(t, q.dtype) for t in rope_tables(self.heads, self.head_dim, self.rope_theta))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        heads_first = lambda h: h.transpose(0, 2, 1, 3)  # (B, F, H, D) <-> (B, H, F, D)
        own = KeyValues(heads_first(k), heads_first(v), jnp.ones((b, f), bool) if mask is None else mask[..., 0])
        if memory is None:
            out = attention(q, k, v, numerics=self.numerics, key_mask=None if mask is None else own.mask)
        else:
            out = heads_first(attention_with_memory(heads_first(q), own.keys, own.values, own.mask, memory.keys,
                                                    memory.values, memory.mask, numerics=self.numerics))
        return self.o_proj(out.reshape(b, f, -1)), own


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

    def __call__(self, x: Array, mask: Array | None, memory: KeyValues | None = None) -> tuple[Array, KeyValues]:
        """(B, F, C) -> (B, F, C) and the attention's own keys and values (see :class:`Attention`)."""
        h, own = self.self_attn(self.input_layernorm(x), mask, memory)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), own


def overlap_add(frames: Array, hop: int) -> Array:
    """Sum frames (B, F, N) placed every ``hop`` samples, N a multiple of hop -> (B, (F - 1) * hop + N)."""
    b, f, n = frames.shape
    per_frame = n // hop
    blocks = frames.reshape(b, f, per_frame, hop)
    out = sum(jnp.pad(blocks[:, :, r], ((0, 0), (r, per_frame - 1 - r), (0, 0))) for r in range(per_frame))
    return out.reshape(b, (f + per_frame - 1) * hop)


class ISTFTHead(nnx.Module):
    """Linear -> log-magnitude and phase -> irfft -> Hann window -> overlap-add with "same" padding.

    (B, F, C) -> (B, F * hop) float32, ``hop`` the config's ISTFT hop (320 X-Codec2, 480 NeuCodec at 24 kHz).
    Always float32, the linear included: exp(log-magnitude) turns a bf16 rounding of the linear's output
    into a relative error of up to ~1% of the spectrum.
    """

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, rngs: nnx.Rngs):
        self.linear = Linear(config.hidden_size, config.n_fft + 2, numerics=numerics.float32(), rngs=rngs)
        self.n_fft, self.hop = config.n_fft, config.istft_hop_length

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


class ConvTranspose1d(nnx.Module):
    """PyTorch's ConvTranspose1d with symmetric ``padding``, channels-last: (B, T, C_in) -> (B, T', C_out),
    ``T' = (T - 1) * stride + kernel_size - 2 * padding``.

    Computed as a convolution of the input dilated by ``stride`` with the kernel flipped in time. ``mask``
    (B, T, 1) zeroes padded frames first, so an item's first ``stride * length`` outputs are what it gets alone.
    """

    COMPUTE_DTYPE_WEIGHTS = ("kernel", "bias")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, *,
                 numerics: Numerics, rngs: nnx.Rngs):
        bound = (out_channels * kernel_size) ** -0.5  # PyTorch's fan-in of a transposed conv weight
        uniform = lambda shape: jax.random.uniform(rngs.params(), shape, numerics.param_dtype, -bound, bound)
        self.kernel = nnx.Param(uniform((kernel_size, in_channels, out_channels)))
        self.bias = nnx.Param(uniform((out_channels,)))
        self.stride, self.padding = stride, padding
        self.numerics = numerics

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        if mask is not None:
            x = x * mask.astype(x.dtype)
        edge = self.kernel.shape[0] - 1 - self.padding
        dtype = self.numerics.dtype
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), self.kernel[...][::-1].astype(dtype), window_strides=(1,), padding=((edge, edge),),
            lhs_dilation=(self.stride,), dimension_numbers=("NHC", "HIO", "NHC"), precision=self.numerics.precision,
        )
        return y + self.bias[...].astype(dtype)


class Upsampler(nnx.Module):
    """Decoder upsampler of the Anime-XCodec2 44.1 kHz family: (B, F, C) -> (B, F * prod(factors), C).

    Per stage a transposed conv (stride u, kernel k, padding (k - u) / 2) halving the channels and a ResNet
    block; then a Linear back to ``hidden_size`` and SiLU. ``mask`` (B, F, 1) is repeated to each new rate.
    """

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, rngs: nnx.Rngs):
        dim = config.hidden_size
        stages = list(enumerate(zip(config.upsample_factors, config.upsample_kernel_sizes, strict=True)))
        self.upsample_layers = nnx.List([
            ConvTranspose1d(dim >> i, dim >> (i + 1), k, u, (k - u) // 2, numerics=numerics, rngs=rngs)
            for i, (u, k) in stages
        ])
        self.resnet_blocks = nnx.List([ResNetBlock(config, dim >> (i + 1), numerics=numerics, rngs=rngs)
                                       for i, _ in stages])
        self.out_proj = Linear(dim >> len(stages), dim, numerics=numerics, rngs=rngs)
        self.factors = config.upsample_factors

    def __call__(self, x: Array, mask: Array | None) -> tuple[Array, Array | None]:
        """Returns the upsampled features and the mask at the output frame rate."""
        for upsample, block, factor in zip(self.upsample_layers, self.resnet_blocks, self.factors, strict=True):
            x = upsample(x, mask)
            mask = None if mask is None else jnp.repeat(mask, factor, axis=1)
            x, _ = block(x, mask)  # the upsampler's GroupNorms see only the window when streaming
        return jax.nn.silu(self.out_proj(x)), mask


class VocosDecoder(nnx.Module):
    """Quantized latents (B, F, hidden + semantic hidden) -> waveform (B, F * output hop) float32."""

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, rngs: nnx.Rngs):
        dim = config.hidden_size
        self.fc = Linear(config.quantization_dim, dim, numerics=numerics, rngs=rngs)
        self.embed = Conv1d(dim, dim, 7, padding=(3, 3), numerics=numerics, rngs=rngs)
        self.prior_net = nnx.List([ResNetBlock(config, numerics=numerics, rngs=rngs) for _ in range(2)])
        self.layers = nnx.List([TransformerLayer(config, numerics=numerics, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.post_net = nnx.List([ResNetBlock(config, numerics=numerics, rngs=rngs) for _ in range(2)])
        self.norm = LayerNorm(dim, eps=config.decoder_layer_norm_eps, rngs=rngs)
        self.upsampler = Upsampler(config, numerics=numerics, rngs=rngs) if config.upsample_factors else None
        self.head = ISTFTHead(config, numerics=numerics, rngs=rngs)

    def __call__(self, latents: Array, frame_lengths: Array | None = None) -> Array:
        """``frame_lengths`` (B,) valid frames per item, or None when all frames are valid."""
        return self.decode_with_memory(latents, frame_lengths)[0]

    def decode_with_memory(self, latents: Array, frame_lengths: Array | None = None,
                           memory: FrameMemory | None = None) -> tuple[Array, FrameMemory]:
        """As ``__call__``; with ``memory`` the attention and GroupNorm statistics also see those frames.

        Returns the waveform and the same quantities for these frames (their mask: the valid frames), for
        a streaming decoder to remember. Attention scores carry no position and GroupNorm statistics no
        order, so remembered frames need no position either.
        """
        mask = None
        if frame_lengths is not None:
            frames = jnp.arange(latents.shape[1])
            mask = frames[None, :, None] < frame_lengths[:, None, None]
        prior = len(self.prior_net)
        block_memory, layer_memory = [None] * (prior + len(self.post_net)), [None] * len(self.layers)
        if memory is not None:
            moments = [jnp.where(memory.mask[..., None, None], m, 0.0) for m in memory.moments]
            block_memory = list(zip(moments[::2], moments[1::2], strict=True))
            layer_memory = [KeyValues(k, v, memory.mask) for k, v in zip(memory.keys, memory.values, strict=True)]
        own_moments, own = [], []
        x = self.embed(self.fc(latents), mask)
        for block, remembered in zip(self.prior_net, block_memory[:prior], strict=True):
            x, block_moments = block(x, mask, remembered)
            own_moments += block_moments
        for layer, remembered in zip(self.layers, layer_memory, strict=True):
            x, keys_values = layer(x, mask, remembered)
            own.append(keys_values)
        for block, remembered in zip(self.post_net, block_memory[prior:], strict=True):
            x, block_moments = block(x, mask, remembered)
            own_moments += block_moments
        valid = jnp.ones(latents.shape[:2], bool) if mask is None else mask[..., 0] > 0
        memory_out = FrameMemory([kv.keys for kv in own], [kv.values for kv in own], own_moments, valid)
        x = self.norm(x)
        if self.upsampler is not None:
            x, mask = self.upsampler(x, mask)
        return self.head(x, mask), memory_out
