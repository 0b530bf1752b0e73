"""The checkpoint table and strict loading: every key consumed, every parameter filled, shapes checked."""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import Xcodec2Config as TorchXcodec2Config
from transformers import Xcodec2Model as TorchXcodec2Model

from xcodec2_jax import CheckpointError, Xcodec2Config, Xcodec2Model
from xcodec2_jax.nn.antialias import FILTER_TAPS, RATIO, kaiser_sinc_filter
from xcodec2_jax.nn.codec import Xcodec2Codec
from xcodec2_jax.nn.decoder import hann_window, rope_tables
from xcodec2_jax.nn.quantizer import FSQ
from xcodec2_jax.weights import TABLE, TRAINING_ONLY, ArraySource, expected_params, plan_load, translate


def _edited_checkpoint(reference, tmp_path, edit):
    """A copy of the reference checkpoint whose tensors went through ``edit(dict) -> dict``."""
    shutil.copy(reference.checkpoint / "config.json", tmp_path / "config.json")
    tensors = edit(load_file(reference.checkpoint / "model.safetensors"))
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def _state_arrays(model: Xcodec2Model, state: nnx.State | None = None) -> dict[str, np.ndarray]:
    """``state`` (default: the model's parameters) as dotted name -> array."""
    state = model.state if state is None else state
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_full_size_checkpoint_layout_is_covered_by_the_table():
    """Transformers' full-size state dict (meta tensors, no memory) maps onto our full-size tree exactly."""
    with torch.device("meta"):
        torch_model = TorchXcodec2Model(TorchXcodec2Config())
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    abstract = nnx.eval_shape(lambda: Xcodec2Codec(Xcodec2Config(), rngs=nnx.Rngs(0)))
    expected = expected_params(abstract)
    plan = plan_load(expected, ArraySource(torch_model.state_dict()), flax=False)
    assert {target for target, _ in plan.values()} == set(expected)
    assert sum(int(np.prod(s.shape)) for s in expected.values()) == pytest.approx(629e6, rel=0.01)
    first_rule = lambda key: next(r for r in TABLE if key.endswith("." + r.leaf)
                                  and re.fullmatch(r.module, key.rpartition(".")[0]))
    used = {first_rule(key) for key in shapes if key not in TRAINING_ONLY}
    upsampler_only = {r for r in TABLE if "upsample_layers" in r.module}  # the Anime-XCodec2 family's
    assert used | upsampler_only == set(TABLE), "every other rule is used by the real checkpoint layout"


def test_renamed_key_is_reported_by_name(reference, tmp_path):
    old = "acoustic_decoder.prior_net.0.conv1.weight"
    directory = _edited_checkpoint(reference, tmp_path, lambda t: {("acoustic_decoder.prior_net.0.conv1.w"
                                                                    if k == old else k): v for k, v in t.items()})
    with pytest.raises(CheckpointError) as err:
        Xcodec2Model.from_pretrained(directory)
    message = str(err.value)
    assert "missing parameters (1): acoustic_decoder.prior_net.0.conv1.kernel" in message
    assert "unexpected keys (1): acoustic_decoder.prior_net.0.conv1.w" in message


def test_wrong_shape_is_reported_by_name(reference, tmp_path):
    key = "semantic_encoder.encoder.layers.1.self_attn.linear_q.weight"
    directory = _edited_checkpoint(reference, tmp_path, lambda t: {**t, key: t[key][:, :-1].copy()})
    with pytest.raises(CheckpointError, match=re.escape(f"mis-shaped keys (1): {key}: checkpoint (32, 31)")):
        Xcodec2Model.from_pretrained(directory)


def test_extra_key_is_reported(reference, tmp_path):
    directory = _edited_checkpoint(reference, tmp_path, lambda t: {**t, "quantizer.extra.weight": np.zeros(3)})
    with pytest.raises(CheckpointError, match=re.escape("unexpected keys (1): quantizer.extra.weight")):
        Xcodec2Model.from_pretrained(directory)


def _rope_tables_from(inv_freq: np.ndarray, heads: int) -> np.ndarray:
    """Transformers' cos / sin (2, heads, head_dim) for positions 0..heads-1 (RoPE runs over the heads axis)."""
    angles = np.arange(heads)[:, None] * inv_freq.astype(np.float64)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.stack([np.cos(angles), np.sin(angles)])


def _counterparts(config: Xcodec2Config) -> dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """Buffer leaf name -> (Transformers' buffer value -> (what our modules compute, what it should be))."""
    fsq = FSQ(config.quantization_levels)
    heads, head_dim = config.num_attention_heads, config.head_dim
    ours_rope = np.stack(rope_tables(heads, head_dim, config.rope_theta))
    aa_filter = kaiser_sinc_filter(cutoff=0.5 / RATIO, half_width=0.6 / RATIO, taps=FILTER_TAPS)[None, None]
    codebook = np.asarray(fsq.codes_from_indices(jnp.arange(config.codebook_size)))
    return {
        "filter": lambda buffer: (aa_filter, buffer),
        "window": lambda buffer: (hann_window(config.n_fft), buffer),
        "levels": lambda buffer: (fsq.levels, buffer),
        "basis": lambda buffer: (fsq.basis, buffer),
        "codebook": lambda buffer: (codebook, buffer),
        # We keep no inv_freq, only the cos / sin tables made from it.
        "inv_freq": lambda buffer: (ours_rope, _rope_tables_from(buffer, heads)),
        "original_inv_freq": lambda buffer: (ours_rope, _rope_tables_from(buffer, heads)),
    }


