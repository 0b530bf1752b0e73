"""Shared fixtures: a tiny Transformers reference model with non-trivial random weights, and speech.

Every reference output is computed in the test that uses it, from ``transformers==5.23.0`` on torch CPU.
"""

from __future__ import annotations

import os
import tempfile

# One persistent JAX compilation cache for the whole session, inherited by subprocesses (CLI, tokenizer):
# compiling the codec takes seconds per shape on this CPU, and many tests share shapes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="xcodec2-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from convert.kaldi_reference import reference_feature_extractor, reference_kaldi

reference_kaldi()  # before anything imports Transformers (see convert/kaldi_reference.py)

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import Xcodec2Config as TorchXcodec2Config  # noqa: E402
from transformers import Xcodec2Model as TorchXcodec2Model  # noqa: E402

from convert.metrics import max_err, snr_db  # noqa: E402
from convert.original_reference import OriginalSizes, original_model, save_original_checkpoint  # noqa: E402
from convert.speech import speech_clip  # noqa: E402
from convert.torch_reference import random_reference_model, save_reference_checkpoint  # noqa: E402
from xcodec2_jax import Xcodec2Model  # noqa: E402

# Audio parity against Transformers: an absolute bound, and one relative to the signal, so that quiet audio
# (the non-triviality check only asks for a peak above 1e-3) cannot pass on the absolute bound alone.
AUDIO_TOL, MIN_SNR_DB = 1e-3, 60.0

# Small enough to compile in seconds, yet every code path is there: 2 conformer layers, 2 decoder layers,
# all 5 acoustic blocks, 8 FSQ levels of 4 (65536 codes).
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "encoder_hidden_size": 8,
    "quantization_dim": 96,
    "semantic_model_config": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
}


# The original xcodec2 0.1.5 layout: its config.json carries no sizes and its modules take them as constructor
# arguments, so the tiny checkpoint is built with small arguments and our loader reads them back from the tensor
# shapes. Kept at the original's fixed values: the hop (320, hard-coded in its preprocessing), FSQ levels, the
# decoder RoPE dimension 64 (so 2 heads of 64 at hidden 128), w2v-bert's relative positions, and 17 semantic
# layers (its encode_code reads hidden state 16; the 17th exercises the dropping of layers past 16).
TINY_ORIGINAL = OriginalSizes(ngf=8, hidden=128, depth=2, heads=2, semantic_hidden=16, semantic_layers=17,
                              semantic_heads=2, semantic_intermediate=32, semantic_kernel=5)


def tiny_torch_config(**overrides) -> TorchXcodec2Config:
    return TorchXcodec2Config(**{**TINY, **overrides})


@dataclasses.dataclass
class Reference:
    """A seeded random Transformers model, its checkpoint on disk, and our model loaded from it."""

    torch_model: TorchXcodec2Model
    checkpoint: Path
    model: Xcodec2Model


@pytest.fixture(scope="session")
def clips() -> list[np.ndarray]:
    """Speech of 1.3 s and 2.9 s (lengths not multiples of the hop)."""
    return [speech_clip(1.3, seed=0), speech_clip(2.9, seed=1)]


@pytest.fixture(scope="session")
def torch_features(clips) -> dict[str, torch.Tensor]:
    """Transformers' extractor on the two clips as one padded batch."""
    return dict(reference_feature_extractor()(clips, sampling_rate=16000, return_tensors="pt"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, torch_features) -> Reference:
    calibration = {k: torch_features[k] for k in ("input_values", "input_features", "input_features_mask")}
    torch_model = random_reference_model(tiny_torch_config(), seed=0, calibration_inputs=calibration)
    checkpoint = save_reference_checkpoint(torch_model, tmp_path_factory.mktemp("tiny-xcodec2"))
    return Reference(torch_model, checkpoint, Xcodec2Model.from_pretrained(checkpoint))


@pytest.fixture(scope="session")
def original_clips() -> list[np.ndarray]:
    """Two clips in one engine bucket (one compilation), lengths not multiples of the hop."""
    return [speech_clip(1.3, seed=0), speech_clip(1.77, seed=2)]


@pytest.fixture(scope="session")
def original(tmp_path_factory, original_clips):
    """(torch model of the xcodec2 0.1.5 package, its original-layout checkpoint, our model loaded from it)."""
    torch_model = original_model(TINY_ORIGINAL, seed=0, calibration=original_clips[0])
    directory = save_original_checkpoint(torch_model, tmp_path_factory.mktemp("tiny-original"))
    return torch_model, directory, Xcodec2Model.from_pretrained(directory)


def assert_nontrivial(codes: np.ndarray, audio: np.ndarray) -> None:
    """A parity test on constant codes or silent audio proves nothing: require diversity."""
    codes = np.asarray(codes).ravel()
    assert len(np.unique(codes)) > 0.5 * codes.size, f"only {len(np.unique(codes))} distinct codes of {codes.size}"
    assert np.abs(audio).max() > 1e-3, "decoded audio is (almost) silent"


def assert_audio_close(got, want) -> None:
    """Our audio against Transformers': same shape, max abs error < ``AUDIO_TOL`` and SNR >= ``MIN_SNR_DB``."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"audio shapes differ: {got.shape} vs {want.shape}"
    err, snr = max_err(got, want), snr_db(want, got)
    assert err < AUDIO_TOL and snr >= MIN_SNR_DB, (
        f"audio vs Transformers: max abs err {err:.2e} (bound {AUDIO_TOL}), SNR {snr:.1f} dB (bound {MIN_SNR_DB})")
