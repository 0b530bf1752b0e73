"""Pallas TPU kernels for the acoustic encoder: the anti-aliased activation and a whole residual unit.

On TPU, XLA runs the acoustic encoder badly: it cannot fuse the activation (a stencil of a stencil with a
nonlinearity in between) without materialising both phases, and its convolutions want channels on the
128 lanes, so every conv between two activations transposes its input and output, padding 48 channels
to 128. These kernels keep the time axis on the lanes (the model's channels-first layout) and work block
by block along time, with everything in between in VMEM:

* :func:`activation`: the anti-aliased activation alone. One read of the input (plus 2 x 128 halo
  samples per block) and one write.
* :func:`residual_unit`: ``x + conv_1x1(act(conv_k7_dilated(act(x))))`` in one kernel: one read of ``x``
  and one write, where the XLA form makes about a dozen passes. The convolutions are per-tap matmuls
  on the matrix unit.

They compute the same numbers as the XLA forms in :mod:`.antialias` and :mod:`.acoustic` (which stay the
reference and the CPU/GPU path; ``interpret=True`` runs the kernels on CPU for the tests), with the same
edge rules: an item's signal is replicated past its end (activations) or zero past its end (conv
inputs), decided per sample from its absolute position and the item's length, so every block can apply
them locally. Outputs past an item's end are finite but meaningless, as in the XLA forms (zero with
:func:`activation`'s ``zero_past_end``).

Reading a block: each grid step reads its time block plus 128 samples on each side (clamped to the
array; whatever lies outside the item is replaced by the edge rules), so the halo costs 256 / block of
extra reads. A signal that fits one block is read whole, without halos.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import kernel_matmul
from .antialias import DOWN_EVEN, DOWN_ODD, PHASE_TAPS, UP_EVEN, UP_ODD, snake_beta

Array = jax.Array

_LANES = 128
_HALO = _LANES  # samples read on each side of a time block (at most 54 are needed; 128 keeps DMAs aligned)
_MARGIN = 8  # phases are computed this far beyond the outputs that need them (3 would do)
_BLOCK_ELEMENTS = 1 << 16  # channels x samples per block: VMEM use and compile time grow with it
_VMEM_LIMIT = 64 * 1024 * 1024  # v5e and v6e have 128 MiB of VMEM; the default scoped limit is 16-32 MiB
_SMALLEST_BLOCK = 4 * _LANES


# ------------------------------------------------------------------------------------ in-kernel stages
def _positions(start, shape) -> Array:
    """Absolute sample positions of a (C, W) value whose first column is sample ``start``."""
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _value_at(values: Array, positions: Array, at) -> Array:
    """values[:, position == at] as (C, 1); 0 when ``at`` is not in the block (a masked sum, no gather)."""
    return jnp.sum(jnp.where(positions == at, values, 0.0), axis=-1, keepdims=True)


def _replicate_edges(values: Array, positions: Array, length) -> Array:
    """An item's replicate padding: its first value before sample 0, its last one from ``length`` on.

    The edge values are only needed where the block holds them: a block that needs the value at
    ``length - 1`` (or 0) always contains that position.
    """
    first, last = _value_at(values, positions, 0), _value_at(values, positions, length - 1)
    return jnp.where(positions >= length, last, jnp.where(positions < 0, first, values))


def _activation(src_ref, offset: int, start, width: int, length, alpha: Array, inv_beta: Array,
                even_ref, odd_ref) -> Array:
    """The anti-aliased activation at samples [start, start + width), float32 (C, width).

    ``src_ref`` holds the input, already replicate-padded to the item, with sample ``start`` at column
    ``offset``. Both phases are computed ``_MARGIN`` samples beyond the outputs, SnakeBeta applied, and
    held at the 2x signal's ends like the reference (``even[0]`` before, ``odd[length - 1]`` after).
    """
    wide = width + 2 * _MARGIN
    base = offset - _MARGIN

    def up(taps: tuple[float, ...], lead: int) -> Array:
        return sum(taps[q] * src_ref[:, base + lead - q:base + lead - q + wide] for q in range(PHASE_TAPS))

    even = snake_beta(up(UP_EVEN, 2), alpha, inv_beta)
    odd = snake_beta(up(UP_ODD, 3), alpha, inv_beta)
    positions = _positions(start - _MARGIN, even.shape)
    first, end = _value_at(even, positions, 0), _value_at(odd, positions, length - 1)
    hold = lambda phase: jnp.where(positions >= length, end, jnp.where(positions < 0, first, phase))
    even_ref[:, :wide], odd_ref[:, :wide] = hold(even), hold(odd)

    def down(taps: tuple[float, ...], ref, lag: int) -> Array:
        return sum(taps[q] * ref[:, _MARGIN + q - lag:_MARGIN + q - lag + width] for q in range(PHASE_TAPS))

    return down(DOWN_EVEN, even_ref, 2) + down(DOWN_ODD, odd_ref, 3)


def _load_window(window_ref, refs, block: int, halo: int, start, length) -> None:
    """Fill ``window_ref`` with samples [start - _HALO, start + block + _HALO), replicate-padded to the item."""
    if halo:
        before_ref, x_ref, after_ref = refs
        window_ref[:, :halo] = before_ref[0].astype(jnp.float32)
        window_ref[:, halo + block:] = after_ref[0].astype(jnp.float32)
    else:
        (x_ref,) = refs
    window_ref[:, _HALO:_HALO + block] = x_ref[0].astype(jnp.float32)
    x = window_ref[...]
    window_ref[...] = _replicate_edges(x, _positions(start - _HALO, x.shape), length)


def _activation_kernel(lengths_ref, alpha_ref, inv_beta_ref, *refs, block: int, halo: int, zero_past_end: bool):
    *inputs, out_ref, window_ref, even_ref, odd_ref = refs
    length, start = lengths_ref[pl.program_id(0)], pl.program_id(2) * block
    _load_window(window_ref, inputs, block, halo, start, length)
    out = _activation(window_ref, _HALO, start, block, length, alpha_ref[...], inv_beta_ref[...], even_ref, odd_ref)
    if zero_past_end:
        out = jnp.where(_positions(start, out.shape) < length, out, 0.0)
    out_ref[0] = out.astype(out_ref.dtype)


def _matmul(weights: Array, x: Array, precision) -> Array:
    """(O, I) @ (I, W) on the matrix unit, float32 accumulation; ``precision`` applies to float32 operands."""
    return kernel_matmul.dot_general(weights, x.astype(weights.dtype), (((1,), (0,)), ((), ())), precision)


def _conv(src_ref, offset: int, width: int, weights_ref, bias: Array, dilation: int, precision) -> Array:
    """'Same' conv at [start, start + width) as per-tap matmuls: sum_k W_k (O, I) @ src (I, width) + bias.

    ``src_ref`` holds the conv input (zero outside the item) with sample ``start`` at column ``offset``.
    """
    taps = weights_ref.shape[0]
    base = offset - taps // 2 * dilation
    out = None
    for k in range(taps):
        term = _matmul(weights_ref[k], src_ref[:, base + k * dilation:base + k * dilation + width], precision)
        out = term if out is None else out + term
    dtype = weights_ref.dtype
    return out.astype(dtype) + bias.astype(dtype)


def _residual_unit_kernel(lengths_ref, alpha1_ref, inv_beta1_ref, w1_ref, b1_ref, alpha2_ref, inv_beta2_ref,
                          w2_ref, b2_ref, *refs, block: int, halo: int, dilation: int, precision):
    """x + conv2(act2(conv1(act1(x)))) on one time block; the stage widths shrink towards the output."""
    *inputs, out_ref, window_ref, act_ref, hidden_ref, even_ref, odd_ref = refs
    length, start = lengths_ref[pl.program_id(0)], pl.program_id(1) * block
    dtype = out_ref.dtype
    _load_window(window_ref, inputs, block, halo, start, length)

    # hidden = conv1(act1(x)) on [start - hm, start + block + hm): act2 needs 3 + 3 samples around its outputs.
    hm = 2 * _MARGIN
    am = hm + w1_ref.shape[0] // 2 * dilation  # act1 outputs the conv reads
    act = _activation(window_ref, _HALO - am, start - am, block + 2 * am, length, alpha1_ref[...],
                      inv_beta1_ref[...], even_ref, odd_ref).astype(dtype)
    positions = _positions(start - am, act.shape)
    act_ref[...] = jnp.where((positions >= 0) & (positions < length), act, 0).astype(jnp.float32)
    hidden = _conv(act_ref, am - hm, block + 2 * hm, w1_ref, b1_ref[...], dilation, precision)
    hidden = hidden.astype(jnp.float32)
    hidden_ref[...] = _replicate_edges(hidden, _positions(start - hm, hidden.shape), length)

    act = _activation(hidden_ref, hm, start, block, length, alpha2_ref[...], inv_beta2_ref[...], even_ref,
                      odd_ref).astype(dtype)
    update = _matmul(w2_ref[0], act, precision).astype(dtype) + b2_ref[...].astype(dtype)
    out_ref[0] = (inputs[len(inputs) // 2][0] + update).astype(dtype)


# --------------------------------------------------------------------------------------------- calls
def _time_blocking(t: int, per_block: int) -> tuple[int, int]:
    """(block, halo): the whole signal without halos when it fits ``per_block`` samples, else lane-aligned
    blocks of ``per_block`` samples with 128-sample halos."""
    if t <= per_block:
        return t, 0
    return per_block, _HALO


def _time_specs(c: int, t: int, block: int, halo: int, index) -> tuple[list, int]:
    """BlockSpecs reading (1, c, block) blocks of a (B, C, t) signal plus their halos; ``index(*grid)``
    maps a grid step to its (item, channel block, time block). Returns the specs and operand count."""
    main = pl.BlockSpec((1, c, block), lambda *g: index(*g[:-1]))
    if not halo:
        return [main], 1
    per, last = block // halo, pl.cdiv(t, halo) - 1

    def shifted(offset):
        def index_map(*g):
            item, channels, k = index(*g[:-1])
            return item, channels, jnp.clip(k * per + offset(per), 0, last)
        return pl.BlockSpec((1, c, halo), index_map)

    return [shifted(lambda per: -1), main, shifted(lambda per: per)], 3


def _bytes(steps: int, rows: int, block: int, halo: int, out_size: int, itemsize: int) -> int:
    """HBM traffic of a blocked kernel: every step's block and halos read, the output written once."""
    return (steps * rows * (block + 2 * halo) + out_size) * itemsize


