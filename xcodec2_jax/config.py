"""Model configuration, read from a Transformers ``config.json`` of ``model_type`` "xcodec2" or "neucodec".

One dataclass describes every checkpoint family: X-Codec2 (Transformers layout), NeuCodec (16 kHz in,
24 kHz out), and the original ``xcodec2`` 0.1.5 layout and its fine-tunes (whose ``config.json`` carries
no sizes: :mod:`xcodec2_jax.original_layout` derives this config from the tensor shapes).

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

import numpy as np

from .errors import ConfigError
from .lengths import padded_frames, valid_samples, whole_frames

SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "relu", "gelu_new", "gelu_pytorch_tanh")
MODEL_TYPES = ("xcodec2", "neucodec")
# "transformers": keep the codes Transformers' ``audio_codes_mask`` marks valid, ``(T + 1) // hop`` (NeuCodec:
# its single-clip ``T // hop``); "original": keep every code of the padded clip, ``T // hop + 1``, as the
# ``xcodec2`` 0.1.5 package's ``encode_code`` returns them.
CODE_COUNT_RULES = ("transformers", "original")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A ``config.json`` as a dict; :class:`ConfigError` when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields, got {type(raw).__name__}")
    return raw


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
    # Checkpoint family. "neucodec": its features skip the hop/2 edge padding (one semantic frame fewer,
    # both branches trimmed to it) and its decoder synthesises ``output_sampling_rate`` audio.
    model_type: str = "xcodec2"
    output_sampling_rate: int | None = None  # None: ``sampling_rate`` (no rate change)
    decoder_hop_length: int | None = None  # ISTFT hop; None: ``hop_length`` rescaled to the output rate
    # Decoder upsampler between the final LayerNorm and the ISTFT head (Anime-XCodec2-44.1kHz family):
    # per stage a transposed conv of this stride and kernel size halving the channels, then a ResNet block.
    upsample_factors: tuple[int, ...] = ()
    upsample_kernel_sizes: tuple[int, ...] = ()
    code_count_rule: str = "transformers"

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
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type={self.model_type!r}; expected one of {MODEL_TYPES}")
        if self.code_count_rule not in CODE_COUNT_RULES:
            raise ConfigError(f"code_count_rule={self.code_count_rule!r}; expected one of {CODE_COUNT_RULES}")
        self._check_decoder_rates()

    def _check_decoder_rates(self) -> None:
        if len(self.upsample_factors) != len(self.upsample_kernel_sizes) or min(self.upsample_factors, default=1) < 1:
            raise ConfigError(f"upsample_factors={self.upsample_factors} and upsample_kernel_sizes="
                              f"{self.upsample_kernel_sizes} must be positive and of the same length")
        for factor, kernel in zip(self.upsample_factors, self.upsample_kernel_sizes, strict=True):
            if kernel < factor or (kernel - factor) % 2:
                # padding (k - u) // 2 each side gives exactly u output frames per input frame only then
                raise ConfigError(f"upsample kernel size {kernel} must be >= its factor {factor} and differ "
                                  "from it by an even number")
        if self.hidden_size % (self.group_norm_groups * 2 ** len(self.upsample_factors)):
            raise ConfigError(f"hidden_size={self.hidden_size} halved {len(self.upsample_factors)} times by the "
                              f"upsampler must stay a multiple of {self.group_norm_groups} (GroupNorm groups)")
        # Output samples per code must be a whole number and match the two rates.
        if self.output_hop_length * self.sampling_rate != self.output_rate * self.hop_length:
            raise ConfigError(
                f"the decoder gives {self.output_hop_length} samples per code (ISTFT hop {self.istft_hop_length} "
                f"x upsampling {math.prod(self.upsample_factors)}), which at {self.frame_rate:g} codes/s is not "
                f"output_sampling_rate={self.output_rate}"
            )

    # ----------------------------------------------------------------------------------------- derived
    @property
    def hop_length(self) -> int:
        """Input audio samples per code frame (product of the downsampling ratios: 320 at 16 kHz)."""
        return math.prod(self.downsampling_ratios)

    @property
    def output_rate(self) -> int:
        """Sampling rate of the decoded audio in Hz (16 kHz X-Codec2, 24 kHz NeuCodec, 44.1 kHz Anime)."""
        return self.sampling_rate if self.output_sampling_rate is None else self.output_sampling_rate

    @property
    def istft_hop_length(self) -> int:
        """Hop of the ISTFT head, in output samples per decoder frame (NeuCodec: 320 * 24 / 16 = 480)."""
        if self.decoder_hop_length is not None:
            return self.decoder_hop_length
        return int(self.hop_length * self.output_rate / self.sampling_rate)

    @property
    def output_hop_length(self) -> int:
        """Decoded samples per code: the ISTFT hop times the upsampler's factors."""
        return self.istft_hop_length * math.prod(self.upsample_factors)

    @property
    def n_fft(self) -> int:
        return self.istft_hop_length * 4

    @property
    def semantic_frame_lag(self) -> int:
        """Semantic frames fewer than acoustic ones: NeuCodec's features drop the hop/2 edge padding."""
        return 1 if self.model_type == "neucodec" else 0

    def padded_frames(self, num_samples: int) -> int:
        """Code frames of a clip of ``num_samples`` once padded: one sample appended, then up to the hop."""
        return padded_frames(valid_samples(num_samples), self.hop_length)

    def num_codes(self, num_samples):
        """Codes kept for clips of ``num_samples`` input samples, an int or an integer array (see
        ``CODE_COUNT_RULES``)."""
        frames = self.padded_frames(num_samples) - self.semantic_frame_lag
        if self.code_count_rule == "original":
            return frames
        return np.minimum(frames, whole_frames(valid_samples(num_samples), self.hop_length))

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
        """Build from a Transformers ``Xcodec2Config`` / ``NeuCodecConfig.to_dict()``-style mapping."""
        try:
            return cls._from_dict(raw)
        except TypeError as err:  # a value of the wrong type ("hidden_size": "big") fails in the arithmetic
            raise ConfigError(f"a config value has the wrong type ({err})") from err

    @classmethod
    def _from_dict(cls, raw: Mapping[str, Any]) -> Xcodec2Config:
        model_type = raw.get("model_type", "xcodec2")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type={model_type!r}; expected one of {MODEL_TYPES}")
        fields = _pick(raw, cls)
        fields.pop("semantic", None)
        fields["model_type"] = model_type
        if model_type == "neucodec":  # NeuCodecConfig names its input rate differently
            fields["sampling_rate"] = raw.get("input_sampling_rate", 16000)
            fields["output_sampling_rate"] = raw.get("output_sampling_rate", 24000)
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
        return cls.from_dict(read_config_file(path))

    def to_dict(self) -> dict[str, Any]:
        """A Transformers-compatible ``config.json`` mapping (round-trips through :meth:`from_dict`).

        Fields Transformers does not have (the upsampler, the original code count) are written only when
        they differ from the defaults; such a config loads here but not in Transformers.
        """
        defaults = Xcodec2Config()
        out: dict[str, Any] = {"architectures": ["NeuCodecModel" if self.model_type == "neucodec" else "Xcodec2Model"]}
        extras = ("output_sampling_rate", "decoder_hop_length", "upsample_factors", "upsample_kernel_sizes",
                  "code_count_rule")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("semantic", "rope_theta") or (f.name in extras and value == getattr(defaults, f.name)):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.model_type == "neucodec":
            del out["sampling_rate"]
            out["input_sampling_rate"], out["output_sampling_rate"] = self.sampling_rate, self.output_rate
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        out["semantic_model_config"] = {"model_type": "wav2vec2-bert", **dataclasses.asdict(self.semantic)}
        return out
