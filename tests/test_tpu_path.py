"""The accelerator compute path, checked on CPU: Pallas TPU kernels (interpret mode) against the XLA forms,
masking that keeps NaN/Inf padding out of valid frames, the attention core's precision, the precision and
bf16 policies of ``from_pretrained``."""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.emulated_precision import emulated_precision
from xcodec2_jax import Xcodec2Model
from xcodec2_jax.config import SemanticConfig, Xcodec2Config
from xcodec2_jax.nn import acoustic_pallas
from xcodec2_jax.nn.acoustic import AntiAliasedActivation, ResidualUnit
from xcodec2_jax.nn.antialias import polyphase_xla
from xcodec2_jax.nn.decoder import ResNetBlock
from xcodec2_jax.nn.layers import GroupNorm, Numerics
from xcodec2_jax.nn.semantic import SemanticAdapter, SemanticEncoder


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _max_err(got, want) -> float:
    """max |got - want| in numpy, which propagates NaN (XLA:CPU's max over a large array can drop it); got must
    be finite."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    return float(np.abs(got - want).max())


def _valid_err(got, want, lengths) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return max(float(np.abs(got[i, :, :n] - want[i, :, :n]).max()) for i, n in enumerate(np.asarray(lengths)))


# (channels, samples): one block holding the whole signal; several blocks with halos (48 channels ->
# 1280-sample blocks), lengths ending in the first block, across a block boundary and at the end.
SHAPES = [(8, 203, (203, 71)), (48, 3000, (3000, 1281, 7))]


@pytest.mark.parametrize(("channels", "samples", "lengths"), SHAPES)
@pytest.mark.parametrize("zero_past_end", [False, True])
def test_activation_kernel_equals_xla_form(channels, samples, lengths, zero_past_end):
    """Equal on each item's valid samples; with ``zero_past_end`` both are exactly 0 past the end."""
    x = jnp.asarray(2 * _rng(1).standard_normal((len(lengths), channels, samples)), jnp.float32)
    act = AntiAliasedActivation(channels, numerics=Numerics(), rngs=nnx.Rngs(0))
    alpha, inv_beta = act.parameters()
    lengths = jnp.asarray(lengths, jnp.int32)
    want = act(x, lengths, zero_past_end=zero_past_end)  # the XLA form on CPU
    np.testing.assert_array_equal(want, polyphase_xla(x, alpha, inv_beta, lengths) * (
        np.arange(samples) < np.asarray(lengths)[:, None, None] if zero_past_end else 1))
    got = acoustic_pallas.activation(x, lengths, alpha, inv_beta, zero_past_end=zero_past_end, interpret=True)
    assert np.isfinite(np.asarray(got)).all()
    assert _valid_err(got, want, lengths) < 5e-6
    if zero_past_end:
        assert all((np.asarray(got)[i, :, n:] == 0).all() for i, n in enumerate(np.asarray(lengths)))