def _window_scratch(c: int, block: int, margin: int) -> list:
    return [pltpu.VMEM((c, block + 2 * margin), jnp.float32)]


@functools.partial(jax.jit, static_argnames=("zero_past_end", "interpret"))
def activation(x: Array, lengths: Array, alpha: Array, inv_beta: Array, zero_past_end: bool = False,
               interpret: bool = False) -> Array:
    """Anti-aliased activation. x (B, C, T) any float dtype, lengths (B,) int, alpha/inv_beta (C, 1)
    float32 (see :func:`.antialias.snake_parameters`) -> (B, C, T) in x's dtype. ``zero_past_end``: the
    output is 0 from each item's length on (a conv's input mask, written with the output instead of in a
    pass of its own).

    Grid (item, channel block, time block); channels are independent, so they are blocked too.
    """
    b, c, t = x.shape
    cb = next((n for n in (64, 32, 16, 8) if c % n == 0), c)
    block, halo = _time_blocking(t, max(_SMALLEST_BLOCK, _BLOCK_ELEMENTS // cb // _LANES * _LANES))
    grid = (b, c // cb, pl.cdiv(t, block))
    specs, copies = _time_specs(cb, t, block, halo, lambda i, j, k: (i, j, k))
    vector = pl.BlockSpec((cb, 1), lambda i, j, k, lengths: (j, 0))
    wide = block + 2 * _MARGIN
    return pl.pallas_call(
        functools.partial(_activation_kernel, block=block, halo=halo, zero_past_end=zero_past_end),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=[vector, vector, *specs], out_specs=specs[copies // 2],
            scratch_shapes=[*_window_scratch(cb, block, _HALO), pltpu.VMEM((cb, wide), jnp.float32),
                            pltpu.VMEM((cb, wide), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3, vmem_limit_bytes=_VMEM_LIMIT),
        cost_estimate=pl.CostEstimate(
            flops=int(x.size * (2 * (2 * PHASE_TAPS + 20) + 4 * PHASE_TAPS)), transcendentals=0,
            bytes_accessed=_bytes(math.prod(grid), cb, block, halo, x.size, x.dtype.itemsize)),
        interpret=interpret,
    )(lengths.astype(jnp.int32), alpha, inv_beta, *[x] * copies)


# Channels above which the residual-unit kernel is not used: its weights (7 C^2, double-buffered) must sit
# in VMEM beside the blocks; 768 channels in float32 do not (measured: VMEM OOM at compile time).
RESIDUAL_UNIT_MAX_CHANNELS = 384


@functools.partial(jax.jit, static_argnames=("dilation", "precision", "interpret"))
def residual_unit(x: Array, lengths: Array, act1: tuple[Array, Array], conv1: tuple[Array, Array],
                  act2: tuple[Array, Array], conv2: tuple[Array, Array], *, dilation: int,
                  precision: jax.lax.Precision, interpret: bool = False) -> Array:
    """``x + conv2(act2(conv1(act1(x))))`` with conv1 'same' (k taps, ``dilation``) and conv2 1x1.

    x (B, C, T) in the compute dtype; lengths (B,) int; act1/act2 (alpha, inv_beta) (C, 1) float32;
    conv1 (kernel (k, C, C) Flax layout, bias (C,)), conv2 (kernel (1, C, C), bias (C,)), cast to x's
    dtype. conv1's input is zero past each item's end, like the XLA form's masked conv.
    """
    b, c, t = x.shape
    taps = conv1[0].shape[0]
    block, halo = _time_blocking(t, max(_SMALLEST_BLOCK, _BLOCK_ELEMENTS // c // _LANES * _LANES))
    grid = (b, pl.cdiv(t, block))
    specs, copies = _time_specs(c, t, block, halo, lambda i, k: (i, 0, k))
    whole = lambda shape: pl.BlockSpec(shape, lambda i, k, lengths: (0,) * len(shape))
    weights = lambda kernel: jnp.swapaxes(kernel, 1, 2).astype(x.dtype)  # (k, in, out) -> (k, out, in)
    column = lambda v: v.reshape(c, 1)
    operands = [*act1, weights(conv1[0]), column(conv1[1]), *act2, weights(conv2[0]), column(conv2[1])]
    hm = 2 * _MARGIN
    am = hm + taps // 2 * dilation
    return pl.pallas_call(
        functools.partial(_residual_unit_kernel, block=block, halo=halo, dilation=dilation, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=[whole(o.shape) for o in operands] + specs,
            out_specs=specs[copies // 2],
            scratch_shapes=[*_window_scratch(c, block, _HALO), *_window_scratch(c, block, am),
                            *_window_scratch(c, block, hm), *_window_scratch(c, block, am + _MARGIN),
                            *_window_scratch(c, block, am + _MARGIN)]),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 2, vmem_limit_bytes=_VMEM_LIMIT),
        cost_estimate=pl.CostEstimate(
            flops=int(x.size * (2 * c * (taps + 1) + 2 * (2 * (2 * PHASE_TAPS + 20) + 4 * PHASE_TAPS))),
            transcendentals=0,
            bytes_accessed=_bytes(math.prod(grid), c, block, halo, x.size, x.dtype.itemsize)),
        interpret=interpret,
    )(lengths.astype(jnp.int32), *operands, *[x] * copies)
