"""Flash attention for TPU (Pallas), forward only, with Shaw relative-key logits computed in the kernel.

The conformer's relative-key term ``q_l . E[clip(r - l, -left, right) + left]`` is a (B, H, T, S) bias:
written to HBM it costs more bytes than the whole rest of the attention. This kernel takes
``by_distance = q @ E^T`` (B, H, T, distances), a few percent of that, and builds each (128 x 128) tile
of the bias in VMEM: tiles far from the diagonal see only the two clamped distances, tiles on the band
select their distances one by one. Keys are masked per item (``key_valid``), the softmax runs online
in float32 (as Transformers' softmax in float32, up to rounding), and the scores never leave VMEM.

The XLA path (:func:`xcodec2_jax.nn.layers.attention` on CPU/GPU) is the reference: tests run this kernel
in interpret mode against it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import kernel_matmul
from .attention_terms import MASKED_LOGIT

Array = jax.Array

BLOCK = 128  # query and key block: the lane width


def _kernel(q_ref, k_ref, v_ref, distance_ref, valid_ref, out_ref, m_ref, l_ref, acc_ref, bias_ref, *,
            scale: float, left: int, right: int, precision):
    """One (item, head, query block, key block) step of the online softmax; key blocks are the reduction."""
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASKED_LOGIT, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    q, k, v = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0]
    scores = kernel_matmul.dot_general(q, k, (((1,), (1,)), ((), ())), precision)
    if distance_ref is not None:
        rows = i * BLOCK + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 0)
        cols = j * BLOCK + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        offset = cols - rows
        table = distance_ref[0, 0].astype(jnp.float32)  # (BLOCK, distances)
        last = left + right
        bias_ref[...] = jnp.where(offset <= -left, table[:, :1], jnp.where(offset >= right, table[:, last:], 0.0))
        on_band = (j * BLOCK - (i * BLOCK + BLOCK - 1) < right) & (j * BLOCK + BLOCK - 1 - i * BLOCK > -left)

        @pl.when(on_band)
        def _band():
            bias = bias_ref[...]
            for n in range(1, last):
                bias = bias + jnp.where(offset == n - left, table[:, n:n + 1], 0.0)
            bias_ref[...] = bias

        scores = scores + bias_ref[...]
    scores = scores * scale
    scores = jnp.where(valid_ref[0] > 0, scores, MASKED_LOGIT)

    m_prev, l_prev = m_ref[...], l_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    p = jnp.exp(scores - m_next)
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    pv = kernel_matmul.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision)
    acc_ref[...] = alpha * acc_ref[...] + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        out_ref[0, 0] = (acc_ref[...] / l_ref[...]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("left", "right", "precision", "interpret"))
def flash_attention(query: Array, key: Array, value: Array, key_valid: Array, by_distance: Array | None = None,
                    *, left: int = 0, right: int = 0, precision=None, interpret: bool = False) -> Array:
    """softmax((q . k + q . E[clip(r - l, -left, right) + left]) / sqrt(D)) v over valid keys.

    Args:
        query, key, value: (B, T, H, D) / (B, S, H, D) in the compute dtype.
        key_valid: (B, S) boolean.
        by_distance: (B, H, T, left + right + 1) = q . E^T per distance, or None for no relative term.

    Returns (B, T, H, D). Sequences are padded to the 128 block (padded keys are masked).
    """
    b, t, h, d = query.shape
    s = key.shape[1]
    tp, sp = -(-t // BLOCK) * BLOCK, -(-s // BLOCK) * BLOCK
    heads_first = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    q, k, v = heads_first(query, tp), heads_first(key, sp), heads_first(value, sp)
    valid = jnp.pad(key_valid, ((0, 0), (0, sp - s))).astype(jnp.int32)[:, None, :]
    rows = pl.BlockSpec((1, 1, BLOCK, d), lambda bi, hi, i, j: (bi, hi, i, 0))
    cols = pl.BlockSpec((1, 1, BLOCK, d), lambda bi, hi, i, j: (bi, hi, j, 0))
    in_specs = [rows, cols, cols]
    operands = [q, k, v]
    if by_distance is not None:
        by_distance = jnp.pad(by_distance, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
        in_specs.append(pl.BlockSpec((1, 1, BLOCK, by_distance.shape[-1]), lambda bi, hi, i, j: (bi, hi, i, 0)))
        operands.append(by_distance)
    in_specs.append(pl.BlockSpec((1, 1, BLOCK), lambda bi, hi, i, j: (bi, 0, j)))
    operands.append(valid)

    def kernel(*refs):
        if by_distance is None:
            refs = (*refs[:3], None, *refs[3:])
        _kernel(*refs, scale=d**-0.5, left=left, right=right, precision=precision)

    itemsize = query.dtype.itemsize
    blocks = tp // BLOCK
    out = pl.pallas_call(
        kernel,
        grid=(b, h, blocks, sp // BLOCK),
        in_specs=in_specs,
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct((b, h, tp, d), query.dtype),
        scratch_shapes=[pltpu.VMEM((BLOCK, 1), jnp.float32), pltpu.VMEM((BLOCK, 1), jnp.float32),
                        pltpu.VMEM((BLOCK, d), jnp.float32), pltpu.VMEM((BLOCK, BLOCK), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(  # keys and values are read once per query block
            flops=4 * b * h * tp * sp * d, transcendentals=b * h * tp * sp,
            bytes_accessed=(q.size + 2 * blocks * k.size + q.size) * itemsize
            + (0 if by_distance is None else by_distance.size * by_distance.dtype.itemsize)),
        interpret=interpret,
    )(*operands)
    return out.transpose(0, 2, 1, 3)[:, :t]
