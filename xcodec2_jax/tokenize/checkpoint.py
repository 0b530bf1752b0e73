"""Loading a model by name (the one loader of the command line and the tokenizer), and what its codes depend on.

:func:`load_model` turns ``--model/--revision/--dtype`` (or a loaded model) into a :class:`LoadedModel`;
:func:`fingerprint` lists everything a code depends on, so that a resumed job never mixes codes made with
other weights, config, numerics (dtype, precision), backend, device kind or JAX/jaxlib versions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

from ..engine import EngineSettings
from ..hub import find_weights, resolve_checkpoint_dir
from ..model import Xcodec2Model
from .store import TokenizeError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_name(dtype: Any) -> str:
    """``"float32"``, ``"bfloat16"``, ... for any dtype spelling."""
    return np.dtype(jnp.dtype(dtype)).name


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model and where it came from: ``source`` is ``{"id", "revision", "directory"}`` (None for a model
    given in memory)."""

    model: Xcodec2Model
    source: dict[str, Any] | None

    @functools.cached_property
    def weights(self) -> str:
        """``"files-sha256:<hex>"`` over the weight files, or ``"params-sha256:<hex>"`` for an in-memory model.

        The files, not the loaded parameters, identify a checkpoint: a bfloat16 model keeps some parameters
        in bfloat16, yet its codes decode with the float32 model of the same files.
        """
        if self.source is None:
            return _params_sha256(self.model)
        return _files_sha256(find_weights(Path(self.source["directory"]))[1])


def load_model(model: str | Path | Xcodec2Model, revision: str | None = None, dtype: Any = None) -> LoadedModel:
    """Load ``model`` (a Hub repo id or a local checkpoint folder) in ``dtype`` (default float32), or check
    that a loaded model has that dtype."""
    if isinstance(model, Xcodec2Model):
        if dtype is not None and dtype_name(dtype) != dtype_name(model.dtype):
            raise TokenizeError(f"dtype={dtype_name(dtype)} differs from the given model's {dtype_name(model.dtype)}")
        return LoadedModel(model, None)
    directory = resolve_checkpoint_dir(model, revision)
    loaded = Xcodec2Model.from_pretrained(directory, dtype=jnp.dtype(DTYPES.get(dtype, dtype) or jnp.float32))
    return LoadedModel(loaded, {"id": str(model), "revision": revision, "directory": str(directory)})


def fingerprint(loaded: LoadedModel, settings: EngineSettings) -> dict[str, Any]:
    """Everything the codes depend on, as JSON values: two runs with equal fingerprints make equal codes."""
    model = loaded.model
    numerics = nnx.merge(model.graphdef, model.state).numerics
    value = {
        "weights": loaded.weights,
        "config": model.config.to_dict(),
        "dtype": dtype_name(numerics.dtype),
        "precision": jax.lax.Precision(numerics.precision).name,
        "window_seconds": settings.window_seconds,
        "overlap_seconds": settings.overlap_seconds,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }
    return json.loads(json.dumps(value))  # JSON types (lists, not tuples), as read back from manifest.json


def check_same_model(loaded: LoadedModel, made_by: dict[str, Any] | None, where: Path) -> None:
    """Refuse to decode codes with weights or a config other than the ``fingerprint`` that made them."""
    if made_by is None:
        return
    ours = json.loads(json.dumps({"weights": loaded.weights, "config": loaded.model.config.to_dict()}))
    if {k: made_by.get(k) for k in ours} != ours:
        raise TokenizeError(f"the codes in {where} were made by another model (weights or config differ; see "
                            f"{where}); decode them with that one")


def _files_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0".encode())
        with open(path, "rb") as file:
            while block := file.read(1 << 24):
                digest.update(block)
    return f"files-sha256:{digest.hexdigest()}"


def _params_sha256(model: Xcodec2Model) -> str:
    """Over every parameter (path, dtype, shape, bytes) of an in-memory model."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(model.state)[0]
    for name, leaf in sorted((jax.tree_util.keystr(path), leaf) for path, leaf in leaves):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.view(np.uint8))
    return f"params-sha256:{digest.hexdigest()}"


__all__ = ["DTYPES", "LoadedModel", "check_same_model", "dtype_name", "fingerprint", "load_model"]