def test_buffers_are_computed_not_loaded_and_equal_transformers(reference):
    """Every buffer of Transformers' model stays out of its checkpoint, claims no parameter of ours, and equals
    what our modules compute (a buffer Transformers adds later fails here until it is accounted for)."""
    torch_model = reference.torch_model
    saved = set(torch_model.state_dict())
    expected = expected_params(nnx.eval_shape(lambda: Xcodec2Codec(reference.model.config, rngs=nnx.Rngs(0))))
    counterparts = _counterparts(reference.model.config)
    buffers = dict(torch_model.named_buffers())
    assert len(buffers) > 70  # 72 anti-alias filters, FSQ levels / basis / codebook, RoPE, Hann window
    for name, buffer in buffers.items():
        assert name not in saved, f"{name} is saved in Transformers' checkpoints"
        target = translate(name)
        assert target is None or target[0] not in expected, f"{name} would be loaded into {target[0]}"
        leaf = name.rsplit(".", 1)[-1]
        assert leaf in counterparts, f"Transformers' buffer {name} has no computed counterpart here"
        ours, want = counterparts[leaf](buffer.numpy())
        np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load(reference, tmp_path, dtype, torch_features):
    copy.deepcopy(reference.torch_model).to(dtype).save_pretrained(tmp_path)
    model = Xcodec2Model.from_pretrained(tmp_path)
    assert all(v.dtype == np.float32 for v in _state_arrays(model).values())
    # Same weights as Transformers reads from that file, so the same codes.
    torch_model = TorchXcodec2Model.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch_model.encode(**torch_features).audio_codes.numpy()
    features = {k: v.numpy() for k, v in torch_features.items()}
    got = model.encode(features["input_values"], features["input_features"],
                       input_features_mask=features["input_features_mask"]).audio_codes
    assert (got == want).mean() >= 0.999


def test_sharded_checkpoint_loads(reference, tmp_path):
    reference.torch_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded, single = _state_arrays(Xcodec2Model.from_pretrained(tmp_path)), _state_arrays(reference.model)
    assert sharded.keys() == single.keys()
    for key in single:
        np.testing.assert_array_equal(sharded[key], single[key])


def test_flax_checkpoint_round_trip(reference, tmp_path):
    reference.model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "flax_model.safetensors"]
    reloaded = Xcodec2Model.from_pretrained(tmp_path)
    assert reloaded.config == reference.model.config
    before, after = _state_arrays(reference.model), _state_arrays(reloaded)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_unknown_flax_format_version_is_refused(reference, tmp_path):
    reference.model.save_pretrained(tmp_path)
    weights = tmp_path / "flax_model.safetensors"
    save_file(load_file(weights), str(weights), metadata={"format": "xcodec2-jax", "version": "99"})
    with pytest.raises(CheckpointError, match=r"format version '99'.*reads versions"):
        Xcodec2Model.from_pretrained(tmp_path)
    save_file(load_file(weights), str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a checkpoint written by xcodec2-jax"):
        Xcodec2Model.from_pretrained(tmp_path)


def test_bfloat16_model_keeps_its_parameters_in_float32(reference):
    model = Xcodec2Model.from_pretrained(reference.checkpoint, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16  # the compute dtype; parameters are stored in float32 (param_dtype)
    arrays = _state_arrays(model)
    assert arrays["acoustic_decoder.layers.0.self_attn.q_proj.kernel"].dtype == np.float32
    assert arrays["acoustic_decoder.norm.scale"].dtype == np.float32
    assert arrays["acoustic_decoder.prior_net.0.norm1.bias"].dtype == np.float32
    assert jax.tree.all(jax.tree.map(lambda x: bool(jnp.isfinite(x.astype(jnp.float32)).all()), model.state))


def test_engines_place_bfloat16_layers_weights_in_bfloat16_with_the_same_numbers(reference):
    model = Xcodec2Model.from_pretrained(reference.checkpoint, dtype=jnp.bfloat16)
    placed = _state_arrays(model, model.device_model().state)
    assert placed["acoustic_decoder.layers.0.self_attn.q_proj.kernel"].dtype == jnp.bfloat16
    assert placed["acoustic_decoder.embed.bias"].dtype == jnp.bfloat16
    assert placed["semantic_encoder.encoder.layers.0.conv_module.depthwise_conv.kernel"].dtype == jnp.bfloat16
    for float32_weight in ("acoustic_decoder.head.linear.kernel", "quantizer.project_in.kernel",  # ISTFT, FSQ input
                           "acoustic_decoder.norm.scale", "acoustic_encoder.conv1.kernel"):  # norms, f32 part
        assert placed[float32_weight].dtype == jnp.float32, float32_weight
    assert _state_arrays(model)["acoustic_decoder.layers.0.self_attn.q_proj.kernel"].dtype == np.float32

    # Cast once when placed or in every call: the same numbers, bit for bit.
    latents = jax.random.normal(jax.random.key(0), (2, 9, model.config.quantization_dim), jnp.bfloat16)
    decode = jax.jit(lambda state, z: nnx.merge(model.graphdef, state).decode(z, jnp.array([9, 5])))
    np.testing.assert_array_equal(decode(model.device_model().state, latents), decode(model.state, latents))
