"""Small building blocks shared by every component: numerics policy, Linear, Conv1d, norms.

Parameter layouts follow Flax conventions: Linear kernels are (in, out), Conv1d kernels are
(kernel_size, in / groups, out). Every matmul and convolution receives the policy's ``precision``
explicitly: on GPU/TPU the default precision is TF32 / one bf16 pass and flips many codes (16% / 49% on
the random full-size model, emulated), so the float32 policy asks for ``HIGHEST`` op by op instead of
flipping a global flag.

Masks are boolean arrays broadcastable to the activations (``(B, T, 1)`` channels-last, ``(B, 1, T)``
channels-first). A conv given a mask zeroes masked positions first (with ``jnp.where``, so a NaN or Inf
in the padding cannot leak into valid frames), so an item's zero padding inside a batch looks exactly
like the zero padding it would get alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from . import attention_cpu, attention_pallas
from .attention_terms import relative_distance

Array = jax.Array


PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
}


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Compute dtype, parameter storage dtype and matmul/conv precision of a layer.

    ``precision`` (see :data:`PRECISIONS`) applies to float32 operands: on TPU "highest" is 6 bf16 passes
    (float32 accuracy), "high" 3 passes (bf16x3, ~16 mantissa bits), "default" one bf16 pass; on NVIDIA
    GPUs "highest" is true float32 and "high"/"default" allow TF32. bfloat16 operands take one pass
    whatever the precision. Parameters are stored in ``param_dtype`` (float32) and cast to ``dtype`` where
    they are used. Norms, FSQ and the ISTFT always run in float32.
    """

    dtype: jnp.dtype = jnp.float32
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def create(cls, dtype=jnp.float32, precision: str | None = None) -> Numerics:
        """Validated constructor: ``dtype`` float32/bfloat16/float16, ``precision`` a key of PRECISIONS.

        ``precision=None``: :func:`default_precision` for JAX's default backend.
        """
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"dtype={dtype} is not supported; expected float32, bfloat16 or float16")
        if precision is None:
            precision = default_precision(dtype, jax.default_backend())
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not supported; expected one of {tuple(PRECISIONS)}")
        return cls(dtype, PRECISIONS[precision])

    def float32(self) -> Numerics:
        """The same policy computing in float32: for the layers whose outputs pick FSQ codes or feed the ISTFT."""
        return dataclasses.replace(self, dtype=jnp.float32)

    @property
    def precision_name(self) -> str:
        return next(name for name, p in PRECISIONS.items() if p == self.precision)


def default_precision(dtype, platform: str) -> str:
    """The precision of a model computing in ``dtype`` on ``platform`` when none is asked for: "highest",
    except for a bf16/fp16 model on TPU, "high": 3 bf16 passes instead of 6 for its float32 operands (its
    float32 parts, the ISTFT head's linear included; the decoded audio at "high" is not measured, the codes
    are).

    With the arithmetic emulated on the CPU (full-size random model), the default bf16 policy's codes agree
    with float32's as often at TPU "high" as at "highest" (98.1% vs 97.8%), but only 84% at GPU "high", which
    is TF32 (benchmarks/RESULTS.md, "Precision on accelerators").
    """
    return "high" if jnp.dtype(dtype) != jnp.float32 and platform == "tpu" else "highest"


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

    COMPUTE_DTYPE_WEIGHTS = ("kernel", "bias")

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 numerics: Numerics, rngs: nnx.Rngs):
        bound = 1 / math.sqrt(in_features)
        self.kernel = nnx.Param(_uniform(rngs, (in_features, out_features), bound, numerics.param_dtype))
        self.bias = nnx.Param(_uniform(rngs, (out_features,), bound, numerics.param_dtype)) if use_bias else None
        self.numerics = numerics

    def __call__(self, x: Array) -> Array:
        dtype = self.numerics.dtype
        y = jnp.matmul(x.astype(dtype), self.kernel[...].astype(dtype), precision=self.numerics.precision)
        return y if self.bias is None else y + self.bias[...].astype(dtype)


