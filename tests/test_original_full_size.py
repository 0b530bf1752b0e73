"""Full-size original ``xcodec2`` 0.1.5 layout (823M parameters, its modules' default sizes): opt-in,
``python -m pytest -m slow tests/test_original_full_size.py``.

Minutes of CPU and ~12 GB of RAM: the seeded random original-layout checkpoint (every parameter randomised,
``project_in`` calibrated on speech) is built once under ``~/.cache/xcodec2_jax``, then the original
package's own ``encode_code`` / ``decode_code`` and xcodec2-jax run on 6 s of speech.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_nontrivial

from convert.original_reference import OriginalSizes, original_model, parameter_count, save_original_checkpoint
from convert.speech import speech_clip
from xcodec2_jax import Xcodec2Model

pytestmark = pytest.mark.slow
CACHE = Path(os.environ.get("XCODEC2_JAX_CACHE_ROOT", Path.home() / ".cache" / "xcodec2_jax"))


def test_full_size_original_layout_parity():
    audio = speech_clip(6.0, seed=0)
    torch_model = original_model(OriginalSizes(), seed=0, calibration=audio)
    assert parameter_count(torch_model) == pytest.approx(823e6, rel=0.01)
    directory = CACHE / "random-original-full-size-seed0"
    if not (directory / "model.safetensors").is_file():
        save_original_checkpoint(torch_model, directory)
    with torch.no_grad():
        want_codes = torch_model.encode_code(torch.from_numpy(audio)[None])
        want_audio = torch_model.decode_code(want_codes)[0, 0].numpy()
    model = Xcodec2Model.from_pretrained(directory)
    codes = model.encode_audio(audio)[0]
    audio_out = model.decode_codes(want_codes[0, 0].numpy())[0]
    match = np.mean(codes == want_codes[0, 0].numpy())
    error = np.abs(audio_out - want_audio).max()
    print(f"full-size original layout: codes {match:.4%} equal ({codes.size} codes, "
          f"{len(np.unique(codes))} distinct); decode max abs err {error:.3g} (peak {np.abs(want_audio).max():.3g})")
    assert codes.size == audio.size // 320 + 1
    assert match == 1.0
    assert error < 1e-4
    assert_nontrivial(codes, audio_out)
