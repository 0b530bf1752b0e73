"""Accelerator matmul precision, emulated on XLA:CPU: what "default" / "high" do to float32 operands.

XLA:CPU computes every float32 matmul and convolution in float32 whatever their ``precision`` says, so the
code agreement of precision "high" or "default" cannot be measured on a CPU as it runs. On a TPU the matrix
unit multiplies bfloat16: "default" is one pass over the operands rounded to bf16, "high" three passes
(bf16x3: each operand split into a bf16 head and a bf16 tail, head x head + head x tail + tail x head),
"highest" six (float32 accuracy). NVIDIA GPUs (Ampere and later) run float32 "default" and "high" on the
tensor cores in TF32 (operands rounded to 10 mantissa bits, ties away from zero), "highest" in float32. In
each case products are exact and sums float32.

Inside ``emulated_precision("tpu")`` (or ``"gpu"``), programs compiled for the CPU lower every float32
``dot_general`` and ``conv_general_dilated`` whose precision is not "highest" into exactly those passes, run
in float32 on the CPU. What it leaves out: the accelerators' summation order and blocking (float32 rounding
noise, far below the operand rounding), and ops mixing a float32 and a bf16 operand (computed exactly).
A benchmark tool (``bf16.py --emulate``), not library code: it swaps JAX's internal CPU lowering rules
while the context is open and clears JAX's caches on entry and exit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir  # the lowering registry: there is no public API to override a rule
from jax._src.lax import convolution
from jax._src.lax import lax as lax_internal

from xcodec2_jax.nn.kernel_matmul import bf16x3

Array = jax.Array

PLATFORMS = ("tpu", "gpu")
_PRIMITIVES = (lax_internal.dot_general_p, convolution.conv_general_dilated_p)


def _tf32(x: Array) -> Array:
    """x rounded to TF32's 10 explicit mantissa bits (ties away from zero), kept float32."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = jax.lax.bitcast_convert_type((bits + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000), jnp.float32)
    return jnp.where(jnp.isnan(x), x, rounded)


def _precision_name(precision) -> str | None:
    """"DEFAULT" / "HIGH" / "HIGHEST" of a canonical dot or conv precision; None for an algorithm preset."""
    if precision is None:
        return "DEFAULT"
    if isinstance(precision, tuple):
        return max(precision, key=lambda p: p.value).name  # the stronger of the two operands' requests
    return None


def _emulated(platform: str, name: str, product: Callable[[Array, Array], Array], x: Array, y: Array) -> Array:
    """``product(x, y)`` of float32 operands as ``platform`` computes it at precision ``name`` (not HIGHEST)."""
    if platform == "gpu":
        return product(_tf32(x), _tf32(y))
    if name == "DEFAULT":
        return product(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
    return bf16x3(product, x, y)


def _emulating_rule(primitive, original: mlir.LoweringRuleEntry, platform: str):
    """A CPU lowering of ``primitive`` that emulates ``platform``'s passes for float32 operands."""

    def rule(ctx, lhs, rhs, *, precision, preferred_element_type, **params):
        name = _precision_name(precision)
        if name in (None, "HIGHEST") or any(aval.dtype != jnp.float32 for aval in ctx.avals_in):
            return original.rule(ctx, lhs, rhs, precision=precision, preferred_element_type=preferred_element_type,
                                 **params)
        out_dtype = ctx.avals_out[0].dtype
        # Each pass: exact products, float32 sums; "highest" so that the TF32 pass (float32 operands) is not
        # emulated again when this function is lowered.
        product = functools.partial(primitive.bind, precision=lax_internal.canonicalize_precision("highest"),
                                    preferred_element_type=jnp.float32, **params)
        emulated = lambda x, y: _emulated(platform, name, product, x, y).astype(out_dtype)
        return mlir.lower_fun(emulated, multiple_results=False)(ctx, lhs, rhs)

    return rule


@contextlib.contextmanager
def emulated_precision(platform: str) -> Iterator[None]:
    """Within the context, CPU programs compute float32 matmuls/convolutions as ``platform`` ("tpu", "gpu")
    would at their precision (programs compiled inside it keep the emulation after it closes)."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r}: expected one of {PLATFORMS}")
    cpu_rules = mlir._platform_specific_lowerings["cpu"]
    saved = {p: cpu_rules.get(p) for p in _PRIMITIVES}
    jax.clear_caches()
    try:
        for primitive in _PRIMITIVES:
            original = saved[primitive] or mlir._lowerings[primitive]
            cpu_rules[primitive] = mlir.LoweringRuleEntry(_emulating_rule(primitive, original, platform),
                                                          original.inline)
        yield
    finally:
        for primitive, entry in saved.items():
            if entry is None:
                cpu_rules.pop(primitive, None)
            else:
                cpu_rules[primitive] = entry
        jax.clear_caches()