class Conv1d(nnx.Module):
    """1-D convolution with explicit (left, right) zero padding, stride, dilation and groups.

    ``channels_first=False``: (B, T, C_in) -> (B, T', C_out); ``True``: (B, C_in, T) -> (B, C_out, T').
    """

    COMPUTE_DTYPE_WEIGHTS = ("kernel", "bias")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: tuple[int, int] = (0, 0), dilation: int = 1, groups: int = 1,
                 use_bias: bool = True, channels_first: bool = False, numerics: Numerics, rngs: nnx.Rngs):
        bound = math.sqrt(groups / (in_channels * kernel_size))
        shape = (kernel_size, in_channels // groups, out_channels)
        self.kernel = nnx.Param(_uniform(rngs, shape, bound, numerics.param_dtype))
        self.bias = nnx.Param(_uniform(rngs, (out_channels,), bound, numerics.param_dtype)) if use_bias else None
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.channels_first = channels_first
        self.numerics = numerics

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """``mask`` boolean, broadcastable to ``x``: positions where it is False enter as zeros."""
        dtype = self.numerics.dtype
        x = x.astype(dtype) if mask is None else jnp.where(mask, x.astype(dtype), 0)
        layout = ("NCH", "HIO", "NCH") if self.channels_first else ("NHC", "HIO", "NHC")
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(dtype),
            window_strides=(self.stride,), padding=(self.padding,), rhs_dilation=(self.dilation,),
            dimension_numbers=layout, feature_group_count=self.groups, precision=self.numerics.precision,
        )
        if self.bias is None:
            return y
        bias = self.bias[...].astype(dtype)
        return y + (bias[:, None] if self.channels_first else bias)


