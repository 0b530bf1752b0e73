"""Flash attention for TPU (Pallas), forward only, with Shaw relative-key logits computed in the kernel.

The conformer's relative-key term ``q_l . E[clip(r - l, -left, right) + left]`` is a (B, H, T, S) bias:
written to HBM it costs more bytes than the whole rest of the attention. This kernel takes the (distances,
D) table ``E`` itself, computes ``q @ E^T`` for its query block once, and builds each (query block x key
block) tile of the bias in VMEM: tiles far from the diagonal see only the two clamped distances, tiles on
the band select their distances one by one. Keys are masked per item (``key_valid``), the softmax runs
online in float32 (as Transformers' softmax in float32, up to rounding), and the scores never leave VMEM.

Layout: queries, keys, values and the output stay as the projections write them, (B, T, H x D) with the
heads side by side on the lanes, and the sequences are not padded: a grid step reads a (block, 128-lane)
tile holding one or more whole heads (two of 64 dims at full size) and treats them one after the other.
The heads-first, padded layout the kernel took before cost three XLA passes over each of q, k and v and two
over the output per layer: on a v5e chip (full size, bf16, 8 x 6 s) the semantic encoder moved 12.07 GB
with it and moves 8.15 GB now (benchmarks/RESULTS.md, "Session 8").
The last block of a sequence that is not a multiple of 128 reaches past its end; what it reads there is
undefined, so past-the-end keys are masked and their values zeroed, and past-the-end query rows are never
written.

The XLA path (:func:`xcodec2_jax.nn.layers.attention` on CPU/GPU) is the reference: tests run this kernel
in interpret mode (which fills past-the-end reads with NaN) against it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import kernel_matmul
from .attention_terms import MASKED_LOGIT

Array = jax.Array

BLOCK = 128  # frames per query and key block
_LANES = 128  # the vector lanes heads are packed onto


def _relative_bias(bias_ref, by_distance: Array, rows: Array, cols: Array, left: int, right: int, on_band) -> Array:
    """The relative-key logits of one tile, (rows, cols) float32, from ``by_distance`` (rows, distances);
    ``bias_ref`` is a VMEM scratch of the tile's shape."""
    offset = cols - rows
    last = left + right
    clamped = jnp.where(offset >= right, by_distance[:, last:], 0.0)
    bias_ref[...] = jnp.where(offset <= -left, by_distance[:, :1], clamped)

    @pl.when(on_band)
    def _band():
        bias = bias_ref[...]
        for n in range(1, last):
            bias = bias + jnp.where(offset == n - left, by_distance[:, n:n + 1], 0.0)
        bias_ref[...] = bias

    return bias_ref[...]


def _kernel(*refs, heads: int, head_dim: int, seq: int, relative: bool, scale: float, left: int, right: int,
            precision):
    """One (item, head group, query block, key block) step of the online softmax for each head of the group;
    key blocks are the reduction."""
    if relative:
        q_ref, k_ref, v_ref, table_ref, valid_ref, out_ref, *scratch, bias_ref = refs
        m_refs, l_refs, acc_refs, distance_refs = (scratch[n * heads:(n + 1) * heads] for n in range(4))
    else:
        q_ref, k_ref, v_ref, valid_ref, out_ref, *scratch = refs
        m_refs, l_refs, acc_refs = (scratch[n * heads:(n + 1) * heads] for n in range(3))
    i, j = pl.program_id(2), pl.program_id(3)
    rows_in_block, cols_in_block = q_ref.shape[1], k_ref.shape[1]
    lanes = lambda a: slice(a * head_dim, (a + 1) * head_dim)

    @pl.when(j == 0)
    def _init():
        for a in range(heads):
            m_refs[a][...] = jnp.full(m_refs[a].shape, MASKED_LOGIT, jnp.float32)
            l_refs[a][...] = jnp.zeros(l_refs[a].shape, jnp.float32)
            acc_refs[a][...] = jnp.zeros(acc_refs[a].shape, jnp.float32)
            if relative:  # q . E^T, rounded to the compute dtype like the XLA form's einsum
                q = q_ref[0, :, lanes(a)]
                by_distance = kernel_matmul.dot_general(q, table_ref[...], (((1,), (1,)), ((), ())), precision)
                distance_refs[a][...] = by_distance.astype(q.dtype).astype(jnp.float32)

    key_valid = valid_ref[0] > 0  # False past the sequence's end too: padded to the key blocks
    if relative:
        shape = (rows_in_block, cols_in_block)
        rows = i * rows_in_block + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        cols = j * cols_in_block + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        first_row, first_col = i * rows_in_block, j * cols_in_block
        last_row, last_col = first_row + rows_in_block - 1, first_col + cols_in_block - 1
        on_band = (first_col - last_row < right) & (last_col - first_row > -left)
    # Values past the sequence's end are undefined (NaN in interpret mode): their weight is 0, 0 x NaN is not.
    past_end = None
    if seq % cols_in_block:
        past_end = j * cols_in_block + jax.lax.broadcasted_iota(jnp.int32, (cols_in_block, 1), 0) >= seq

    for a in range(heads):
        q, k, v = q_ref[0, :, lanes(a)], k_ref[0, :, lanes(a)], v_ref[0, :, lanes(a)]
        if past_end is not None:
            v = jnp.where(past_end, 0, v)
        scores = kernel_matmul.dot_general(q, k, (((1,), (1,)), ((), ())), precision)
        if relative:
            scores = scores + _relative_bias(bias_ref, distance_refs[a][...], rows, cols, left, right, on_band)
        scores = jnp.where(key_valid, scores * scale, MASKED_LOGIT)

        m_prev, l_prev = m_refs[a][...], l_refs[a][...]
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
        p = jnp.exp(scores - m_next)
        alpha = jnp.exp(m_prev - m_next)
        l_refs[a][...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_refs[a][...] = m_next
        pv = kernel_matmul.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision)
        acc_refs[a][...] = alpha * acc_refs[a][...] + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        for a in range(heads):
            out_ref[0, :, lanes(a)] = (acc_refs[a][...] / l_refs[a][...]).astype(out_ref.dtype)


