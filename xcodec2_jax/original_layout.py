"""The original ``xcodec2`` 0.1.5 checkpoint layout (``HKUSTAudio/xcodec2`` and its fine-tunes), on the fly.

The original ``XCodec2Model`` keeps a full 24-layer w2v-bert-2.0 (``semantic_model.``), weight-normed
acoustic-encoder convs (``CodecEnc.``), a fused q/k/v projection with torchtune's interleaved RoPE
(``generator.backbone.transformers.N.att.c_attn``) and persistent buffers. This module presents such a
checkpoint as a *Transformers-layout* tensor source, so the one Transformers -> Flax table of
:mod:`xcodec2_jax.weights` loads it. Everything is declared in the tables below, applied in this order:

1. ``MODULE_RENAMES`` (first match) and ``PARAMETER_RENAMES`` (all) turn each original key into the
   Transformers key (and the same naming as Transformers' own converter).
2. ``BUFFERS`` are dropped (the modules recompute them); so are the semantic layers past the
   ``num_hidden_layers`` the codec uses (the original reads hidden state 16 of 24).
3. ``COMBINE`` rules turn groups of tensors into others: weight norm folded as ``g * v / ||v||`` (norm over
   every axis but 0) in float32, for both the ``parametrizations.weight.original0/1`` and the legacy
   ``weight_g/weight_v`` spelling; the fused ``c_attn`` split into q/k/v with q and k permuted from
   interleaved-pair RoPE to rotate-half RoPE, as Transformers' converter does.

The original ``config.json`` (``BigCodecConfig``, ``model_type`` "xcodec") carries no sizes; they come from
the tensor shapes (widths, layer counts, strides), from the original modules' defaults where shapes cannot
tell (decoder heads = hidden / 64, the torchtune RoPE dimension; w2v-bert relative positions 64 / 8) and,
for the Anime-XCodec2 44.1 kHz family, from its ``sample_rate``, ``hop_length``, ``upsample_factors`` and
``upsample_kernel_sizes``. Codes follow the original's own preprocessing: ``T // 320 + 1`` per clip.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from .checkpoint_files import SafetensorsFiles
from .config import SemanticConfig, Xcodec2Config
from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

ORIGINAL_PREFIXES = ("semantic_model.", "SemanticEncoder_module.", "CodecEnc.", "generator.", "fc_prior.",
                     "fc_post_a.")
# The original modules' fixed sizes (not in its config.json and not readable from shapes).
ROPE_DIM = 64  # torchtune RotaryPositionalEmbeddings(dim=pos_meb_dim=64): the decoder's head dimension
SEMANTIC_HIDDEN_STATE = 16  # XCodec2Model reads semantic_output.hidden_states[16]
FSQ_LEVELS = (4, 4, 4, 4, 4, 4, 4, 4)  # CodecDecoderVocos' ResidualFSQ levels
RELATIVE_POSITIONS = (64, 8)  # w2v-bert-2.0's left / right max position embeddings
_RESIDUAL_UNIT = ("snake1", "conv1", "snake2", "conv2")  # ResidualUnit.block.{0,1,2,3}

Rename = tuple[str, Any]  # (pattern, replacement string or function of the match), as re.sub takes them

MODULE_RENAMES: tuple[Rename, ...] = (
    (r"^semantic_model\.", "semantic_encoder."),
    (r"^SemanticEncoder_module\.initial_conv\.", "semantic_adapter.conv1."),
    (r"^SemanticEncoder_module\.residual_blocks\.1\.", "semantic_adapter.conv2."),
    (r"^SemanticEncoder_module\.residual_blocks\.3\.", "semantic_adapter.conv3."),
    (r"^SemanticEncoder_module\.final_conv\.", "semantic_adapter.conv4."),
    (r"^CodecEnc\.conv_blocks\.0\.", "acoustic_encoder.conv1."),
    # EncoderBlock N (conv_blocks.N, N >= 1) -> block.N-1: three residual units, then snake and strided conv
    (r"^CodecEnc\.conv_blocks\.(\d+)\.block\.([012])\.block\.([0-3])\.",
     lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) + 1}.{_RESIDUAL_UNIT[int(m[3])]}."),
    (r"^CodecEnc\.conv_blocks\.(\d+)\.block\.3\.", lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.snake1."),
    (r"^CodecEnc\.conv_blocks\.(\d+)\.block\.4\.", lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.conv1."),
    (r"^CodecEnc\.conv_final_block\.0\.", "acoustic_encoder.snake1."),
    (r"^CodecEnc\.conv_final_block\.1\.", "acoustic_encoder.conv2."),
    (r"^generator\.quantizer\.", "quantizer."),
    (r"^generator\.backbone\.transformers\.(\d+)\.att_norm\.", r"acoustic_decoder.layers.\1.input_layernorm."),
    (r"^generator\.backbone\.transformers\.(\d+)\.ffn_norm\.", r"acoustic_decoder.layers.\1.post_attention_layernorm."),
    (r"^generator\.backbone\.transformers\.(\d+)\.att\.c_attn\.", r"acoustic_decoder.layers.\1.self_attn.qkv_proj."),
    (r"^generator\.backbone\.transformers\.(\d+)\.att\.c_proj\.", r"acoustic_decoder.layers.\1.self_attn.o_proj."),
    (r"^generator\.backbone\.transformers\.(\d+)\.att\.", r"acoustic_decoder.layers.\1.self_attn."),
    (r"^generator\.backbone\.transformers\.(\d+)\.", r"acoustic_decoder.layers.\1."),
    (r"^generator\.backbone\.final_layer_norm\.", "acoustic_decoder.norm."),
    (r"^generator\.backbone\.", "acoustic_decoder."),
    (r"^generator\.head\.out\.", "acoustic_decoder.head.linear."),
    (r"^generator\.head\.", "acoustic_decoder.head."),
    # Anime-XCodec2 44.1 kHz: Transformers has no upsampler; its keys keep their original names.
    (r"^generator\.upsampler\.", "acoustic_decoder.upsampler."),
    (r"^fc_prior\.", "fc_encoder."),
    (r"^fc_post_a\.", "acoustic_decoder.fc."),
)

PARAMETER_RENAMES: tuple[Rename, ...] = (
    (r"\.act\.bias$", ".act.beta"),  # SnakeBeta's magnitude: `bias` in 0.1.5, `beta` in older files
    (r"\.parametrizations\.weight\.original0$", ".weight_g"),
    (r"\.parametrizations\.weight\.original1$", ".weight_v"),
)

# Persistent buffers of the original modules, recomputed here (matched after renaming).
BUFFERS = (
    r".*\.(?:upsample\.filter|downsample\.lowpass\.filter|downsample\.filter)",
    r"acoustic_decoder\.head\.istft\.window",
    r".*\.rotary_embed\.(?:cache|theta)",
    r"quantizer\.scales",
    r"quantizer\.layers\.0\.(?:_levels|_basis|implicit_codebook)",
)
_SEMANTIC_LAYER = re.compile(r"^semantic_encoder\.encoder\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Combine:
    """Tensors ``<module>.<input>`` (all present) become ``<module>.<output>`` tensors.

    ``shapes(input shapes, config)`` gives the output shapes, or a string saying why the inputs do not fit;
    ``convert(input arrays, config)`` computes the outputs.
    """

    module: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shapes: Callable[[list[tuple[int, ...]], Xcodec2Config], list[tuple[int, ...]] | str]
    convert: Callable[[list[np.ndarray], Xcodec2Config], list[np.ndarray]]


def _weight_norm_shapes(shapes, config):
    g, v = shapes
    if len(g) != len(v) or g[0] != v[0] or any(n != 1 for n in g[1:]):
        return f"weight_g {g} does not fit weight_v {v} (expected ({v[0]}, 1, ...))"
    return [v]


def _fold_weight_norm(arrays, config):
    """weight = g * v / ||v||, the norm over every axis but 0 (torch weight_norm with dim=0), in float32."""
    g, v = (a.astype(np.float32) for a in arrays)
    norm = np.sqrt(np.square(v, dtype=np.float64).sum(axis=tuple(range(1, v.ndim)), keepdims=True))
    return [v * (g / norm.astype(np.float32))]


def _qkv_shapes(shapes, config):
    (shape,), heads = shapes, config.num_attention_heads
    if len(shape) != 2 or shape[0] % 3 or (shape[0] // 3) % (2 * heads):
        return f"c_attn {shape} is not (3 x heads={heads} x even head_dim, hidden)"
    return [(shape[0] // 3, shape[1])] * 3


def _rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows (heads, head_dim / 2, 2) -> (heads, 2, head_dim / 2): interleaved-pair RoPE to rotate-half."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _split_qkv(arrays, config):
    """Fused c_attn rows ``(r h d)`` -> q, k, v; q and k permuted for rotate-half RoPE."""
    q, k, v = np.split(arrays[0], 3, axis=0)
    heads = config.num_attention_heads
    return [_rope_permute(q, heads), _rope_permute(k, heads), v]


COMBINE: tuple[Combine, ...] = (
    Combine(r".+", ("weight_g", "weight_v"), ("weight",), _weight_norm_shapes, _fold_weight_norm),
    Combine(r"acoustic_decoder\.layers\.\d+\.self_attn", ("qkv_proj.weight",),
            ("q_proj.weight", "k_proj.weight", "v_proj.weight"), _qkv_shapes, _split_qkv),
)


def is_original_layout(keys: Iterable[str]) -> bool:
    """True for the original ``xcodec2`` layout (detected by its key prefixes, not its ``model_type``)."""
    return any(key.startswith(ORIGINAL_PREFIXES) for key in keys)


def rename(key: str) -> str:
    """The Transformers-layout name of an original key (unchanged when no rule matches)."""
    for pattern, replacement in MODULE_RENAMES:
        if re.search(pattern, key):
            key = re.sub(pattern, replacement, key, count=1)
            break
    for pattern, replacement in PARAMETER_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


# --------------------------------------------------------------------------------------------- config
def _shape(shapes: Mapping[str, tuple[int, ...]], module: str, leaf: str = "weight") -> tuple[int, ...]:
    """Shape of ``<module>.<leaf>``, whichever weight-norm spelling the file uses."""
    for suffix in (leaf, "parametrizations.weight.original1", "weight_v"):
        if f"{module}.{suffix}" in shapes:
            return shapes[f"{module}.{suffix}"]
    raise CheckpointError(f"not an original xcodec2 checkpoint: it has no {module}.{leaf}")


def _count(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    indices = {int(m[1]) for key in shapes if (m := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def config_from_original(raw: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Xcodec2Config:
    """The :class:`Xcodec2Config` of an original-layout checkpoint, from its ``config.json`` and key shapes."""
    hidden = _shape(shapes, "generator.backbone.embed")[0]
    acoustic = _shape(shapes, "CodecEnc.conv_final_block.1")[0]
    if acoustic != hidden:
        raise ConfigError(f"acoustic encoder width {acoustic} differs from decoder width {hidden}: "
                          "one hidden_size is assumed (as in the original release)")
    blocks = _count(shapes, r"^CodecEnc\.conv_blocks\.(\d+)\.")
    ratios = tuple(_shape(shapes, f"CodecEnc.conv_blocks.{n}.block.4")[2] // 2 for n in range(1, blocks))
    semantic_hidden, feature_dim = _shape(shapes, "semantic_model.feature_projection.projection")
    semantic_layers = _count(shapes, r"^semantic_model\.encoder\.layers\.(\d+)\.")
    if semantic_layers < SEMANTIC_HIDDEN_STATE:
        raise CheckpointError(f"the semantic model has {semantic_layers} layers; the original codec reads hidden "
                              f"state {SEMANTIC_HIDDEN_STATE}, so it needs at least {SEMANTIC_HIDDEN_STATE}")
    layer = "semantic_model.encoder.layers.0"
    distances, head_size = _shape(shapes, f"{layer}.self_attn.distance_embedding")
    if distances != sum(RELATIVE_POSITIONS) + 1:
        raise ConfigError(f"{layer}.self_attn.distance_embedding has {distances} rows; expected "
                          f"{sum(RELATIVE_POSITIONS) + 1} (w2v-bert-2.0's relative positions {RELATIVE_POSITIONS})")
    semantic = SemanticConfig(
        hidden_size=semantic_hidden, num_hidden_layers=SEMANTIC_HIDDEN_STATE,
        num_attention_heads=semantic_hidden // head_size,
        intermediate_size=_shape(shapes, f"{layer}.ffn1.intermediate_dense")[0],
        feature_projection_input_dim=feature_dim,
        left_max_position_embeddings=RELATIVE_POSITIONS[0], right_max_position_embeddings=RELATIVE_POSITIONS[1],
        conv_depthwise_kernel_size=_shape(shapes, f"{layer}.conv_module.depthwise_conv")[2],
    )
    for field, value in (("semantic_hidden_size", semantic_hidden), ("codec_encoder_hidden_size", hidden),
                         ("codec_decoder_hidden_size", hidden)):
        if raw.get(field, value) != value:
            raise ConfigError(f"config.json {field}={raw[field]} but the checkpoint's tensors have {value}")
    upsampler = any(key.startswith("generator.upsampler.") for key in shapes)
    missing = [f for f in ("sample_rate", "hop_length", "upsample_factors", "upsample_kernel_sizes") if f not in raw]
    if upsampler and missing:
        raise ConfigError(f"the checkpoint has a decoder upsampler (generator.upsampler.*) but config.json "
                          f"lacks {missing}")
    return Xcodec2Config(
        hidden_size=hidden,
        intermediate_size=_shape(shapes, "generator.backbone.transformers.0.mlp.fc1")[0],
        num_hidden_layers=_count(shapes, r"^generator\.backbone\.transformers\.(\d+)\."),
        num_attention_heads=hidden // ROPE_DIM, num_key_value_heads=hidden // ROPE_DIM, head_dim=ROPE_DIM,
        encoder_hidden_size=_shape(shapes, "CodecEnc.conv_blocks.0")[0],
        downsampling_ratios=ratios,
        quantization_dim=_shape(shapes, "generator.quantizer.project_in")[1],
        quantization_levels=FSQ_LEVELS,
        semantic=semantic,
        output_sampling_rate=raw["sample_rate"] if upsampler else None,
        decoder_hop_length=raw["hop_length"] if upsampler else None,
        upsample_factors=tuple(raw["upsample_factors"]) if upsampler else (),
        upsample_kernel_sizes=tuple(raw["upsample_kernel_sizes"]) if upsampler else (),
        code_count_rule="original",
    )


# --------------------------------------------------------------------------------------------- source
@dataclasses.dataclass(frozen=True)
class _Entry:
    """How one Transformers-layout tensor is made: ``combine`` output ``index`` of ``sources``, or a copy."""

    sources: tuple[str, ...]
    shape: tuple[int, ...]
    combine: Combine | None = None
    index: int = 0


class OriginalLayoutSource:
    """An original-layout checkpoint seen as Transformers-layout tensors (a ``weights.TensorSource``)."""

    def __init__(self, files: SafetensorsFiles, config: Xcodec2Config):
        self.files, self.config = files, config
        renamed, dropped_layers = {}, set()
        for key in files.tensors:
            new = rename(key)
            layer = _SEMANTIC_LAYER.match(new)
            if layer and int(layer[1]) >= config.semantic.num_hidden_layers:
                dropped_layers.add(int(layer[1]))
            elif not any(re.fullmatch(p, new) for p in BUFFERS):
                renamed[new] = key
        if dropped_layers:
            logger.info("original checkpoint: semantic layers %d-%d dropped (X-Codec2 uses hidden state %d)",
                        min(dropped_layers), max(dropped_layers), config.semantic.num_hidden_layers)
        self.entries = self._combine(renamed)

    def _combine(self, renamed: dict[str, str]) -> dict[str, _Entry]:
        entries, problems, used = {}, [], set()
        for rule in COMBINE:
            groups: dict[str, dict[str, str]] = {}
            for key in renamed:
                for suffix in rule.inputs:
                    module = key[: -len(suffix) - 1]
                    if key.endswith("." + suffix) and re.fullmatch(rule.module, module):
                        groups.setdefault(module, {})[suffix] = key
            for module, found in groups.items():
                keys = [found.get(suffix) for suffix in rule.inputs]
                if None in keys:
                    absent = [f"{module}.{s}" for s, k in zip(rule.inputs, keys, strict=True) if k is None]
                    problems.append(f"{', '.join(renamed[k] for k in keys if k)} without its partner {absent}")
                    continue
                used.update(keys)
                originals = tuple(renamed[k] for k in keys)
                shapes = rule.shapes([self.files.tensors[k].shape for k in originals], self.config)
                if isinstance(shapes, str):
                    problems.append(f"{', '.join(originals)}: {shapes}")
                    continue
                for index, (suffix, shape) in enumerate(zip(rule.outputs, shapes, strict=True)):
                    entries[f"{module}.{suffix}"] = _Entry(originals, tuple(shape), rule, index)
        if problems:
            raise CheckpointError("original checkpoint does not fit the model: " + "; ".join(problems))
        for key, original in renamed.items():
            if key not in used:
                entries[key] = _Entry((original,), self.files.tensors[original].shape)
        return entries

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: entry.shape for key, entry in self.entries.items()}

    def describe(self, key: str) -> str:
        sources = self.entries[key].sources
        return key if sources == (key,) else f"{' + '.join(sources)} (as {key})"

    def read(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        arrays = [self.files.read(source) for source in entry.sources]
        return arrays[0] if entry.combine is None else entry.combine.convert(arrays, self.config)[entry.index]
