"""Acoustic encoder: BigCodec/DAC-style strided conv blocks with anti-aliased SnakeBeta activations.

Runs channels-first, (B, C, T), like the reference: the activations are FIRs along time, and slicing the
contiguous time axis is what XLA:CPU does fastest.

Padding-exact batching: given each item's valid length in samples, every convolution sees zeros after
the item's end (what its own zero padding would be) and every anti-aliased activation replicates the
item's own last value (what its own replicate padding would be), so an item's output does not depend on
the rest of its batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import Xcodec2Config
from .layers import Array, Conv1d, Numerics

# Anti-aliased activation: upsample x2 -> SnakeBeta -> downsample x2, both filters 12-tap kaiser-sinc.
RATIO = 2
FILTER_TAPS = 12


def kaiser_sinc_filter(cutoff: float, half_width: float, taps: int) -> np.ndarray:
    """Kaiser-windowed sinc low-pass filter (taps,), normalised to unit DC gain (float64)."""
    half = taps // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    t = np.arange(-half, half) + 0.5 if taps % 2 == 0 else np.arange(taps) - half
    h = 2 * cutoff * np.kaiser(taps, beta) * np.sinc(2 * cutoff * t)
    return h / h.sum()


_FILTER = kaiser_sinc_filter(cutoff=0.5 / RATIO, half_width=0.6 / RATIO, taps=FILTER_TAPS)
# Polyphase split (derived from the reference's replicate-pad(5) + transposed conv(stride 2) * 2 + crop(15)
# and replicate-pad(5, 6) + conv(stride 2)):
#   up_even[p] = sum_q UP_EVEN[q] * x[p + 2 - q]      up_odd[p] = sum_q UP_ODD[q] * x[p + 3 - q]
#   down[r]    = sum_q DOWN_EVEN[q] * even[r + q - 2] + sum_q DOWN_ODD[q] * odd[r + q - 3]
# with indices clamped to the signal, where "past the end" of either phase means odd[-1] (the last
# sample of the 2x signal) and "before the start" means even[0] (its first sample).
_UP_EVEN = tuple(2 * _FILTER[1::2])
_UP_ODD = tuple(2 * _FILTER[0::2])
_DOWN_EVEN = tuple(_FILTER[1::2])
_DOWN_ODD = tuple(_FILTER[0::2])
_PHASE_TAPS = FILTER_TAPS // RATIO


# sin(x)^2 = sin(x - k*pi)^2: reduce to r in [-pi/2, pi/2] with a two-part pi (Cody-Waite), then a
# degree-13 Taylor polynomial. XLA:CPU's jnp.sin is ~5x slower than these multiply-adds and the activation
# evaluates it on every sample of both phases; max abs error 2.4e-7 (torch.sin squared: 1.0e-7).
_PI_HI = 3.140625  # 8 significant bits: k * _PI_HI is exact for |k| < 2**15
_PI_LO = math.pi - _PI_HI
_SIN_TAYLOR = tuple((-1) ** n / math.factorial(2 * n + 1) for n in range(1, 7))


def sin_squared(x: Array) -> Array:
    """sin(x)**2 for float32 x (|x| < ~1e4), polynomial form."""
    k = jnp.round(x * (1 / math.pi))
    r = (x - k * _PI_HI) - k * _PI_LO
    r2 = r * r
    poly = _SIN_TAYLOR[-1]
    for c in reversed(_SIN_TAYLOR[:-1]):
        poly = c + r2 * poly
    sin_r = r + (r * r2) * poly
    return sin_r * sin_r


def _fir(padded: Array, taps: tuple[float, ...], start: int, length: int, reverse: bool) -> Array:
    """sum_q taps[q] * padded[..., start +/- q : ... + length], taps as Python floats (XLA constants)."""
    out = None
    for q, tap in enumerate(taps):
        offset = start - q if reverse else start + q
        term = padded[..., offset:offset + length] * jnp.asarray(tap, padded.dtype)
        out = term if out is None else out + term
    return out


def _last_valid(x: Array, lengths: Array | None) -> Array:
    """x[..., length - 1] per item, kept as (B, C, 1)."""
    if lengths is None:
        return x[..., -1:]
    index = jnp.broadcast_to((lengths - 1)[:, None, None], (*x.shape[:-1], 1))
    return jnp.take_along_axis(x, index, axis=-1)


def _hold_after_end(x: Array, value: Array, lengths: Array | None) -> Array:
    """Replace samples at or after each item's length with ``value`` (B, C, 1)."""
    if lengths is None:
        return x
    valid = jnp.arange(x.shape[-1])[None, None, :] < lengths[:, None, None]
    return jnp.where(valid, x, value)


