"""Find checkpoint files: a local directory, or a Hugging Face Hub repo id through ``huggingface_hub``.

The Hub cache and ``HF_HUB_OFFLINE=1`` are honoured by ``huggingface_hub`` itself; this module only
decides which files to ask for and turns "the Hub is unreachable" into one actionable message.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from .errors import CheckpointError, CheckpointNotFoundError

DEFAULT_REPO_ID = "HKUSTAudio/xcodec2-hf"
CONFIG_NAME = "config.json"
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"
TRANSFORMERS_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
FLAX_WEIGHTS_NAME = "flax_model.safetensors"
_HUB_PATTERNS = ["*.json", "*.safetensors"]
# Pickled PyTorch checkpoints: never loaded (unpickling runs arbitrary code), only named in the error.
PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
TO_SAFETENSORS = (
    "convert it once in PyTorch, outside xcodec2-jax: read it with PyTorch's own loader and weights_only=True "
    "into a state dict `sd`; keep the "
    "model weights (a Lightning .ckpt holds them under 'state_dict'; drop discriminator and loss entries); "
    "then `safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')` next to "
    "the config.json"
)


def resolve_checkpoint_dir(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local directory holding the checkpoint: ``path_or_repo_id`` itself, or the Hub snapshot."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        if local.suffix in PICKLE_SUFFIXES:
            raise CheckpointNotFoundError(f"{local} is a file; expected a checkpoint directory. A pickled PyTorch "
                                          f"checkpoint ({'/'.join(PICKLE_SUFFIXES)}) is not loaded: {TO_SAFETENSORS}")
        raise CheckpointNotFoundError(f"{str(path_or_repo_id)!r} is a file; expected a checkpoint directory")
    repo_id = str(path_or_repo_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except HFValidationError as err:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is neither an existing directory nor a valid Hub repo id"
        ) from err
    except LocalEntryNotFoundError as err:
        raise CheckpointNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub and it is not in the local cache. "
            "Offline? Use a local checkpoint directory (config.json + model.safetensors, e.g. a copy of "
            "HKUSTAudio/xcodec2-hf): Xcodec2Model.from_pretrained('/path/to/dir') or `--model /path/to/dir`"
        ) from err
    except OSError as err:  # repository or revision not found, HTTP errors
        raise CheckpointNotFoundError(f"cannot load {repo_id!r} from the Hub: {err}") from err


def find_weights(checkpoint_dir: Path) -> tuple[str, list[Path]]:
    """``("flax", [file])`` for a checkpoint saved by this library, else ``("transformers", files)``.

    Transformers checkpoints are a single ``model.safetensors`` or shards listed in an index file.
    """
    if not checkpoint_dir.is_dir():
        raise CheckpointNotFoundError(f"{checkpoint_dir}: no such checkpoint directory")
    if (checkpoint_dir / FLAX_WEIGHTS_NAME).is_file():
        return "flax", [checkpoint_dir / FLAX_WEIGHTS_NAME]
    if (checkpoint_dir / TRANSFORMERS_WEIGHTS_NAME).is_file():
        return "transformers", [checkpoint_dir / TRANSFORMERS_WEIGHTS_NAME]
    index = checkpoint_dir / TRANSFORMERS_WEIGHTS_INDEX_NAME
    if not index.is_file():
        pickled = sorted(p.name for p in checkpoint_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f"; it has {pickled}, pickled PyTorch checkpoints xcodec2-jax does not load: {TO_SAFETENSORS}" \
            if pickled else ""
        raise CheckpointNotFoundError(
            f"{checkpoint_dir} holds none of {FLAX_WEIGHTS_NAME}, {TRANSFORMERS_WEIGHTS_NAME}, "
            f"{TRANSFORMERS_WEIGHTS_INDEX_NAME}{hint}"
        )
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # bad JSON, no weight_map, not a mapping
        raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a 'weight_map'): "
                              f"{type(err).__name__}: {err}") from err
    missing = [s for s in shards if not (checkpoint_dir / s).is_file()]
    if missing:
        raise CheckpointNotFoundError(f"{index} lists shards that are missing: {missing}")
    return "transformers", [checkpoint_dir / s for s in shards]
