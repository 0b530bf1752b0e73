"""Matmuls inside the Pallas TPU kernels, at the layer's precision.

Mosaic lowers a kernel's float32 dot at precision "default" (one bf16 pass) or "highest" (float32) only
and rejects "high". XLA computes "high" as bf16x3: each float32 operand split into a bf16 head and a bf16
tail, head x head + head x tail + tail x head, summed in float32. :func:`dot_general` makes those three
passes explicit for the kernels, so "high" means the same inside and outside them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def bf16_head_tail(x: Array) -> tuple[Array, Array]:
    """float32 x -> (head, tail), both bfloat16: x = head + tail up to ~2^-17 relative."""
    head = x.astype(jnp.bfloat16)
    return head, (x - head.astype(jnp.float32)).astype(jnp.bfloat16)


def dot_general(lhs: Array, rhs: Array, dimension_numbers, precision: jax.lax.Precision | None) -> Array:
    """``jax.lax.dot_general`` with float32 results; ``precision`` applies to float32 operands (bf16 ones
    take one pass whatever it is), "high" as the three bf16 passes above."""
    dot = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers,
                            preferred_element_type=jnp.float32)
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return dot(lhs, rhs)
    if precision != jax.lax.Precision.HIGH:
        return dot(lhs, rhs, precision=precision)
    (lhs_head, lhs_tail), (rhs_head, rhs_tail) = bf16_head_tail(lhs), bf16_head_tail(rhs)
    return dot(lhs_head, rhs_head) + (dot(lhs_head, rhs_tail) + dot(lhs_tail, rhs_head))