class SnakeBeta(nnx.Module):
    """x + 1 / (exp(beta) + 1e-9) * sin(x * exp(alpha))^2, per channel, in float32."""

    def __init__(self, channels: int, *, numerics: Numerics, rngs: nnx.Rngs):
        self.alpha = nnx.Param(0.1 * jax.random.normal(rngs.params(), (channels,), numerics.param_dtype))
        self.beta = nnx.Param(0.1 * jax.random.normal(rngs.params(), (channels,), numerics.param_dtype))

    def __call__(self, x: Array) -> Array:
        """x (B, C, T) float32 -> (B, C, T) float32."""
        alpha = jnp.exp(self.alpha[...].astype(jnp.float32))[:, None]
        inv_beta = 1.0 / (jnp.exp(self.beta[...].astype(jnp.float32)) + 1e-9)[:, None]
        return x + inv_beta * sin_squared(x * alpha)


class AntiAliasedActivation(nnx.Module):
    """Upsample x2 -> SnakeBeta -> downsample x2, in polyphase form: the 2x signal is never built.

    Same numbers as the reference's replicate-pad / depthwise transposed conv / crop / SnakeBeta /
    replicate-pad / depthwise strided conv, at a fraction of the memory traffic. Computed in float32
    whatever the compute dtype: it is memory-bound, so only its input and output are worth narrowing.
    """

    def __init__(self, channels: int, *, numerics: Numerics, rngs: nnx.Rngs):
        self.act = SnakeBeta(channels, numerics=numerics, rngs=rngs)

    def __call__(self, x: Array, lengths: Array | None = None) -> Array:
        """x (B, C, T), lengths (B,) valid samples or None -> (B, C, T)."""
        dtype, x, t = x.dtype, x.astype(jnp.float32), x.shape[-1]
        last = _last_valid(x, lengths)
        x = _hold_after_end(x, last, lengths)
        reach = _PHASE_TAPS // 2  # 3 samples of replicate padding on each side cover both phases
        padded = jnp.concatenate([jnp.repeat(x[..., :1], reach, -1), x, jnp.repeat(last, reach, -1)], -1)
        even = self.act(_fir(padded, _UP_EVEN, reach + 2, t, reverse=True))
        odd = self.act(_fir(padded, _UP_ODD, reach + 3, t, reverse=True))

        end = _last_valid(odd, lengths)  # the last sample of the item's 2x signal
        even = _hold_after_end(even, end, lengths)
        odd = _hold_after_end(odd, end, lengths)
        start = even[..., :1]
        even = jnp.concatenate([jnp.repeat(start, 2, -1), even, jnp.repeat(end, 3, -1)], -1)
        odd = jnp.concatenate([jnp.repeat(start, 3, -1), odd, jnp.repeat(end, 2, -1)], -1)
        out = _fir(even, _DOWN_EVEN, 0, t, reverse=False) + _fir(odd, _DOWN_ODD, 0, t, reverse=False)
        return out.astype(dtype)


def time_mask(lengths: Array | None, t: int) -> Array | None:
    """(B, 1, T) boolean mask of valid samples, or None when every sample is valid."""
    if lengths is None:
        return None
    return jnp.arange(t)[None, None, :] < lengths[:, None, None]


class ResidualUnit(nnx.Module):
    """x + conv_k1(act(conv_k7_dilated(act(x)))), length preserving."""

    def __init__(self, channels: int, dilation: int, *, numerics: Numerics, rngs: nnx.Rngs):
        self.snake1 = AntiAliasedActivation(channels, numerics=numerics, rngs=rngs)
        self.conv1 = Conv1d(channels, channels, 7, dilation=dilation, padding=(3 * dilation, 3 * dilation),
                            channels_first=True, numerics=numerics, rngs=rngs)
        self.snake2 = AntiAliasedActivation(channels, numerics=numerics, rngs=rngs)
        self.conv2 = Conv1d(channels, channels, 1, channels_first=True, numerics=numerics, rngs=rngs)

    def __call__(self, x: Array, lengths: Array | None = None) -> Array:
        """x (B, C, T) -> (B, C, T)."""
        h = self.conv1(self.snake1(x, lengths), time_mask(lengths, x.shape[-1]))
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
        x = self.snake1(self.res_unit3(x, lengths), lengths)
        x = self.conv1(x, time_mask(lengths, x.shape[-1]))
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
        x = self.conv1(waveform, time_mask(lengths, waveform.shape[-1]))
        for block in self.block:
            x, lengths = block(x, lengths)
        x = self.snake1(x, lengths)
        x = self.conv2(x, time_mask(lengths, x.shape[-1]))
        return x.transpose(0, 2, 1)