def _heads_per_block(heads: int, head_dim: int) -> int:
    """Heads side by side in one grid step's lanes: whole heads filling a multiple of 128 lanes, or all
    heads when they do not fill 128 (a block spans the whole lane axis then)."""
    lanes = math.lcm(head_dim, _LANES)
    return lanes // head_dim if (heads * head_dim) % lanes == 0 else heads


@functools.partial(jax.jit, static_argnames=("left", "right", "precision", "interpret"))
def flash_attention(query: Array, key: Array, value: Array, key_valid: Array, table: Array | None = None,
                    *, left: int = 0, right: int = 0, precision=None, interpret: bool = False) -> Array:
    """softmax((q . k + q . E[clip(r - l, -left, right) + left]) / sqrt(D)) v over valid keys.

    Args:
        query, key, value: (B, T, H, D) / (B, S, H, D) in the compute dtype.
        key_valid: (B, S) boolean.
        table: the relative-key table E (left + right + 1, D) (T == S), or None; cast to the compute dtype.

    Returns (B, T, H, D).
    """
    b, t, h, d = query.shape
    s = key.shape[1]
    group = _heads_per_block(h, d)
    lanes = group * d
    block = lambda n: n if n <= BLOCK else BLOCK  # a short sequence is one block of its own length
    bt, bs = block(t), block(s)
    sp = pl.cdiv(s, bs) * bs
    flat = lambda x: x.reshape(*x.shape[:2], h * d)  # (B, T, H, D) -> (B, T, H x D): a bitcast
    valid = jnp.pad(key_valid, ((0, 0), (0, sp - s))).astype(jnp.int32)[:, None, :]
    rows = pl.BlockSpec((1, bt, lanes), lambda bi, g, i, j: (bi, i, g))
    cols = pl.BlockSpec((1, bs, lanes), lambda bi, g, i, j: (bi, j, g))
    in_specs, operands = [rows, cols, cols], [flat(query), flat(key), flat(value)]
    relative = table is not None
    if relative:
        if table.shape != (left + right + 1, d):
            raise ValueError(f"table {table.shape} should be (left + right + 1, head_dim) = {(left + right + 1, d)}")
        in_specs.append(pl.BlockSpec(table.shape, lambda bi, g, i, j: (0, 0)))
        operands.append(table.astype(query.dtype))
    in_specs.append(pl.BlockSpec((1, 1, bs), lambda bi, g, i, j: (bi, 0, j)))
    operands.append(valid)

    per_head = [pltpu.VMEM((bt, 1), jnp.float32), pltpu.VMEM((bt, 1), jnp.float32), pltpu.VMEM((bt, d), jnp.float32)]
    if relative:  # q . E^T per head, and one tile of relative logits
        per_head.append(pltpu.VMEM((bt, left + right + 1), jnp.float32))
    scratch = [shape for shape in per_head for _ in range(group)]
    if relative:
        scratch.append(pltpu.VMEM((bt, bs), jnp.float32))
    kernel = functools.partial(_kernel, heads=group, head_dim=d, seq=s, relative=relative, scale=d**-0.5, left=left,
                               right=right, precision=precision)
    itemsize, query_blocks = query.dtype.itemsize, pl.cdiv(t, bt)
    distance_flops = 2 * b * h * t * table.shape[0] * d if relative else 0
    out = pl.pallas_call(
        kernel,
        grid=(b, h // group, query_blocks, sp // bs),
        in_specs=in_specs,
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct((b, t, h * d), query.dtype),
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(  # keys and values are read once per query block
            flops=4 * b * h * query_blocks * bt * sp * d + distance_flops, transcendentals=b * h * t * sp,
            bytes_accessed=(2 * query.size + 2 * query_blocks * key.size) * itemsize + valid.size * 4),
        interpret=interpret,
    )(*operands)
    return out.reshape(b, t, h, d)