def weights_in_compute_dtype(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.State:
    """``state`` with every weight that its layer only reads cast to its compute dtype stored in that dtype.

    A layer lists such weights in ``COMPUTE_DTYPE_WEIGHTS`` (its ``numerics.dtype`` casts them in every
    call). Casting them once when the weights are placed gives the same numbers, and a bfloat16 step then
    reads half the bytes for them and writes no casts (full-size decoder on a v5e chip, 8 x 6 s: 7.59 ->
    6.15 GB per step). Everything else, and every weight of a float32 model, is returned as is (the same
    arrays: no copy). Works on concrete and abstract (``jax.ShapeDtypeStruct``, under ``jax.eval_shape``)
    states; the model's own parameters stay in ``param_dtype``.
    """
    casts = {}
    for path, layer in nnx.iter_graph(nnx.merge(graphdef, state)):
        for name in getattr(layer, "COMPUTE_DTYPE_WEIGHTS", ()):
            weight = getattr(layer, name)
            if weight is not None and weight.get_value().dtype != layer.numerics.dtype:
                casts[(*path, name)] = layer.numerics.dtype
    return nnx.from_flat_state([(path, v.replace(v.get_value().astype(casts[path])) if path in casts else v)
                                for path, v in nnx.to_flat_state(state)])


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

    With ``mask`` (B, T, 1) boolean the statistics use only each item's valid frames, which is what that
    item would get if it were normalised alone; an item with no valid frame gets finite garbage, not NaN.
    With ``memory`` (streaming decode) they also pool the :meth:`moments` of frames outside ``x``.
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
            valid = mask[..., None]  # (B, T, 1, 1)
            count = jnp.maximum(valid.sum(1, keepdims=True), 1) * (c // self.num_groups)
            mean = jnp.where(valid, h, 0).sum((1, 3), keepdims=True) / count
            var = jnp.where(valid, jnp.square(h - mean), 0).sum((1, 3), keepdims=True) / count
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


def tpu_or_xla(kernel: Callable[..., Array], xla: Callable[..., Array], *operands: Array) -> Array:
    """``kernel(*operands)`` when lowering for TPU, ``xla(*operands)`` elsewhere; differentiable everywhere.

    Pallas kernels have no autodiff rule, and ``jax.lax.platform_dependent`` differentiates every branch, so
    the derivative is always the XLA form's (a loss through the decoder trains on TPU, GPU and CPU alike).
    Values the two functions close over (parameters) are hoisted with ``jax.closure_convert``, so gradients
    also reach them.
    """
    xla_fn, xla_consts = jax.closure_convert(xla, *operands)
    kernel_fn, kernel_consts = jax.closure_convert(kernel, *operands)
    counts = (len(operands), len(xla_consts))
    return _on_tpu(kernel_fn, xla_fn, counts, *operands, *xla_consts, *kernel_consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _on_tpu(kernel_fn: Callable, xla_fn: Callable, counts: tuple[int, int], *args: Array) -> Array:
    n, m = counts
    return jax.lax.platform_dependent(*args, tpu=lambda *a: kernel_fn(*a[:n], *a[n + m :]),
                                      default=lambda *a: xla_fn(*a[: n + m]))


def _on_tpu_forward(kernel_fn: Callable, xla_fn: Callable, counts: tuple[int, int], *args: Array):
    return _on_tpu(kernel_fn, xla_fn, counts, *args), args


def _on_tpu_backward(kernel_fn: Callable, xla_fn: Callable, counts: tuple[int, int], args: tuple, cotangent: Array):
    n, m = counts
    _, pullback = jax.vjp(xla_fn, *args[: n + m])
    return (*pullback(cotangent), *[None] * (len(args) - n - m))  # the kernel's own constants: unused by xla


_on_tpu.defvjp(_on_tpu_forward, _on_tpu_backward)


def per_device(fn: Callable[..., Array], *batched: Array, replicated: tuple = ()) -> Array:
    """``fn(*batched, *replicated)`` on each device's share of the batch (axis 0 of every ``batched`` array).

    Pallas (Mosaic) kernels cannot be partitioned by XLA: under a mesh (the engine's steps), ``fn`` runs in a
    ``shard_map`` with the batch split over all mesh axes and ``replicated`` (a tuple of pytrees) copied.
    Without a mesh, or when the batch does not split evenly, ``fn`` is called as is.
    """
    mesh = jax.typeof(batched[0]).sharding.mesh
    if mesh.size <= 1 or batched[0].shape[0] % mesh.size:
        return fn(*batched, *replicated)
    batch, whole = PartitionSpec(mesh.axis_names), PartitionSpec()
    return jax.shard_map(fn, mesh=mesh, in_specs=(*[batch] * len(batched), *[whole] * len(replicated)),
                         out_specs=batch, check_vma=False)(*batched, *replicated)


@dataclasses.dataclass(frozen=True)
class RelativeKey:
    """Shaw relative-key logits ``q_l . table[clip(r - l, -left, right) + left]`` (Wav2Vec2-BERT's)."""

    table: Array  # (left + right + 1, head_dim)
    left: int
    right: int

    def by_distance(self, query: Array, numerics: Numerics) -> Array:
        """q . table^T, one logit per distance: (B, T, H, D) -> (B, H, T, left + right + 1)."""
        return jnp.einsum("blhd,nd->bhln", query, self.table.astype(query.dtype), precision=numerics.precision)

    def logits(self, query: Array, numerics: Numerics) -> Array:
        """The (B, H, T, T) logits: each (l, r) picks its distance by a contraction with a one-hot
        (T, T, distances) built from iotas, a matmul rather than a gather (take_along_axis)."""
        distance = relative_distance(query.shape[1], self.left, self.right)
        by_distance = self.by_distance(query, numerics)
        one_hot = jax.nn.one_hot(distance, self.left + self.right + 1, dtype=by_distance.dtype)
        return jnp.einsum("bhln,lrn->bhlr", by_distance, one_hot, precision=numerics.precision)


# On XLA:CPU, attention over at least this many keys runs one (item, head) block at a time
# (:mod:`.attention_cpu`). Full-size decode step, batch 8, same process: 0.98x at 100 keys (2 s), 1.04x at
# 300, 1.14x at 600, 1.32x at 1000 (benchmarks/RESULTS.md, "Attention on XLA:CPU").
CPU_BLOCKED_MIN_KEYS = 256


def attention(query: Array, key: Array, value: Array, *, numerics: Numerics, relative: RelativeKey | None = None,
              key_mask: Array | None = None) -> Array:
    """Multi-head softmax attention, the one core every attention layer calls.

    Args:
        query, key, value: (B, T, H, D) and (B, S, H, D) in the compute dtype.
        relative: relative-key logits added to ``q . k`` before scaling (S == T), or None.
        key_mask: (B, S) boolean, False for keys no query may attend to (padding), or None.

    Returns (B, T, H, D): ``softmax((q . k + relative) / sqrt(D))`` over the valid keys, softmax in
    float32 (as Transformers).

    - GPU: ``jax.nn.dot_product_attention`` with its default implementation, XLA's (JAX does not choose
      cuDNN's flash kernel by itself; that kernel takes bf16/fp16 only).
    - CPU: the same below :data:`CPU_BLOCKED_MIN_KEYS` keys; from there :mod:`.attention_cpu`'s loop over
      (item, head) blocks, which keeps each block of scores in cache.
    - TPU: the Pallas flash-attention kernel of :mod:`.attention_pallas`, which builds the relative logits
      in VMEM instead of writing a (T, S) bias to HBM and reads q, k, v in the projections' layout. Plain
      attention too, at every length: the full-size bf16 decode step on a v5e chip moves fewer bytes with
      it than with XLA's attention from 0.5 to 30 s (2.12 against 2.27 GB at 0.5 s, 5.45 against 6.18 at
      6 s, 26.2 against 47.8 at 30 s; benchmarks/RESULTS.md, "Session 8").

    The layer's precision reaches every matmul: the kernels take it, and it is the default for the matmuls
    ``jax.nn.dot_product_attention`` traces (bf16 operands take one pass whatever it is).
    """
    scale = query.shape[-1] ** -0.5

    def xla(q: Array, k: Array, v: Array) -> Array:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        bias = None if relative is None else relative.logits(q, numerics) * scale
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)

    def blocked(kernel: Callable[..., Array], q: Array, k: Array, v: Array, *batched: Array,
                replicated: tuple = ()) -> Array:
        valid = jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask
        kernel = functools.partial(kernel, precision=numerics.precision,
                                   left=0 if relative is None else relative.left,
                                   right=0 if relative is None else relative.right)
        return per_device(kernel, q, k, v, valid, *batched, replicated=replicated)

    def on_cpu(q: Array, k: Array, v: Array) -> Array:  # the loop takes q . E^T per distance, item by item
        by_distance = () if relative is None else (relative.by_distance(q, numerics),)
        return blocked(attention_cpu.blocked_attention, q, k, v, *by_distance)

    def on_tpu(q: Array, k: Array, v: Array) -> Array:  # the kernel takes the table E and computes q . E^T
        return blocked(attention_pallas.flash_attention, q, k, v,
                       replicated=() if relative is None else (relative.table,))

    def not_tpu(q: Array, k: Array, v: Array) -> Array:
        if k.shape[1] < CPU_BLOCKED_MIN_KEYS:
            return xla(q, k, v)
        return jax.lax.platform_dependent(q, k, v, cpu=on_cpu, default=xla)

    precision = numerics.precision_name if query.dtype == jnp.float32 else "default"
    with jax.default_matmul_precision(precision):
        return tpu_or_xla(on_tpu, not_tpu, query, key, value)


def attention_with_memory(query: Array, key: Array, value: Array, key_mask: Array, memory_keys: Array,
                          memory_values: Array, memory_mask: Array, *, numerics: Numerics) -> Array:
    """:func:`attention` over two sets of keys at once, the window's own and a memory of other frames,
    without concatenating them (a streaming decoder's memory is large next to its window).

    Args:
        query, key, value: (B, H, T, D), the window's, in the compute dtype; key_mask (B, T) bool.
        memory_keys, memory_values: (B, H, M, D); memory_mask (B, M) bool.

    Returns (B, H, T, D): softmax over the valid keys of both sets (scores and softmax in float32), each set's
    share summed from its own exponentials. A query with no valid key at all gets the mean of the values
    (its row is padding, its output is discarded) rather than NaN.
    """
    scale = query.shape[-1] ** -0.5
    precision = numerics.precision if query.dtype == jnp.float32 else None
    lowest = jnp.finfo(jnp.float32).min
    parts = ((key, value, key_mask), (memory_keys.astype(query.dtype), memory_values.astype(query.dtype), memory_mask))
    scores = [jnp.where(mask[:, None, None, :], jnp.einsum("bhtd,bhsd->bhts", query, k, precision=precision,
                                                           preferred_element_type=jnp.float32) * scale, lowest)
              for k, _, mask in parts]
    top = jnp.maximum(*(s.max(axis=-1, keepdims=True) for s in scores))
    weights = [jnp.exp(s - top) for s in scores]
    total = sum(w.sum(axis=-1, keepdims=True) for w in weights)
    out = sum(jnp.einsum("bhts,bhsd->bhtd", w.astype(query.dtype), v, precision=precision,
                         preferred_element_type=jnp.float32) for w, (_, v, _) in zip(weights, parts, strict=True))
    return (out / total).astype(query.dtype)
