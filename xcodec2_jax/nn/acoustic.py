"""Acoustic encoder: BigCodec/DAC-style strided conv blocks with anti-aliased SnakeBeta activations.

Runs channels-first, (B, C, T), like the reference: the activations are FIRs along time, and slicing the
contiguous time axis is what XLA:CPU does fastest.

Padding-exact batching: given each item's valid length in samples, every convolution sees zeros after
the item's end (what its own zero padding would be) and every anti-aliased activation replicates the
item's own last value (what its own replicate padding would be), so an item's output does not depend on
the rest of its batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import Xcodec2Config
from . import acoustic_pallas
from .antialias import polyphase_xla, snake_parameters
from .layers import Array, Conv1d, Numerics, per_device, tpu_or_xla


class SnakeBeta(nnx.Module):
    """The log-scale SnakeBeta parameters (C,) of an activation: x + sin(x e^alpha)^2 / (e^beta + 1e-9)."""

    def __init__(self, channels: int, *, numerics: Numerics, rngs: nnx.Rngs):
        self.alpha = nnx.Param(0.1 * jax.random.normal(rngs.params(), (channels,), numerics.param_dtype))
        self.beta = nnx.Param(0.1 * jax.random.normal(rngs.params(), (channels,), numerics.param_dtype))


class AntiAliasedActivation(nnx.Module):
    """Upsample x2 -> SnakeBeta -> downsample x2 (see :mod:`.antialias`): (B, C, T) -> (B, C, T)."""

    def __init__(self, channels: int, *, numerics: Numerics, rngs: nnx.Rngs):
        self.act = SnakeBeta(channels, numerics=numerics, rngs=rngs)

    def __call__(self, x: Array, lengths: Array | None = None, *, zero_past_end: bool = False) -> Array:
        """x (B, C, T), lengths (B,) valid samples or None -> (B, C, T) in x's dtype.

        Computed in float32 whatever the compute dtype: it is memory-bound, so only its input and output
        are worth narrowing. The Pallas kernel when lowering for TPU, the XLA form elsewhere.
        ``zero_past_end``: zeros from each item's end on, the input a conv takes (see :func:`masked_conv`).
        """
        alpha, inv_beta = self.parameters()
        zero_past_end = zero_past_end and lengths is not None

        def xla(x: Array, lengths: Array | None) -> Array:
            y = polyphase_xla(x.astype(jnp.float32), alpha, inv_beta, lengths).astype(x.dtype)
            return jnp.where(time_mask(lengths, x.shape[-1]), y, 0) if zero_past_end else y

        kernel = functools.partial(acoustic_pallas.activation, zero_past_end=zero_past_end)
        return on_tpu(lambda x, full: per_device(kernel, x, full, replicated=(alpha, inv_beta)), xla, x, lengths)

    def parameters(self) -> tuple[Array, Array]:
        """(exp(alpha), 1 / (exp(beta) + 1e-9)), each (C, 1) float32."""
        return snake_parameters(self.act.alpha[...], self.act.beta[...])


def on_tpu(kernel: Callable[[Array, Array], Array], xla: Callable[[Array, Array | None], Array], x: Array,
           lengths: Array | None) -> Array:
    """``kernel(x, lengths)`` when lowering for TPU (lengths filled in when None), else ``xla(x, lengths)``;
    differentiable through the XLA form (:func:`.layers.tpu_or_xla`)."""
    full = jnp.full((x.shape[0],), x.shape[-1], jnp.int32) if lengths is None else lengths
    return tpu_or_xla(kernel, lambda x, full: xla(x, lengths), x, full)


def time_mask(lengths: Array | None, t: int) -> Array | None:
    """(B, 1, T) boolean mask of valid samples, or None when every sample is valid."""
    if lengths is None:
        return None
    return jnp.arange(t)[None, None, :] < lengths[:, None, None]


def masked_conv(conv: Conv1d, activation: AntiAliasedActivation, x: Array, lengths: Array | None) -> Array:
    """``conv(activation(x))`` with the conv's input zero past each item's end (padding-exact batching).

    The activation writes the zeros with its output: on TPU a separate mask would be one more read and
    write of the whole signal before the conv (v5e, full size, 8 x 6 s per chip: -1.38 GB per bf16 encode step).
    """
    return conv(activation(x, lengths, zero_past_end=True))


class ResidualUnit(nnx.Module):
    """x + conv_k1(act(conv_k7_dilated(act(x)))), length preserving."""

    def __init__(self, channels: int, dilation: int, *, numerics: Numerics, rngs: nnx.Rngs):
        self.snake1 = AntiAliasedActivation(channels, numerics=numerics, rngs=rngs)
        self.conv1 = Conv1d(channels, channels, 7, dilation=dilation, padding=(3 * dilation, 3 * dilation),
                            channels_first=True, numerics=numerics, rngs=rngs)
        self.snake2 = AntiAliasedActivation(channels, numerics=numerics, rngs=rngs)
        self.conv2 = Conv1d(channels, channels, 1, channels_first=True, numerics=numerics, rngs=rngs)

    def __call__(self, x: Array, lengths: Array | None = None) -> Array:
        """x (B, C, T) -> (B, C, T); on TPU one Pallas kernel (up to 384 channels)."""
        if x.shape[1] > acoustic_pallas.RESIDUAL_UNIT_MAX_CHANNELS:
            return self.xla(x, lengths)
        kernel = functools.partial(acoustic_pallas.residual_unit, dilation=self.conv1.dilation,
                                   precision=self.conv1.numerics.precision)
        params = (self.snake1.parameters(), (self.conv1.kernel[...], self.conv1.bias[...]), self.snake2.parameters(),
                  (self.conv2.kernel[...], self.conv2.bias[...]))
        dtype = self.conv1.numerics.dtype
        return on_tpu(lambda x, full: per_device(kernel, x.astype(dtype), full, replicated=params),
                      self.xla, x, lengths)

    def xla(self, x: Array, lengths: Array | None) -> Array:
        h = masked_conv(self.conv1, self.snake1, x, lengths)
        return x + self.conv2(self.snake2(h, lengths))


class EncoderBlock(nnx.Module):
    """Three residual units (dilation 1, 3, 9), activation, strided conv: (B, C, T) -> (B, 2C, T/stride)."""

    def __init__(self, channels: int, stride: int, *, numerics: Numerics, rngs: nnx.Rngs):
        self.res_unit1 = ResidualUnit(channels, 1, numerics=numerics, rngs=rngs)
        self.res_unit2 = ResidualUnit(channels, 3, numerics=numerics, rngs=rngs)
        self.res_unit3 = ResidualUnit(channels, 9, numerics=numerics, rngs=rngs)
        self.snake1 = AntiAliasedActivation(channels, numerics=numerics, rngs=rngs)
        pad = math.ceil(stride / 2)
        self.conv1 = Conv1d(channels, 2 * channels, 2 * stride, stride=stride, padding=(pad, pad),
                            channels_first=True, numerics=numerics, rngs=rngs)
        self.stride = stride

    def __call__(self, x: Array, lengths: Array | None = None) -> tuple[Array, Array | None]:
        """Returns the downsampled activations and the items' lengths at the new rate."""
        x = self.res_unit1(x, lengths)
        x = self.res_unit2(x, lengths)
        x = masked_conv(self.conv1, self.snake1, self.res_unit3(x, lengths), lengths)
        return x, None if lengths is None else lengths // self.stride