@pytest.mark.parametrize(("channels", "samples", "lengths"), SHAPES)
@pytest.mark.parametrize("dilation", [1, 9])
def test_residual_unit_kernel_equals_xla_form(channels, samples, lengths, dilation):
    unit = ResidualUnit(channels, dilation, numerics=Numerics(), rngs=nnx.Rngs(2))
    x = jnp.asarray(_rng(3).standard_normal((len(lengths), channels, samples)), jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    want = unit.xla(x, lengths)
    got = acoustic_pallas.residual_unit(
        x, lengths, unit.snake1.parameters(), (unit.conv1.kernel[...], unit.conv1.bias[...]), unit.snake2.parameters(),
        (unit.conv2.kernel[...], unit.conv2.bias[...]), dilation=dilation, precision=jax.lax.Precision.HIGHEST,
        interpret=True)
    assert np.isfinite(np.asarray(got)).all()
    assert _valid_err(got, want, lengths) < 5e-6 * float(np.abs(np.asarray(want)).max())


def _residual_unit_kernel(unit: ResidualUnit, x: jax.Array, lengths: jax.Array, precision) -> jax.Array:
    return acoustic_pallas.residual_unit(
        x, lengths, unit.snake1.parameters(), (unit.conv1.kernel[...], unit.conv1.bias[...]), unit.snake2.parameters(),
        (unit.conv2.kernel[...], unit.conv2.bias[...]), dilation=unit.conv1.dilation, precision=precision,
        interpret=True)


def test_kernels_compute_precision_high_as_three_bf16_passes():
    """The kernels' "high" is bf16x3 written out: float32 accuracy to ~2^-16, where one bf16 pass (a TPU's
    "default", emulated) is > 100x further off."""
    unit = ResidualUnit(48, 3, numerics=Numerics(), rngs=nnx.Rngs(2))
    x = jnp.asarray(_rng(3).standard_normal((2, 48, 700)), jnp.float32)
    lengths = jnp.asarray([700, 333], jnp.int32)
    want = unit.xla(x, lengths)
    scale = float(np.abs(np.asarray(want)).max())
    high = _valid_err(_residual_unit_kernel(unit, x, lengths, jax.lax.Precision.HIGH), want, lengths) / scale
    with emulated_precision("tpu"):
        one_pass = _residual_unit_kernel(unit, x, lengths, jax.lax.Precision.DEFAULT)
    assert 0 < high < 2e-5
    assert _valid_err(one_pass, want, lengths) / scale > 100 * high

    from xcodec2_jax.nn import attention_pallas
    from xcodec2_jax.nn.layers import attention

    q, k, v = (jnp.asarray(_rng(seed).standard_normal((2, 300, 2, 64)), jnp.float32) for seed in (9, 10, 11))
    mask = jnp.asarray(np.arange(300)[None, :] < np.array([300, 77])[:, None])
    got = attention_pallas.flash_attention(q, k, v, mask, precision=jax.lax.Precision.HIGH, interpret=True)
    assert _max_err(got, attention(q, k, v, numerics=Numerics(), key_mask=mask)) < 2e-5


@pytest.mark.parametrize("precision", ["highest", "high", "default"])
def test_kernels_lower_for_tpu_at_every_precision(precision):
    """Mosaic raises on a "high" dot (and ``attention`` sets the layer's precision as the ambient default):
    the attention kernel (plain and relative) and the residual-unit kernel lower for TPU, here on the CPU, at
    every precision of a float32 layer."""
    from xcodec2_jax.nn.layers import RelativeKey, attention

    numerics = Numerics.create(jnp.float32, precision)
    q = jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 300), jnp.bool_)
    unit = ResidualUnit(48, 3, numerics=numerics, rngs=nnx.Rngs(0))
    programs = [jax.jit(functools.partial(attention, numerics=numerics, relative=relative))
                .trace(q, q, q, key_mask=mask) for relative in (None, RelativeKey(jnp.zeros((73, 64)), 64, 8))]
    programs.append(jax.jit(unit).trace(jax.ShapeDtypeStruct((1, 48, 4000), jnp.float32),
                                        jax.ShapeDtypeStruct((1,), jnp.int32)))
    for program in programs:
        assert "tpu_custom_call" in program.lower(lowering_platforms=("tpu",)).as_text()


# ------------------------------------------------------------------------------------ masking (issue 14)
def _poison(x: np.ndarray, valid: int, axis: int) -> np.ndarray:
    """x with NaN and Inf everywhere past ``valid`` along ``axis`` (item 1 only)."""
    x = x.copy()
    index = [1] + [slice(None)] * (x.ndim - 1)
    index[axis] = slice(valid, None)
    x[tuple(index)] = np.nan
    index[axis] = slice(valid + 1, valid + 2)
    x[tuple(index)] = np.inf
    return x


def test_nan_in_padding_does_not_reach_valid_frames():
    rngs, numerics = nnx.Rngs(4), Numerics()
    semantic = SemanticConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    frames, valid = 12, 7
    mask = np.arange(frames)[None, :] < np.array([frames, valid])[:, None]
    features = _rng(5).standard_normal((2, frames, 160)).astype(np.float32)
    encoder = SemanticEncoder(semantic, numerics=numerics, rngs=rngs)
    clean = np.asarray(encoder(jnp.asarray(features), jnp.asarray(mask)))
    dirty = np.asarray(encoder(jnp.asarray(_poison(features, valid, 1)), jnp.asarray(mask)))
    np.testing.assert_array_equal(dirty[1, :valid], clean[1, :valid])

    adapter = SemanticAdapter(semantic, numerics=numerics, rngs=rngs)
    hidden = _rng(6).standard_normal((2, frames, 32)).astype(np.float32)
    clean = np.asarray(adapter(jnp.asarray(hidden), jnp.asarray(mask)))
    dirty = np.asarray(adapter(jnp.asarray(_poison(hidden, valid, 1)), jnp.asarray(mask)))
    np.testing.assert_array_equal(dirty[1, :valid], clean[1, :valid])

    block = ResNetBlock(Xcodec2Config(hidden_size=64, quantization_dim=64 + 1024), numerics=numerics, rngs=rngs)
    hidden = _rng(7).standard_normal((2, frames, 64)).astype(np.float32)
    clean = np.asarray(block(jnp.asarray(hidden), jnp.asarray(mask[..., None]))[0])
    dirty = np.asarray(block(jnp.asarray(_poison(hidden, valid, 1)), jnp.asarray(mask[..., None]))[0])
    np.testing.assert_array_equal(dirty[1, :valid], clean[1, :valid])


