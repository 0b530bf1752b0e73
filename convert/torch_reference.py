"""Transformers reference models with non-trivial random weights (test and parity scaffolding, needs torch).

Transformers' own random init zeroes every bias and SnakeBeta parameter, sets norm weights to 1 and
leaves ``project_in`` so small that every FSQ value rounds to the same level: the codes come out
constant and the audio silent, so parity on such a model proves nothing. ``random_reference_model``
randomises every parameter, then rescales ``project_in`` on real input so the FSQ input spans all
levels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .kaldi_reference import reference_kaldi

reference_kaldi()  # must precede any Transformers import (see kaldi_reference.py)

from transformers import Xcodec2Config as TorchXcodec2Config  # noqa: E402
from transformers import Xcodec2Model as TorchXcodec2Model  # noqa: E402

# Target std of the FSQ input before ``bound``: wide enough that all 4 levels are used often.
FSQ_INPUT_STD = 1.5


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter of ``model`` a seeded random value that keeps activations O(1)."""
    generator = torch.Generator().manual_seed(seed)
    normal = lambda p, std: p.copy_(torch.randn(p.shape, generator=generator) * std)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("alpha", "beta"):  # SnakeBeta log-frequency / log-magnitude
            normal(param, 0.3)
        elif "norm" in name and leaf == "weight":
            param.copy_(1.0 + 0.2 * (torch.rand(param.shape, generator=generator) - 0.5))
        elif leaf == "bias":
            normal(param, 0.05)
        elif "distance_embedding" in name or "masked_spec_embed" in name:
            normal(param, 0.5)
        else:  # Linear (out, in) and Conv1d (out, in / groups, k) weights
            fan_in = math.prod(param.shape[1:])
            normal(param, 1.0 / math.sqrt(fan_in))


@torch.no_grad()
def calibrate_fsq_input_(model: TorchXcodec2Model, inputs: dict[str, torch.Tensor]) -> None:
    """Rescale ``quantizer.project_in`` so its output has std ``FSQ_INPUT_STD`` per dim on ``inputs``."""
    captured = {}
    hook = model.quantizer.project_in.register_forward_hook(lambda m, i, o: captured.update(out=o))
    model.encode(**inputs)
    hook.remove()
    out = captured["out"].reshape(-1, captured["out"].shape[-1])
    mean, std = out.mean(0), out.std(0).clamp_min(1e-6)
    layer = model.quantizer.project_in
    layer.weight.mul_((FSQ_INPUT_STD / std)[:, None])
    layer.bias.copy_((layer.bias - mean) * FSQ_INPUT_STD / std)


def random_reference_model(config: TorchXcodec2Config, seed: int, calibration_inputs: dict[str, torch.Tensor],
                           model_class: type = TorchXcodec2Model) -> TorchXcodec2Model:
    """A float32 eval-mode Transformers ``Xcodec2Model`` (or ``model_class``, e.g. ``NeuCodecModel``) with
    non-trivial random weights."""
    torch.manual_seed(seed)
    model = model_class(config).eval().float()
    randomize_(model, seed)
    calibrate_fsq_input_(model, calibration_inputs)
    return model


def save_reference_checkpoint(model: TorchXcodec2Model, directory: Path) -> Path:
    """``save_pretrained`` into ``directory`` and return it."""
    model.save_pretrained(directory)
    return Path(directory)


def torch_inputs(features: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Feature-extractor output (numpy) -> the tensors Transformers' ``encode`` takes."""
    return {k: torch.from_numpy(np.asarray(v)) for k, v in features.items()}


# Every width and depth of the encode path halved, the decoder kept (251M parameters): an encode step ~3x
# faster than full size on a CPU, so that host-side costs weigh more in end-to-end / step-alone ratios.
HALF_SIZE = {"encoder_hidden_size": 24, "quantization_dim": 1536,
             "semantic_model_config": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                                       "intermediate_size": 2048}}


def full_size_checkpoint(seed: int = 0, cache: Path | None = None) -> Path:
    """A seeded random full-size (``Xcodec2Config()``) checkpoint on disk, built once and then reused.

    Calibrated on 6 s of espeak-ng speech. Lives in ``cache`` (default ``~/.cache/xcodec2_jax``).
    """
    return _cached_checkpoint("full-size", {}, seed, cache)


def half_size_checkpoint(seed: int = 0, cache: Path | None = None) -> Path:
    """As :func:`full_size_checkpoint` with the :data:`HALF_SIZE` config."""
    return _cached_checkpoint("half-size", HALF_SIZE, seed, cache)


def _cached_checkpoint(name: str, overrides: dict, seed: int, cache: Path | None) -> Path:
    from .kaldi_reference import reference_feature_extractor
    from .speech import speech_clip

    directory = (cache or Path.home() / ".cache" / "xcodec2_jax") / f"random-{name}-seed{seed}"
    if not (directory / "model.safetensors").is_file():
        features = reference_feature_extractor()(speech_clip(6.0, seed=seed), sampling_rate=16000)
        model = random_reference_model(TorchXcodec2Config(**overrides), seed, torch_inputs(dict(features)))
        model.save_pretrained(directory)
    return directory
