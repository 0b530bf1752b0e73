"""Config parsing: every shape/numerics field honoured, unsupported values rejected by name."""

from __future__ import annotations

import pytest
from conftest import TINY
from transformers import Xcodec2Config as TorchXcodec2Config

from xcodec2_jax import ConfigError, Xcodec2Config


def test_defaults_match_transformers():
    assert Xcodec2Config.from_dict(TorchXcodec2Config().to_dict()) == Xcodec2Config()


def test_tiny_config_fields():
    config = Xcodec2Config.from_dict(TorchXcodec2Config(**TINY).to_dict())
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (64, 4, 16)
    assert (config.semantic.hidden_size, config.semantic.num_hidden_layers, config.semantic.head_size) == (32, 2, 16)
    assert (config.hop_length, config.n_fft, config.codebook_size, config.frame_rate) == (320, 1280, 65536, 50.0)


def test_round_trip_through_transformers():
    config = Xcodec2Config.from_dict(TorchXcodec2Config(**TINY, rms_norm_eps=1e-5).to_dict())
    reread = TorchXcodec2Config(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    assert Xcodec2Config.from_dict(reread.to_dict()) == config


def test_missing_semantic_config_uses_xcodec2_default_of_16_layers():
    assert Xcodec2Config.from_dict({"model_type": "xcodec2"}).semantic.num_hidden_layers == 16


def test_legacy_top_level_rope_theta():
    assert Xcodec2Config.from_dict({"rope_theta": 500.0}).rope_theta == 500.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "dac"}, "model_type='dac'"),
        ({"semantic_model_config": {"position_embeddings_type": "rotary"}}, "position_embeddings_type='rotary'"),
        ({"semantic_model_config": {"add_adapter": True}}, "add_adapter"),
        ({"semantic_model_config": {"hidden_act": "mish"}}, "semantic_model_config.hidden_act='mish'"),
        ({"semantic_model_config": {"conv_depthwise_kernel_size": 30}}, "must be odd"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ({"hidden_act": "mish"}, "hidden_act='mish'"),
        ({"quantization_dim": 1000}, "quantization_dim=1000 must equal"),
        ({"num_key_value_heads": 4}, "num_key_value_heads=4 must equal num_attention_heads=16"),
        ({"hidden_size": 1000, "quantization_dim": 2024}, "multiple of 32"),
        ({"quantization_levels": [4, 1]}, "quantization_levels"),
    ],
)
def test_unsupported_values_raise(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Xcodec2Config.from_dict({"model_type": "xcodec2", **change})
