"""The anti-aliased SnakeBeta activation (upsample x2 -> SnakeBeta -> downsample x2): filters and XLA form.

:func:`polyphase_xla` computes the reference's replicate-pad / depthwise transposed conv / crop /
SnakeBeta / replicate-pad / depthwise strided conv in polyphase form, never building the 2x signal. It is
the reference implementation and the CPU/GPU path; the TPU kernels in :mod:`.acoustic_pallas` compute the
same numbers from the same constants.

Padding-exact batching: ``lengths`` (B,) gives each item's valid samples; the item's own last value is
replicated past its end (what its own replicate padding would be). Outputs past an item's end are finite
but meaningless.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

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
# with x indices clamped to the signal, where "past the end" of either phase means odd[-1] (the last
# sample of the 2x signal) and "before the start" means even[0] (its first sample).
UP_EVEN = tuple(2 * _FILTER[1::2])
UP_ODD = tuple(2 * _FILTER[0::2])
DOWN_EVEN = tuple(_FILTER[1::2])
DOWN_ODD = tuple(_FILTER[0::2])
PHASE_TAPS = FILTER_TAPS // RATIO


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


def snake_beta(x: Array, alpha: Array, inv_beta: Array) -> Array:
    """x + inv_beta * sin(alpha * x)^2, float32; alpha = exp(a), inv_beta = 1 / (exp(b) + 1e-9) per channel."""
    return x + inv_beta * sin_squared(x * alpha)


def snake_parameters(alpha: Array, beta: Array) -> tuple[Array, Array]:
    """Log-scale parameters (C,) -> (exp(alpha), 1 / (exp(beta) + 1e-9)) as (C, 1) float32."""
    alpha, beta = alpha.astype(jnp.float32), beta.astype(jnp.float32)
    return jnp.exp(alpha)[:, None], (1.0 / (jnp.exp(beta) + 1e-9))[:, None]


# ------------------------------------------------------------------------------------------ XLA form
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


def polyphase_xla(x: Array, alpha: Array, inv_beta: Array, lengths: Array | None) -> Array:
    """x (B, C, T) float32, alpha/inv_beta (C, 1), lengths (B,) or None -> (B, C, T) float32."""
    t = x.shape[-1]
    last = _last_valid(x, lengths)
    x = _hold_after_end(x, last, lengths)
    reach = PHASE_TAPS // 2  # 3 samples of replicate padding on each side cover both phases
    padded = jnp.concatenate([jnp.repeat(x[..., :1], reach, -1), x, jnp.repeat(last, reach, -1)], -1)
    even = snake_beta(_fir(padded, UP_EVEN, reach + 2, t, reverse=True), alpha, inv_beta)
    odd = snake_beta(_fir(padded, UP_ODD, reach + 3, t, reverse=True), alpha, inv_beta)

    end = _last_valid(odd, lengths)  # the last sample of the item's 2x signal
    even = _hold_after_end(even, end, lengths)
    odd = _hold_after_end(odd, end, lengths)
    start = even[..., :1]
    even = jnp.concatenate([jnp.repeat(start, 2, -1), even, jnp.repeat(end, 3, -1)], -1)
    odd = jnp.concatenate([jnp.repeat(start, 3, -1), odd, jnp.repeat(end, 2, -1)], -1)
    return _fir(even, DOWN_EVEN, 0, t, reverse=False) + _fir(odd, DOWN_ODD, 0, t, reverse=False)
