"""Checkpoint <-> Flax parameter tree: one declarative table, strict loading, Flax checkpoint I/O, export.

The NNX module tree uses Transformers' attribute names, so a Transformers checkpoint key
``<module path>.<leaf>`` and its Flax path differ only in the leaf name and the array layout (an axis
permutation). ``TABLE`` lists those differences; the first matching rule wins. Because every rule is a
leaf rename plus a permutation, the table is also read backwards to export a Transformers checkpoint.

Loading is strict: every checkpoint key is consumed (or explicitly ignored), every parameter is filled,
every shape is checked, and one error lists all missing, unexpected and mis-shaped keys. Tensors are read
one at a time and cast straight into each parameter's dtype, so host memory stays at the parameters plus
one tensor. Other checkpoint layouts (the original ``xcodec2`` release, see
:mod:`xcodec2_jax.original_layout`) are presented to the same loader as Transformers-layout sources.

Non-persistent buffers (anti-alias filters, Hann window, FSQ codebook, RoPE tables) are computed by the
modules and never appear in checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from .checkpoint_files import SafetensorsFiles
from .config import Xcodec2Config, read_config_file
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError
from .hub import CONFIG_NAME, find_weights
from .original_layout import OriginalLayoutSource, config_from_original, is_original_layout

FLAX_FORMAT = "xcodec2-jax"
FLAX_FORMAT_VERSION = "1"
SUPPORTED_FLAX_FORMAT_VERSIONS = ("1",)

# Array layouts are axis permutations from the PyTorch tensor to the Flax array.
IDENTITY: tuple[int, ...] = ()
LINEAR = (1, 0)  # Linear (out, in) -> (in, out)
CONV1D = (2, 1, 0)  # Conv1d (out, in / groups, k) -> (k, in / groups, out); grouped convs included
CONV_TRANSPOSE1D = (2, 0, 1)  # ConvTranspose1d (in, out, k) -> (k, in, out)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Checkpoint key ``<module>.<leaf>`` with ``module`` matching ``module`` goes to Flax
    ``<module>.<target>``, the tensor transposed by ``layout``."""

    module: str
    leaf: str
    target: str
    layout: tuple[int, ...] = IDENTITY


TABLE: tuple[Rule, ...] = (
    Rule(r".*\.act", "alpha", "alpha"),
    Rule(r".*\.act", "beta", "beta"),
    Rule(r".*norm\d?", "weight", "scale"),
    Rule(r".*\.distance_embedding", "weight", "embedding"),
    Rule(r".*\.upsample_layers\.\d+", "weight", "kernel", CONV_TRANSPOSE1D),
    Rule(r".*(?:conv\d?|embed)", "weight", "kernel", CONV1D),
    Rule(r".*", "weight", "kernel", LINEAR),
    Rule(r".*", "bias", "bias"),
)

# Consumed but unused at inference (Wav2Vec2-BERT's SpecAugment embedding): key -> shape from the config,
# written as zeros on export so Transformers finds every key it expects.
TRAINING_ONLY = {"semantic_encoder.masked_spec_embed": lambda config: (config.semantic.hidden_size,)}


class TensorSource(Protocol):
    """Checkpoint tensors by key: shapes up front, data on demand (one tensor at a time)."""

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def describe(self, key: str) -> str: ...

    def read(self, key: str) -> np.ndarray: ...


