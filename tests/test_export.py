"""Export back to Transformers: ``save_pretrained(format="transformers")`` and ``xcodec2-jax export``.

The exported directory must load in Transformers' ``Xcodec2Model.from_pretrained`` with no missing,
unexpected or mismatched keys and give the codes our model gives. (NeuCodec: ``test_neucodec.py``; the
original layout: ``test_original_layout.py``.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import Xcodec2Model as TorchXcodec2Model

from xcodec2_jax import ConfigError, Xcodec2Config, Xcodec2Model
from xcodec2_jax.cli import main as cli_main
from xcodec2_jax.config import SemanticConfig
from xcodec2_jax.nn.codec import Xcodec2Codec
from xcodec2_jax.weights import untranslate


def _load_strictly(directory) -> TorchXcodec2Model:
    model, info = TorchXcodec2Model.from_pretrained(directory, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def test_export_round_trip_gives_the_same_codes(reference, torch_features, tmp_path):
    reference.model.save_pretrained(tmp_path, format="transformers")
    exported = _load_strictly(tmp_path)
    want = reference.torch_model.state_dict()
    for key, value in exported.state_dict().items():
        if key != "semantic_encoder.masked_spec_embed":  # training only, not kept (exported as zeros)
            torch.testing.assert_close(value, want[key], rtol=0, atol=0)
    with torch.no_grad():
        theirs = exported.encode(**torch_features).audio_codes.numpy()
    features = {k: v.numpy() for k, v in torch_features.items()}
    ours = reference.model.encode(features["input_values"], features["input_features"],
                                  input_features_mask=features["input_features_mask"]).audio_codes
    np.testing.assert_array_equal(ours, theirs)


def test_cli_export_writes_a_transformers_checkpoint(reference, tmp_path, capsys):
    assert cli_main(["export", "--src", str(reference.checkpoint), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors",
                                                           "preprocessor_config.json"]
    assert "exported" in capsys.readouterr().out
    _load_strictly(tmp_path)


def test_bfloat16_model_exports_its_float32_parameters_unchanged(reference, tmp_path):
    model = Xcodec2Model.from_pretrained(reference.checkpoint, dtype=jnp.bfloat16)  # bf16 compute, f32 storage
    model.save_pretrained(tmp_path, format="transformers")
    _load_strictly(tmp_path)
    tensors, source = load_file(tmp_path / "model.safetensors"), load_file(reference.checkpoint / "model.safetensors")
    for key in ("acoustic_decoder.layers.0.self_attn.q_proj.weight", "acoustic_decoder.norm.weight"):
        assert tensors[key].dtype == np.float32
        np.testing.assert_array_equal(tensors[key], source[key])  # lossless: nothing was rounded to bf16


def test_untranslate_reads_the_table_backwards():
    assert untranslate("acoustic_decoder.layers.0.self_attn.q_proj.kernel") == \
        ("acoustic_decoder.layers.0.self_attn.q_proj.weight", (1, 0))
    assert untranslate("acoustic_encoder.block.0.conv1.kernel") == ("acoustic_encoder.block.0.conv1.weight", (2, 1, 0))
    assert untranslate("semantic_encoder.encoder.layers.0.ffn1_layer_norm.scale")[0] == \
        "semantic_encoder.encoder.layers.0.ffn1_layer_norm.weight"


def test_models_with_an_upsampler_are_not_exported(tmp_path):
    semantic = SemanticConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = Xcodec2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=16, encoder_hidden_size=8, quantization_dim=96,
                           semantic=semantic, output_sampling_rate=44100, decoder_hop_length=294, upsample_factors=(3,),
                           upsample_kernel_sizes=(9,), code_count_rule="original")
    abstract = nnx.eval_shape(lambda: Xcodec2Codec(config, rngs=nnx.Rngs(0)))  # shapes only: nothing to compute
    with pytest.raises(ConfigError, match="upsampler"):
        Xcodec2Model(config, abstract).save_pretrained(tmp_path, format="transformers")
