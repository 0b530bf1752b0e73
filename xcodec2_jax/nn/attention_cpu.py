"""Attention for XLA:CPU: one (T, S) block of scores per item and head at a time, while it is in cache.

``jax.nn.dot_product_attention`` (XLA) writes the (B, H, T, S) scores to memory and reads them back for the
max, the exponential, the sum, the division and the product with the values: at the full-size decoder's
shapes (8 items, 16 heads, 64 dims) that is 512 MB per layer for 1,000 frames, and on this project's CPU the
softmax passes cost more than both matmuls. Mapping over (item, head) with ``lax.map`` keeps each block
(4 MB at 1,000 frames) in cache through all of them: 2.3x faster at 300 frames and 3.5x at 1,000 on
the 2-core CPU of ``benchmarks/RESULTS.md`` ("Attention on XLA:CPU"), for the same arithmetic:
scores in float32, the relative-key bias and the scale applied as ``jax.nn.dot_product_attention``
applies them, softmax in float32, probabilities cast to the values' dtype. The relative term picks its
distance with a gather from ``by_distance`` (T, distances): cheap on a CPU, unlike the TPU, whose path
(:mod:`.attention_pallas`) builds it in VMEM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .attention_terms import MASKED_LOGIT, relative_distance

Array = jax.Array


def blocked_attention(query: Array, key: Array, value: Array, key_valid: Array, by_distance: Array | None = None,
                      *, left: int = 0, right: int = 0, precision=None) -> Array:
    """softmax((q . k + q . E[clip(r - l, -left, right) + left]) / sqrt(D)) v over valid keys.

    Args:
        query, key, value: (B, T, H, D) / (B, S, H, D) in the compute dtype.
        key_valid: (B, S) boolean.
        by_distance: (B, H, T, left + right + 1) = q . E^T per distance (T == S), or None.
        precision: for float32 operands (None: the ambient default).

    Returns (B, T, H, D) in the query's dtype.
    """
    b, t, h, d = query.shape
    scale = d**-0.5
    heads_first = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d)
    operands = [heads_first(query), heads_first(key), heads_first(value), jnp.repeat(key_valid, h, axis=0)]
    if by_distance is not None:
        operands.append(by_distance.reshape(b * h, t, left + right + 1))
        distance = relative_distance(t, left, right)

    def one_block(block: list[Array]) -> Array:
        q, k, v, valid = block[:4]
        logits = jnp.matmul(q, k.T, precision=precision, preferred_element_type=jnp.float32) * scale
        if by_distance is not None:
            logits = logits + jnp.take_along_axis(block[4], distance, axis=-1) * jnp.asarray(scale, block[4].dtype)
        logits = jnp.where(valid[None, :], logits, MASKED_LOGIT)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.matmul(probs, v, precision=precision).astype(query.dtype)

    out = jax.lax.map(one_block, operands)  # (B * H, T, D)
    return out.reshape(b, h, t, d).transpose(0, 2, 1, 3)
