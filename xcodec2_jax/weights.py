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
from safetensors import safe_open
from safetensors.numpy import save_file

FLAX_FORMAT = "xcodec2-jax"
FLAX_FORMAT_VERSION = "1"


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
    layout: Callable[[np.ndarray], np.ndarray] = _identity


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


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names every offending key."""


def flax_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def translate(key: str) -> tuple[str | None, Callable[[np.ndarray], np.ndarray]] | None:
    """(Flax key or IGNORE, layout) for a Transformers checkpoint key, or None if no rule matches."""
    for rule in TABLE:
        if re.match(rule.pattern, key):
            target = None if rule.target is IGNORE else re.sub(rule.pattern, rule.target, key)
            return target, rule.layout
    return None


def read_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (key, numpy array) pairs from one or more safetensors files (bf16 via ml_dtypes)."""
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                yield key, f.get_tensor(key)


def _expected_params(abstract: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    return {flax_key(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def load_params(abstract: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], *, source: str) -> nnx.State:
    """Fill the parameters of ``abstract`` (from ``nnx.eval_shape``) from checkpoint tensors.

    ``source`` is "transformers" (keys translated through ``TABLE``) or "flax" (keys are Flax paths).
    Returns the parameter state, arrays cast to each parameter's dtype.
    """
    expected = _expected_params(abstract)
    filled: dict[str, jax.Array] = {}
    unexpected, misshaped = [], []
    for key, array in tensors:
        if source == "flax":
            target, layout = key, _identity
        else:
            match = translate(key)
            if match is None:
                unexpected.append(key)
                continue
            target, layout = match
            if target is None:
                continue
        if target not in expected:
            unexpected.append(key)
            continue
        array = layout(array)
        want = expected[target]
        if tuple(array.shape) != tuple(want.shape):
            misshaped.append(f"{key}: checkpoint {tuple(array.shape)} (after layout), model {tuple(want.shape)}")
            continue
        filled[target] = jnp.asarray(np.asarray(array, dtype=np.float32), dtype=want.dtype)
    missing = sorted(set(expected) - set(filled))
    if missing or unexpected or misshaped:
        lines = ["checkpoint does not match the model config:"]
        for title, keys in (("missing parameters", missing), ("unexpected keys", unexpected),
                            ("mis-shaped keys", misshaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise CheckpointError("\n".join(lines))
    state = nnx.state(abstract, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(filled[flax_key(path)])
    return state


def save_flax_params(module: nnx.Module, path: Path) -> None:
    """Write the module's parameters as safetensors keyed by Flax path, tagged with our format."""
    tensors = {flax_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    save_file(tensors, str(path), metadata={"format": FLAX_FORMAT, "version": FLAX_FORMAT_VERSION})