def test_masked_group_norm_with_no_valid_frame_is_finite():
    norm = GroupNorm(4, 16, eps=1e-6, rngs=nnx.Rngs(0))
    x = jnp.asarray(_rng(8).standard_normal((2, 5, 16)), jnp.float32)
    mask = jnp.asarray([[True] * 5, [False] * 5])[..., None]
    out = np.asarray(norm(x, mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], np.asarray(norm(x[:1]))[0], atol=1e-6)


# ------------------------------------------------------------------------------------ precision, policies
def _dot_precisions(fn, *args) -> set[str]:
    """The precision of every dot_general/conv in the jaxpr of ``fn`` (nested jaxprs included)."""
    found: set[str] = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.add(str(eqn.params["precision"]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_precision_reaches_every_matmul_including_attention(reference, precision):
    model = Xcodec2Model.from_pretrained(reference.checkpoint, precision=precision)
    codec = nnx.merge(model.graphdef, model.state)
    frames = 9
    waveform = jnp.zeros((1, 1, frames * 320), jnp.float32)
    features = jnp.zeros((1, frames, 160), jnp.float32)
    encode = _dot_precisions(lambda w, f: codec.encode(w, f), waveform, features)
    decode = _dot_precisions(lambda z: codec.decode(z), jnp.zeros((1, frames, 96), jnp.float32))
    want = {"highest": "(Precision.HIGHEST, Precision.HIGHEST)", "default": "(Precision.DEFAULT, Precision.DEFAULT)"}
    assert encode == decode == {want[precision]}


def _dot_operand_dtypes(fn, *args) -> set[str]:
    """The operand dtypes of every dot_general in the jaxpr of ``fn`` (nested jaxprs included)."""
    found: set[str] = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.add("/".join(str(v.aval.dtype) for v in eqn.invars))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bf16_policy_keeps_parameters_and_the_fsq_input_path_in_float32(reference):
    model = Xcodec2Model.from_pretrained(reference.checkpoint, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(model.state)} == {jnp.dtype(jnp.float32)}
    codec = nnx.merge(model.graphdef, model.state)
    fused = jnp.zeros((1, 9, 96), jnp.bfloat16)
    assert _dot_operand_dtypes(lambda x: codec.quantizer.project_in(codec.fc_encoder(x)), fused) == {"float32/float32"}
    assert _dot_operand_dtypes(codec.quantize, fused[..., :32], fused[..., 32:]) == {
        "float32/float32", "bfloat16/bfloat16"}  # project_out, after FSQ, follows the decoder's policy
    head = codec.acoustic_decoder.head
    assert _dot_operand_dtypes(lambda x: head(x, None), jnp.zeros((1, 9, 64), jnp.bfloat16)) == {"float32/float32"}
    semantic = _dot_operand_dtypes(codec.semantic_encoder, jnp.zeros((1, 9, 160), jnp.float32))
    assert semantic == {"bfloat16/bfloat16"}
    assert codec.acoustic_encoder.conv1.numerics.dtype == jnp.float32  # the default policy's second part
    assert codec.acoustic_decoder.fc.numerics.dtype == jnp.bfloat16


@pytest.mark.parametrize(("backend", "bf16_parts"), [("cpu", "HIGHEST"), ("gpu", "HIGHEST"), ("tpu", "HIGH")])
def test_default_precision_is_high_only_for_bf16_models_float32_parts_on_tpu(monkeypatch, backend, bf16_parts):
    """precision=None: "highest", but "high" (bf16x3) for a bf16 model's float32 parts on a TPU host; a GPU's
    "high" is TF32, which flips far more codes."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert Numerics.create(jnp.bfloat16).precision == jax.lax.Precision[bf16_parts]
    assert Numerics.create(jnp.float32).precision == jax.lax.Precision.HIGHEST
    assert Numerics.create(jnp.bfloat16, "highest").precision == jax.lax.Precision.HIGHEST


def test_unknown_float32_part_is_refused(reference):
    with pytest.raises(ValueError, match="not parts of the codec"):
        Xcodec2Model.from_pretrained(reference.checkpoint, dtype=jnp.bfloat16, float32_parts=("decoder",))
    with pytest.raises(ValueError, match="precision="):
        Xcodec2Model.from_pretrained(reference.checkpoint, precision="fp32")



@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 300, 4, 64), (2, 50, 2, 16)])
@pytest.mark.parametrize("relative", [True, False])
def test_tpu_flash_attention_equals_xla_attention(relative, shape, dtype):
    """The TPU attention kernel (interpret mode) against XLA's attention (``jax.nn.dot_product_attention``, the
    GPU path), relative-key logits included.

    300 frames: 3 x 3 blocks of 128, the last reaching past the end (interpret mode reads NaN there), band
    and clamped-only tiles; 4 heads of 64 dims: two lane groups of two heads. 50 frames of 2 x 16 dims: one
    block of the sequence's own length, all heads in 32 lanes."""
    from xcodec2_jax.nn import attention_pallas
    from xcodec2_jax.nn.layers import RelativeKey

    _, t, _, d = shape
    numerics = Numerics.create(dtype, "highest")
    q, k, v = (jnp.asarray(_rng(seed).standard_normal(shape), dtype) for seed in (9, 10, 11))
    table = jnp.asarray(_rng(12).standard_normal((73, d)), jnp.float32)
    rel = RelativeKey(table, 64, 8) if relative else None
    mask = jnp.asarray(np.arange(t)[None, :] < np.array([t, 37])[:, None])
    scale = d**-0.5
    with jax.default_matmul_precision("highest"):
        want = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], scale=scale,
                                            bias=rel.logits(q, numerics) * scale if relative else None)
        got = attention_pallas.flash_attention(q, k, v, mask, *((table,) if relative else ()),
                                               left=64 if relative else 0, right=8 if relative else 0,
                                               precision=jax.lax.Precision.HIGHEST, interpret=True)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _max_err(got, want) < (5e-6 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("relative", [True, False])
def test_cpu_blocked_attention_equals_xla_attention(relative, dtype):
    """XLA:CPU's attention, one (item, head) block at a time, against jax.nn.dot_product_attention (the XLA
    form GPUs run), relative-key logits and key padding included."""
    from xcodec2_jax.nn import attention_cpu
    from xcodec2_jax.nn.layers import CPU_BLOCKED_MIN_KEYS, RelativeKey, attention

    t, numerics = CPU_BLOCKED_MIN_KEYS + 44, Numerics.create(dtype, "highest")
    q, k, v = (jnp.asarray(_rng(seed).standard_normal((3, t, 2, 64)), dtype) for seed in (13, 14, 15))
    rel = RelativeKey(jnp.asarray(_rng(16).standard_normal((73, 64)), jnp.float32), 64, 8) if relative else None
    mask = jnp.asarray(np.arange(t)[None, :] < np.array([t, 77, 1])[:, None])
    scale = 64**-0.5
    with jax.default_matmul_precision("highest"):
        want = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], scale=scale,
                                            bias=rel.logits(q, numerics) * scale if relative else None)
    extra = (rel.by_distance(q, numerics),) if relative else ()
    kernel = attention_cpu.blocked_attention(q, k, v, mask, *extra, left=64 if relative else 0,
                                             right=8 if relative else 0, precision=jax.lax.Precision.HIGHEST)
    dispatched = jax.jit(lambda q, k, v: attention(q, k, v, numerics=numerics, relative=rel, key_mask=mask))
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
    for got in (kernel, dispatched(q, k, v)):  # the kernel, and attention() choosing it on this CPU
        assert got.dtype == want.dtype
        assert _max_err(got, want) < tolerance


def test_tpu_input_conv_equals_xla_conv(reference):
    from xcodec2_jax.nn.acoustic import time_mask

    encoder = nnx.merge(reference.model.graphdef, reference.model.state).acoustic_encoder
    wave = jnp.asarray(_rng(14).standard_normal((2, 1, 3200)), jnp.float32)
    lengths = jnp.asarray([3200, 1280])
    want = encoder.conv1(wave, time_mask(lengths, 3200))
    assert _max_err(encoder.mono_fir(wave, lengths), want) < 2e-6
