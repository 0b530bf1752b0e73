"""Model configuration, read from a Transformers ``config.json`` of ``model_type`` "xcodec2".

Every field that changes parameter shapes or numerics is kept; anything the port does not implement
(another position-embedding type, an adapter on top of the semantic encoder, a RoPE scaling type, an
unknown activation) raises :class:`ConfigError` instead of building a silently different model.
Keys that only matter for training (dropouts, initializer range, SpecAugment) are accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "relu", "gelu_new", "gelu_pytorch_tanh")


def _check_activation(name: str, field: str) -> str:
    if name not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"{field}={name!r} is not supported; expected one of {SUPPORTED_ACTIVATIONS}")
    return name


def _pick(source: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The entries of ``source`` that are fields of dataclass ``cls``, lists turned into tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in source.items() if k in names}


@dataclasses.dataclass(frozen=True)
class SemanticConfig:
    """The Wav2Vec2-BERT conformer that turns stacked log-mel frames into semantic features."""

    hidden_size: int = 1024
    num_hidden_layers: int = 16  # Xcodec2Config's default for its semantic model (wav2vec2-bert has 24)
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    feature_projection_input_dim: int = 160
    hidden_act: str = "swish"
    layer_norm_eps: float = 1e-5
    position_embeddings_type: str | None = "relative_key"
    left_max_position_embeddings: int = 64
    right_max_position_embeddings: int = 8
    conv_depthwise_kernel_size: int = 31
    add_adapter: bool = False
    use_intermediate_ffn_before_adapter: bool = False

    def __post_init__(self) -> None:
        if self.position_embeddings_type != "relative_key":
            raise ConfigError(
                f"semantic_model_config.position_embeddings_type={self.position_embeddings_type!r} is not "
                "supported; X-Codec2 uses 'relative_key'"
            )
        if self.add_adapter or self.use_intermediate_ffn_before_adapter:
            raise ConfigError(
                "semantic_model_config.add_adapter / use_intermediate_ffn_before_adapter are not supported: "
                "X-Codec2 uses the bare Wav2Vec2-BERT encoder output"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"semantic hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.conv_depthwise_kernel_size % 2 == 0:
            raise ConfigError(
                f"semantic conv_depthwise_kernel_size={self.conv_depthwise_kernel_size} must be odd"
            )
        _check_activation(self.hidden_act, "semantic_model_config.hidden_act")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_distances(self) -> int:
        """Rows of the relative-key ``distance_embedding`` table."""
        return self.left_max_position_embeddings + self.right_max_position_embeddings + 1


@dataclasses.dataclass(frozen=True)
class Xcodec2Config:
    """The whole codec: acoustic encoder, FSQ quantizer and Vocos decoder, plus the semantic model."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 64
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    encoder_hidden_size: int = 48
    downsampling_ratios: tuple[int, ...] = (2, 2, 4, 4, 5)
    sampling_rate: int = 16000
    quantization_dim: int = 2048
    quantization_levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4, 4, 4)
    semantic: SemanticConfig = dataclasses.field(default_factory=SemanticConfig)

    # Fixed by the architecture (the ResNet blocks, the final LayerNorm), not read from config.json.
    group_norm_groups = 32
    group_norm_eps = 1e-6
    decoder_layer_norm_eps = 1e-6

    def __post_init__(self) -> None:
        _check_activation(self.hidden_act, "hidden_act")
        if self.hidden_size % self.group_norm_groups:
            raise ConfigError(
                f"hidden_size={self.hidden_size} must be a multiple of {self.group_norm_groups} "
                "(GroupNorm groups of the decoder ResNet blocks)"
            )
        if self.num_key_value_heads != self.num_attention_heads:
            # The reference rotates keys by a per-*query*-head angle (RoPE over the heads axis), which
            # cannot broadcast against fewer KV heads: Transformers itself fails on such a config.
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must equal num_attention_heads="
                f"{self.num_attention_heads}: X-Codec2's heads-axis RoPE does not support grouped KV heads"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        fused = self.hidden_size + self.semantic.hidden_size
        if self.quantization_dim != fused:
            raise ConfigError(
                f"quantization_dim={self.quantization_dim} must equal hidden_size + semantic hidden_size "
                f"= {fused} (fc_encoder feeds the quantizer and the decoder's fc reads it back)"
            )
        if not self.downsampling_ratios or min(self.downsampling_ratios) < 1:
            raise ConfigError(f"downsampling_ratios={self.downsampling_ratios} must be positive integers")
        if not self.quantization_levels or min(self.quantization_levels) < 2:
            raise ConfigError(f"quantization_levels={self.quantization_levels} must be integers >= 2")

    # ----------------------------------------------------------------------------------------- derived
    @property
    def hop_length(self) -> int:
        """Audio samples per code frame (product of the downsampling ratios: 320 at 16 kHz)."""
        return math.prod(self.downsampling_ratios)

    @property
    def n_fft(self) -> int:
        return self.hop_length * 4

    @property
    def codebook_size(self) -> int:
        return math.prod(self.quantization_levels)

    @property
    def frame_rate(self) -> float:
        """Code frames per second."""
        return self.sampling_rate / self.hop_length

    @property
    def acoustic_hidden_size(self) -> int:
        """Channels at the end of the acoustic encoder's strided blocks."""
        return self.encoder_hidden_size * 2 ** len(self.downsampling_ratios)

    # ------------------------------------------------------------------------------------ (de)serialise
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Xcodec2Config:
        """Build from a Transformers ``Xcodec2Config.to_dict()``-style mapping."""
        model_type = raw.get("model_type", "xcodec2")
        if model_type != "xcodec2":
            raise ConfigError(f"model_type={model_type!r}; expected 'xcodec2'")
        fields = _pick(raw, cls)
        fields.pop("semantic", None)
        rope = raw.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported; expected 'default'")
        fields["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", cls.rope_theta)))
        # Transformers fills these two when they are null.
        hidden = fields.get("hidden_size", cls.hidden_size)
        heads = fields.get("num_attention_heads", cls.num_attention_heads)
        if fields.get("head_dim") is None:
            fields["head_dim"] = hidden // heads
        if fields.get("num_key_value_heads") is None:
            fields["num_key_value_heads"] = heads
        semantic = raw.get("semantic_model_config") or {}
        sem_type = semantic.get("model_type", "wav2vec2-bert")
        if sem_type != "wav2vec2-bert":
            raise ConfigError(f"semantic_model_config.model_type={sem_type!r}; expected 'wav2vec2-bert'")
        return cls(**fields, semantic=SemanticConfig(**_pick(semantic, SemanticConfig)))

    @classmethod
    def from_json_file(cls, path: str | Path) -> Xcodec2Config:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except TypeError as err:  # a value of the wrong type ("hidden_size": "big") fails in the arithmetic
            raise ConfigError(f"{path}: a config value has the wrong type ({err})") from err

    def to_dict(self) -> dict[str, Any]:
        """A Transformers-compatible ``config.json`` mapping (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = {"model_type": "xcodec2", "architectures": ["Xcodec2Model"]}
        for f in dataclasses.fields(self):
            if f.name in ("semantic", "rope_theta"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        out["semantic_model_config"] = {"model_type": "wav2vec2-bert", **dataclasses.asdict(self.semantic)}
        return out
