"""Matmuls inside the Pallas TPU kernels, at the layer's precision.

Mosaic lowers a kernel's dot only with no precision, "default", or "highest" (float32 contraction), and
raises on "high". XLA computes "high" as bf16x3: each float32 operand split into a bf16 head and a bf16
tail, head x head + head x tail + tail x head, summed in float32. :func:`dot_general` makes those three
passes explicit for the kernels, so "high" means the same inside and outside them. Every dot it emits
names its precision, so an ambient ``jax.default_matmul_precision("high")`` (``layers.attention`` sets
the layer's precision that way) cannot reach Mosaic either.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


def bf16_head_tail(x: Array) -> tuple[Array, Array]:
    """float32 x -> (head, tail), both bfloat16 of x's shape: x = head + tail up to ~2^-17 relative."""
    head = x.astype(jnp.bfloat16)
    return head, (x - head.astype(jnp.float32)).astype(jnp.bfloat16)


def bf16x3(product: Callable[[Array, Array], Array], x: Array, y: Array) -> Array:
    """``product(x, y)`` of float32 x and y as precision "high" computes it: the three bf16 passes above,
    each ``product`` of bf16 operands with float32 results, summed ((hh + ht) + th)."""
    (x_head, x_tail), (y_head, y_tail) = bf16_head_tail(x), bf16_head_tail(y)
    return product(x_head, y_head) + product(x_head, y_tail) + product(x_tail, y_head)


def dot_general(lhs: Array, rhs: Array, dimension_numbers: DimensionNumbers,
                precision: jax.lax.Precision | None) -> Array:
    """``jax.lax.dot_general(lhs, rhs, dimension_numbers)`` with float32 results (e.g. (O, I) x (I, W) ->
    (O, W)). ``precision`` applies to float32 operands ("high" as the three bf16 passes above; None is
    "default"); bf16 operands take one pass whatever it is."""
    dot = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers,
                            preferred_element_type=jnp.float32)
    one_pass = jax.lax.Precision.DEFAULT
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return dot(lhs, rhs, precision=one_pass)
    if precision != jax.lax.Precision.HIGH:
        return dot(lhs, rhs, precision=precision or one_pass)
    return bf16x3(functools.partial(dot, precision=one_pass), lhs, rhs)
