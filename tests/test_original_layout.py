"""The original ``xcodec2`` 0.1.5 layout against the original package's own modules, on a tiny random checkpoint
(``TINY_ORIGINAL`` in conftest.py says how its sizes were chosen)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_nontrivial
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import Xcodec2Model as TorchXcodec2Model

from convert.kaldi_reference import reference_feature_extractor
from convert.original_reference import save_original_checkpoint
from xcodec2_jax import CheckpointError, Xcodec2Model
from xcodec2_jax.cli import main as cli_main
from xcodec2_jax.hub import CheckpointNotFoundError

DECODE_TOL = 1e-4


def _arrays(model: Xcodec2Model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(model.state)}


def test_config_is_read_from_the_shapes(original):
    config = original[2].config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 2)
    assert (config.head_dim, config.encoder_hidden_size, config.quantization_dim) == (64, 8, 144)
    assert config.downsampling_ratios == (2, 2, 4, 4, 5)
    assert (config.semantic.hidden_size, config.semantic.num_hidden_layers, config.semantic.num_attention_heads) \
        == (16, 16, 2)
    assert config.semantic.conv_depthwise_kernel_size == 5 and config.code_count_rule == "original"


def test_codes_and_audio_match_the_original_package(original, original_clips):
    torch_model, _, model = original
    got_codes = model.encode_audio(original_clips)  # one padded batch: padding-exact, so each as alone
    got_audio = model.decode_codes(got_codes)
    for clip, codes, audio in zip(original_clips, got_codes, got_audio, strict=True):
        with torch.no_grad():
            want_codes = torch_model.encode_code(torch.from_numpy(clip)[None])
            want_audio = torch_model.decode_code(want_codes)[0, 0].numpy()
        assert codes.size == clip.size // 320 + 1, "the original keeps every code of the padded clip"
        np.testing.assert_array_equal(codes, want_codes[0, 0].numpy())
        assert audio.shape == want_audio.shape
        print(f"original layout, {clip.size} samples: {codes.size} codes equal; decode max abs err "
              f"{np.abs(audio - want_audio).max():.3g} (peak {np.abs(want_audio).max():.3g})")
        assert np.abs(audio - want_audio).max() < DECODE_TOL
        assert_nontrivial(codes, audio)


def test_legacy_spellings_load_the_same_weights(original, tmp_path):
    """weight_g / weight_v (older weight norm) and act.beta (older SnakeBeta) give the same parameters."""
    torch_model, _, model = original
    legacy = Xcodec2Model.from_pretrained(save_original_checkpoint(torch_model, tmp_path, legacy=True))
    before, after = _arrays(model), _arrays(legacy)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_weight_norm_is_folded_and_qkv_split(original):
    """Two conversions checked directly: g * v / ||v|| and the fused c_attn's q rows (RoPE-permuted)."""
    torch_model, _, model = original
    arrays = _arrays(model)
    conv = torch_model.CodecEnc.conv_blocks[0]
    np.testing.assert_allclose(arrays["acoustic_encoder.conv1.kernel"],
                               conv.weight.detach().numpy().transpose(2, 1, 0), rtol=1e-6, atol=1e-7)
    fused = torch_model.generator.backbone.transformers[0].att.c_attn.weight.detach().numpy()
    v_rows = fused[2 * 128 :]  # v is not permuted
    np.testing.assert_array_equal(arrays["acoustic_decoder.layers.0.self_attn.v_proj.kernel"], v_rows.T)


def _edited(directory, tmp_path, edit):
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    save_file(edit(load_file(directory / "model.safetensors")), str(tmp_path / "model.safetensors"))
    return tmp_path


def test_renamed_key_is_reported_by_its_original_name(original, tmp_path):
    old = "generator.backbone.prior_net.0.conv1.weight"
    new = "generator.backbone.prior_net.0.conv1.w"
    directory = _edited(original[1], tmp_path, lambda t: {(new if k == old else k): v for k, v in t.items()})
    with pytest.raises(CheckpointError) as err:
        Xcodec2Model.from_pretrained(directory)
    assert new in str(err.value) and "acoustic_decoder.prior_net.0.conv1.kernel" in str(err.value)


def test_misshaped_key_is_reported_by_its_original_name(original, tmp_path):
    key = "CodecEnc.conv_blocks.1.block.4.parametrizations.weight.original1"
    directory = _edited(original[1], tmp_path, lambda t: {**t, key: t[key][:, :-1].copy()})
    with pytest.raises(CheckpointError, match=re.escape(key)):
        Xcodec2Model.from_pretrained(directory)


def test_weight_norm_without_its_partner_is_reported(original, tmp_path):
    key = "CodecEnc.conv_final_block.1.parametrizations.weight.original0"
    directory = _edited(original[1], tmp_path, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match=re.escape("CodecEnc.conv_final_block.1.parametrizations.weight."
                                                        "original1 without its partner")):
        Xcodec2Model.from_pretrained(directory)


def test_pickled_checkpoints_are_refused(original, tmp_path):
    (tmp_path / "config.json").write_text((original[1] / "config.json").read_text())
    (tmp_path / "epoch=4-step=1400000.ckpt").write_bytes(b"not unpickled")
    for target in (tmp_path, tmp_path / "epoch=4-step=1400000.ckpt"):
        with pytest.raises(CheckpointNotFoundError, match=r"pickled PyTorch checkpoint.*safetensors\.torch\.save_file"):
            Xcodec2Model.from_pretrained(target)


def test_export_loads_in_transformers_with_the_original_codes(original, original_clips, tmp_path):
    """Exported to Transformers' layout, Transformers gives the original's codes (it keeps all frames too)."""
    torch_model, _, model = original
    model.save_pretrained(tmp_path, format="transformers")
    exported, info = TorchXcodec2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    clip = original_clips[1]
    with torch.no_grad():
        theirs = exported.eval().encode(**reference_feature_extractor()(clip, sampling_rate=16000,
                                                                        return_tensors="pt")).audio_codes
        want = torch_model.encode_code(torch.from_numpy(clip)[None])
    np.testing.assert_array_equal(theirs.numpy(), want.numpy())


def test_cli_convert_accepts_the_original_layout(original, tmp_path, capsys):
    assert cli_main(["convert", "--src", str(original[1]), "--out", str(tmp_path / "flax")]) == 0
    converted = Xcodec2Model.from_pretrained(tmp_path / "flax")
    assert converted.config == original[2].config
    before, after = _arrays(original[2]), _arrays(converted)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
