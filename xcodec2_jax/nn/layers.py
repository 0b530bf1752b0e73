"""Small building blocks shared by every component: numerics policy, Linear, Conv1d, norms.

Parameter layouts follow Flax conventions: Linear kernels are (in, out), Conv1d kernels are
(kernel_size, in / groups, out). Every matmul and convolution receives the policy's ``precision``
explicitly: on GPU/TPU the default precision is TF32/bf16-like and flips about 2% of the codes, so the
float32 policy asks for ``HIGHEST`` op by op instead of flipping a global flag.

Masks are float arrays of 0/1 broadcastable to the activations (``(B, T, 1)`` channels-last,
``(B, 1, T)`` channels-first). A conv given a mask zeroes masked positions first, so an item's zero
padding inside a batch looks exactly like the zero padding it would get alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Compute dtype and matmul/conv precision. Norms, FSQ and the ISTFT always run in float32."""

    dtype: jnp.dtype = jnp.float32
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @classmethod
    def for_dtype(cls, dtype) -> Numerics:
        """float32 -> full-precision ops; bfloat16/float16 -> the backend's fast default."""
        dtype = jnp.dtype(dtype)
        if dtype == jnp.float32:
            return cls(jnp.float32, jax.lax.Precision.HIGHEST)
        if dtype in (jnp.bfloat16, jnp.float16):
            return cls(dtype, jax.lax.Precision.DEFAULT)
        raise ValueError(f"dtype={dtype} is not supported; expected float32, bfloat16 or float16")


def activation(name: str) -> Callable[[Array], Array]:
    """The elementwise activation named in a Transformers config (ACT2FN names)."""
    return {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    }[name]


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float, dtype) -> Array:
    return jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)


class Linear(nnx.Module):
    """``x @ kernel + bias``: (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 numerics: Numerics, rngs: nnx.Rngs):
        bound = 1 / math.sqrt(in_features)
        self.kernel = nnx.Param(_uniform(rngs, (in_features, out_features), bound, numerics.dtype))
        self.bias = nnx.Param(_uniform(rngs, (out_features,), bound, numerics.dtype)) if use_bias else None
        self.numerics = numerics

    def __call__(self, x: Array) -> Array:
        x = x.astype(self.numerics.dtype)
        y = jnp.matmul(x, self.kernel[...], precision=self.numerics.precision)
        return y if self.bias is None else y + self.bias[...]


class Conv1d(nnx.Module):
    """1-D convolution with explicit (left, right) zero padding, stride, dilation and groups.

    ``channels_first=False``: (B, T, C_in) -> (B, T', C_out); ``True``: (B, C_in, T) -> (B, C_out, T').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: tuple[int, int] = (0, 0), dilation: int = 1, groups: int = 1,
                 use_bias: bool = True, channels_first: bool = False, numerics: Numerics, rngs: nnx.Rngs):
        bound = math.sqrt(groups / (in_channels * kernel_size))
        shape = (kernel_size, in_channels // groups, out_channels)
        self.kernel = nnx.Param(_uniform(rngs, shape, bound, numerics.dtype))
        self.bias = nnx.Param(_uniform(rngs, (out_channels,), bound, numerics.dtype)) if use_bias else None
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.channels_first = channels_first
        self.numerics = numerics

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        if mask is not None:
            x = x * mask.astype(x.dtype)
        layout = ("NCH", "HIO", "NCH") if self.channels_first else ("NHC", "HIO", "NHC")
        y = jax.lax.conv_general_dilated(
            x.astype(self.numerics.dtype), self.kernel[...],
            window_strides=(self.stride,), padding=(self.padding,), rhs_dilation=(self.dilation,),
            dimension_numbers=layout, feature_group_count=self.groups, precision=self.numerics.precision,
        )
        if self.bias is None:
            return y
        return y + (self.bias[...][:, None] if self.channels_first else self.bias[...])


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32, returned in the input dtype."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs):
        del rngs  # deterministic init, kept for a uniform constructor signature
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.scale[...] + self.bias[...]).astype(x.dtype)


class RMSNorm(nnx.Module):
    """T5/Llama RMSNorm: normalise in float32, cast back, then scale (Transformers' order)."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs):
        del rngs
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        return (self.scale[...] * h.astype(x.dtype)).astype(x.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over (time, channels-in-group) of (B, T, C), float32 statistics.

    With ``mask`` (B, T, 1) the statistics use only each item's valid frames, which is what that item
    would get if it were normalised alone. With ``memory`` (streaming decode) they also pool the
    :meth:`moments` of frames outside ``x``.
    """

    def __init__(self, num_groups: int, features: int, *, eps: float, rngs: nnx.Rngs):
        del rngs
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.num_groups, self.eps = num_groups, eps

    def __call__(self, x: Array, mask: Array | None = None, memory: Array | None = None) -> Array:
        """x (B, T, C); mask (B, T, 1) or None; memory (B, M, groups, 3) moments of other frames or None."""
        b, t, c = x.shape
        h = x.astype(jnp.float32).reshape(b, t, self.num_groups, c // self.num_groups)
        if memory is not None:
            # Chan et al.'s pooling of per-frame (count, mean, squared deviations): no cancellation.
            count, frame_mean, deviations = jnp.moveaxis(jnp.concatenate([memory, self.moments(x, mask)], 1), -1, 0)
            total = jnp.maximum(count.sum(1), 1)
            mean = (count * frame_mean).sum(1) / total
            var = (deviations + count * jnp.square(frame_mean - mean[:, None])).sum(1) / total
            mean, var = mean[:, None, :, None], var[:, None, :, None]
        elif mask is None:
            mean = h.mean((1, 3), keepdims=True)
            var = jnp.square(h - mean).mean((1, 3), keepdims=True)
        else:
            w = mask.astype(jnp.float32)[..., None]  # (B, T, 1, 1)
            count = w.sum(1, keepdims=True) * (c // self.num_groups)
            mean = (h * w).sum((1, 3), keepdims=True) / count
            var = (jnp.square(h - mean) * w).sum((1, 3), keepdims=True) / count
        h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, t, c)
        return (h * self.scale[...] + self.bias[...]).astype(x.dtype)

    def moments(self, x: Array, mask: Array | None = None) -> Array:
        """Per frame and group: (values counted, their mean, sum of squared deviations from it), float32
        (B, T, groups, 3); zeros for masked frames. What ``memory`` holds."""
        b, t, c = x.shape
        h = x.astype(jnp.float32).reshape(b, t, self.num_groups, c // self.num_groups)
        mean = h.mean(-1)
        count = jnp.full_like(mean, c // self.num_groups)
        frame = jnp.stack([count, mean, jnp.square(h - mean[..., None]).sum(-1)], axis=-1)
        return frame if mask is None else jnp.where(mask[..., None] > 0, frame, 0.0)
