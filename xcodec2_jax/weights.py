"""Checkpoint <-> Flax parameter tree: one declarative table, strict loading, Flax checkpoint I/O.

The NNX module tree uses Transformers' attribute names, so a checkpoint key and its Flax path differ only
in the leaf name and the array layout. ``TABLE`` lists those differences; the first matching rule wins.
Loading is strict: every checkpoint key is consumed (or explicitly ignored), every parameter is filled,
every shape is checked, and one error lists all missing, unexpected and mis-shaped keys.

Non-persistent buffers (anti-alias filters, Hann window, FSQ codebook, RoPE tables) are computed by the
modules and never appear in checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .errors import CheckpointError

FLAX_FORMAT = "xcodec2-jax"
FLAX_FORMAT_VERSION = "1"


Layout = Callable[[np.ndarray], np.ndarray]


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _linear(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear (out, in) -> Flax (in, out)."""
    return w.T


def _conv1d(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv1d (out, in / groups, k) -> Flax (k, in / groups, out); grouped convs included."""
    return w.transpose(2, 1, 0)


IGNORE = None  # target for checkpoint keys that are consumed but not used at inference


@dataclasses.dataclass(frozen=True)
class Rule:
    """Checkpoint keys matching ``pattern`` go to ``re.sub(pattern, target, key)`` through ``layout``."""

    pattern: str
    target: str | None
    layout: Layout = _identity


TABLE: tuple[Rule, ...] = (
    # Wav2Vec2-BERT's SpecAugment embedding: training only.
    Rule(r"^semantic_encoder\.masked_spec_embed$", IGNORE),
    Rule(r"^(.*\.act)\.(alpha|beta)$", r"\1.\2"),
    Rule(r"^(.*norm\d?)\.weight$", r"\1.scale"),
    Rule(r"^(.*\.distance_embedding)\.weight$", r"\1.embedding"),
    Rule(r"^(.*(?:conv\d?|embed))\.weight$", r"\1.kernel", _conv1d),
    Rule(r"^(.*)\.weight$", r"\1.kernel", _linear),
    Rule(r"^(.*)\.bias$", r"\1.bias"),
)


def flax_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def translate(key: str) -> tuple[str | None, Layout] | None:
    """(Flax key or IGNORE, layout) for a Transformers checkpoint key, or None if no rule matches."""
    for rule in TABLE:
        if re.match(rule.pattern, key):
            target = None if rule.target is IGNORE else re.sub(rule.pattern, rule.target, key)
            return target, rule.layout
    return None


def read_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, from the safetensors headers only (no tensor data is read)."""
    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except SafetensorError as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
    return shapes


def read_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (key, numpy array) pairs from one or more safetensors files (bf16 via ml_dtypes)."""
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118
                yield key, f.get_tensor(key)


def expected_params(abstract: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Flax key -> shape/dtype of every parameter of a module (typically from ``nnx.eval_shape``)."""
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {flax_key(path): var.get_value() for path, var in flat}


def plan_load(expected: dict[str, jax.ShapeDtypeStruct], shapes: dict[str, tuple[int, ...]],
              source: str) -> dict[str, tuple[str, Layout]]:
    """Checkpoint key -> (Flax key, layout) for every key that fills a parameter.

    ``source`` is "transformers" (keys translated through ``TABLE``) or "flax" (keys are Flax paths).
    Raises :class:`CheckpointError` naming every missing, unexpected and mis-shaped key.
    """
    plan: dict[str, tuple[str, Layout]] = {}
    unexpected, misshaped, claimed = [], [], set()
    for key, shape in shapes.items():
        match = (key, _identity) if source == "flax" else translate(key)
        if match is None or (match[0] is not None and match[0] not in expected):
            unexpected.append(key)
            continue
        target, layout = match
        if target is None:  # consumed on purpose (IGNORE rule)
            continue
        claimed.add(target)
        laid_out = layout(np.broadcast_to(np.float32(0), shape)).shape  # zero-stride view: no memory
        if laid_out != tuple(expected[target].shape):
            misshaped.append(f"{key}: checkpoint {shape} -> {laid_out} after layout, model wants "
                             f"{tuple(expected[target].shape)} at {target}")
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


def load_params(abstract: nnx.Module, files: Iterable[Path], *, source: str) -> nnx.State:
    """Fill the parameters of ``abstract`` (from ``nnx.eval_shape``) from safetensors ``files``.

    Names and shapes are checked from the file headers before any tensor is read. Arrays are cast to
    each parameter's dtype (so bf16/fp16 checkpoints load into a float32 model and vice versa).
    """
    files = list(files)
    expected = expected_params(abstract)
    plan = plan_load(expected, read_shapes(files), source)
    state = nnx.state(abstract, nnx.Param)
    by_target = {flax_key(path): var for path, var in nnx.to_flat_state(state)}
    for key, array in read_safetensors(files):
        if key in plan:
            target, layout = plan[key]
            var = by_target[target]
            var.set_value(jnp.asarray(np.asarray(layout(array), np.float32), var.get_value().dtype))
    return state


def save_flax_params(module: nnx.Module, path: Path) -> None:
    """Write the module's parameters as safetensors keyed by Flax path, tagged with our format."""
    tensors = {flax_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    save_file(tensors, str(path), metadata={"format": FLAX_FORMAT, "version": FLAX_FORMAT_VERSION})