def flax_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _split(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def translate(key: str) -> tuple[str | None, tuple[int, ...]] | None:
    """(Flax key, layout) for a Transformers checkpoint key, (None, ()) for a training-only key, None if no
    rule matches."""
    if key in TRAINING_ONLY:
        return None, IDENTITY
    module, leaf = _split(key)
    for rule in TABLE:
        if leaf == rule.leaf and re.fullmatch(rule.module, module):
            return f"{module}.{rule.target}", rule.layout
    return None


def untranslate(flax: str) -> tuple[str, tuple[int, ...]]:
    """The Transformers key and layout that :func:`translate` maps onto Flax key ``flax`` (the table backwards)."""
    module, leaf = _split(flax)
    for rule in TABLE:
        if leaf == rule.target and re.fullmatch(rule.module, module):
            key = f"{module}.{rule.leaf}"
            if translate(key) == (flax, rule.layout):  # the first rule matching ``key`` is this one
                return key, rule.layout
    raise CheckpointError(f"no rule of weights.TABLE produces the Flax parameter {flax}")


def expected_params(abstract: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Flax key -> shape/dtype of every parameter of a module (typically from ``nnx.eval_shape``)."""
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {flax_key(path): var.get_value() for path, var in flat}


def _permuted(shape: tuple[int, ...], layout: tuple[int, ...]) -> tuple[int, ...]:
    if layout and len(layout) != len(shape):
        return (*shape, -1)  # a rank the layout cannot apply to: reported as mis-shaped
    return tuple(shape[i] for i in layout) if layout else tuple(shape)


def plan_load(expected: Mapping[str, jax.ShapeDtypeStruct], source: TensorSource,
              flax: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint key -> (Flax key, layout) for every key that fills a parameter.

    ``flax``: the keys are Flax paths (a checkpoint written by :func:`save_flax_params`); otherwise they are
    Transformers keys translated through ``TABLE``. Raises :class:`CheckpointError` naming every missing,
    unexpected and mis-shaped key.
    """
    plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    unexpected, misshaped, claimed = [], [], set()
    for key, shape in source.shapes().items():
        match = (key, IDENTITY) if flax else translate(key)
        if match is None or (match[0] is not None and match[0] not in expected):
            unexpected.append(source.describe(key))
            continue
        target, layout = match
        if target is None:  # consumed on purpose (training only)
            continue
        claimed.add(target)
        laid_out = _permuted(shape, layout)
        if laid_out != tuple(expected[target].shape):
            misshaped.append(f"{source.describe(key)}: checkpoint {shape} -> {laid_out} after layout, model "
                             f"wants {tuple(expected[target].shape)} at {target}")
            continue
        plan[key] = (target, layout)
    missing = sorted(set(expected) - claimed)
    if missing or unexpected or misshaped:
        lines = ["checkpoint does not match the model config:"]
        for title, keys in (("missing parameters", missing), ("unexpected keys", unexpected),
                            ("mis-shaped keys", misshaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise CheckpointError("\n".join(lines))
    return plan


def check_flax_format(files: SafetensorsFiles) -> None:
    """Raise :class:`CheckpointError` unless every file is a Flax checkpoint of a format version we read."""
    for path, metadata in files.metadata.items():
        if metadata.get("format") != FLAX_FORMAT:
            raise CheckpointError(f"{path}: not a checkpoint written by xcodec2-jax (metadata format="
                                  f"{metadata.get('format')!r}, expected {FLAX_FORMAT!r})")
        version = metadata.get("version")
        if version not in SUPPORTED_FLAX_FORMAT_VERSIONS:
            raise CheckpointError(f"{path}: xcodec2-jax checkpoint format version {version!r}; this xcodec2-jax "
                                  f"reads versions {SUPPORTED_FLAX_FORMAT_VERSIONS}. Upgrade xcodec2-jax, or "
                                  "re-export the checkpoint with the version that wrote it")


def open_checkpoint(directory: Path) -> tuple[Xcodec2Config, TensorSource, bool]:
    """(config, tensor source, whether its keys are Flax paths) of a checkpoint directory, any layout.

    The layout is told by the weights: a ``flax_model.safetensors`` written by this library (its format
    version checked), the original ``xcodec2`` layout (by its key prefixes), or Transformers' layout.
    """
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointNotFoundError(f"{directory} has no {CONFIG_NAME}; expected an X-Codec2 checkpoint")
    raw = read_config_file(directory / CONFIG_NAME)
    kind, paths = find_weights(directory)
    files = SafetensorsFiles(paths)
    if kind == "flax":
        check_flax_format(files)
        return Xcodec2Config.from_dict(raw), files, True
    if is_original_layout(files.tensors):
        config = config_from_original(raw, files.shapes())
        return config, OriginalLayoutSource(files, config), False
    if raw.get("model_type") == "xcodec":
        raise ConfigError(f"{directory}: model_type 'xcodec' with Transformers-layout weights is X-Codec (1), "
                          "which this library does not implement; the original X-Codec2 layout has keys "
                          "starting with CodecEnc., generator., semantic_model.")
    return Xcodec2Config.from_dict(raw), files, False


def load_params(abstract: nnx.Module, source: TensorSource, *, flax: bool) -> nnx.State:
    """Fill the parameters of ``abstract`` (from ``nnx.eval_shape``) from ``source``.

    Names and shapes are checked before any tensor is read. Each tensor is read, laid out and cast straight
    into its parameter's dtype (bf16/fp16 checkpoints load into a float32 model and vice versa).
    """
    plan = plan_load(expected_params(abstract), source, flax)
    state = nnx.state(abstract, nnx.Param)
    by_target = {flax_key(path): var for path, var in nnx.to_flat_state(state)}
    for key, (target, layout) in plan.items():
        var = by_target[target]
        array = source.read(key)
        array = np.transpose(array, layout) if layout else array
        var.set_value(jnp.asarray(array.astype(var.get_value().dtype, copy=False)))
    return state


def save_flax_params(module: nnx.Module, path: Path) -> None:
    """Write the module's parameters as safetensors keyed by Flax path, tagged with our format."""
    tensors = {flax_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    save_file(tensors, str(path), metadata={"format": FLAX_FORMAT, "version": FLAX_FORMAT_VERSION})


class ArraySource:
    """In-memory tensors (anything with ``.shape``) as a :class:`TensorSource`."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = tensors

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def describe(self, key: str) -> str:
        return key

    def read(self, key: str) -> np.ndarray:
        return self.tensors[key]


def transformers_state(module: nnx.Module, training_only_shapes: Mapping[str, tuple[int, ...]]
                       ) -> dict[str, np.ndarray]:
    """The module's parameters as a Transformers state dict (``TABLE`` read backwards), in their own dtype.

    ``training_only_shapes``: the ``TRAINING_ONLY`` keys to write as zeros. The result is checked by loading
    it back through :func:`plan_load`, so it fills exactly the module's parameters.
    """
    state = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        key, layout = untranslate(flax_key(path))
        array = np.asarray(var.get_value())
        state[key] = np.ascontiguousarray(np.transpose(array, np.argsort(layout)) if layout else array)
    for key, shape in training_only_shapes.items():
        state[key] = np.zeros(shape, np.float32)
    plan_load(expected_params(module), ArraySource(state), flax=False)
    return state
