"""``benchmarks/emulated_precision.py`` computes float32 matmuls and convolutions as TPU/GPU passes would."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.emulated_precision import emulated_precision

RNG = np.random.default_rng(0)
LHS = jnp.asarray(RNG.standard_normal((16, 96)), jnp.float32)
RHS = jnp.asarray(RNG.standard_normal((96, 8)), jnp.float32)
SIGNAL = jnp.asarray(RNG.standard_normal((2, 6, 40)), jnp.float32)
KERNEL = jnp.asarray(RNG.standard_normal((4, 6, 5)), jnp.float32)


def matmul(precision: str, lhs: jax.Array = LHS, rhs: jax.Array = RHS) -> np.ndarray:
    return np.asarray(jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))(lhs, rhs), np.float64)


def conv(precision: str, signal: jax.Array = SIGNAL, kernel: jax.Array = KERNEL) -> np.ndarray:
    run = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1,), "SAME", precision=precision))
    return np.asarray(run(signal, kernel), np.float64)


def bf16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def tf32(x: np.ndarray) -> jax.Array:
    bits = np.asarray(x, np.float32).view(np.uint32)
    return jnp.asarray(((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32))


def test_tpu_passes_round_float32_operands_as_the_precision_says():
    exact = np.asarray(LHS, np.float64) @ np.asarray(RHS, np.float64)
    with emulated_precision("tpu"):
        default, high, highest = (matmul(p) for p in ("default", "high", "highest"))
        conv_default, conv_high = conv("default"), conv("high")
        with jax.default_matmul_precision("high"):  # the ambient precision reaches the op too
            ambient_high = np.asarray(jax.jit(jnp.matmul)(LHS, RHS), np.float64)
    # "default": one pass over the bf16-rounded operands (exact products, float32 sums).
    np.testing.assert_allclose(default, matmul("highest", bf16(LHS), bf16(RHS)), rtol=0, atol=1e-4)
    np.testing.assert_allclose(conv_default, conv("highest", bf16(SIGNAL), bf16(KERNEL)), rtol=0, atol=1e-4)
    # "high" (bf16x3) sits between: far closer than one pass, not float32.
    default_error, high_error = np.abs(default - exact).max(), np.abs(high - exact).max()
    assert high_error < default_error / 50
    assert high_error > 3 * np.abs(highest - exact).max()
    assert np.abs(conv_high - conv("highest")).max() < np.abs(conv_default - conv("highest")).max() / 50
    np.testing.assert_array_equal(ambient_high, high)
    np.testing.assert_array_equal(highest, matmul("highest"))


def test_gpu_passes_use_tf32_operands_and_the_context_restores_the_cpu():
    with emulated_precision("gpu"):
        default, high = matmul("default"), matmul("high")
        half = np.asarray(jax.jit(jnp.matmul)(LHS.astype(jnp.bfloat16), RHS.astype(jnp.bfloat16)), np.float64)
    np.testing.assert_allclose(default, matmul("highest", tf32(LHS), tf32(RHS)), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(default, high)
    assert np.abs(default - matmul("highest")).max() > 1e-3  # TF32 rounding is visible at this size
    # TF32 keeps 10 mantissa bits, ties away from zero (the PTX cvt.rna.tf32.f32 conversion).
    ties = jnp.asarray([[1 + 2**-11, -(1 + 2**-11), 1 + 2**-12, 1 + 3 * 2**-12]], jnp.float32)
    with emulated_precision("gpu"):
        rounded = matmul("default", ties.T, jnp.ones((1, 1), jnp.float32))[:, 0]
    np.testing.assert_array_equal(rounded, [1 + 2**-10, -(1 + 2**-10), 1, 1 + 2**-10])
    # bfloat16 operands are left alone; after the context XLA:CPU computes float32 exactly again.
    np.testing.assert_array_equal(half, np.asarray(jax.jit(jnp.matmul)(LHS.astype(jnp.bfloat16),
                                                                       RHS.astype(jnp.bfloat16)), np.float64))
    np.testing.assert_array_equal(matmul("default"), matmul("highest"))
    with pytest.raises(ValueError, match="platform"), emulated_precision("npu"):
        pass