class AcousticEncoder(nnx.Module):
    """Waveform (B, 1, T) -> acoustic features (B, T / hop, hidden_size), channels-last at the end."""

    def __init__(self, config: Xcodec2Config, *, numerics: Numerics, rngs: nnx.Rngs):
        width = config.encoder_hidden_size
        self.conv1 = Conv1d(1, width, 7, padding=(3, 3), channels_first=True, numerics=numerics, rngs=rngs)
        self.block = nnx.List([
            EncoderBlock(width * 2**i, stride, numerics=numerics, rngs=rngs)
            for i, stride in enumerate(config.downsampling_ratios)
        ])
        width = config.acoustic_hidden_size
        self.snake1 = AntiAliasedActivation(width, numerics=numerics, rngs=rngs)
        self.conv2 = Conv1d(width, config.hidden_size, 3, padding=(1, 1), channels_first=True,
                            numerics=numerics, rngs=rngs)

    def __call__(self, waveform: Array, lengths: Array | None = None) -> Array:
        """``lengths`` (B,) valid samples per item (multiples of the hop length), or None."""
        x = on_tpu(self.mono_fir, lambda w, lengths: self.conv1(w, time_mask(lengths, w.shape[-1])), waveform, lengths)
        for block in self.block:
            x, lengths = block(x, lengths)
        return masked_conv(self.conv2, self.snake1, x, lengths).transpose(0, 2, 1)

    def mono_fir(self, waveform: Array, lengths: Array) -> Array:
        """conv1 on TPU: one input channel, so k broadcast multiply-adds, (B, 1, T) -> (B, C, T).

        A TPU convolution puts channels on the 128 lanes: with one input channel it would pad the
        waveform 128x. This is one elementwise pass writing the time-minor output the kernels read.
        """
        conv, t = self.conv1, waveform.shape[-1]
        dtype, (left, right) = conv.numerics.dtype, conv.padding
        x = jnp.where(time_mask(lengths, t), waveform.astype(dtype), 0)
        x = jnp.pad(x, ((0, 0), (0, 0), (left, right)))
        kernel = conv.kernel[...][:, 0, :, None].astype(dtype)  # (k, C, 1)
        out = sum(kernel[k] * x[..., k:k + t] for k in range(kernel.shape[0]))
        return out + conv.bias[...][:, None].astype(dtype)
