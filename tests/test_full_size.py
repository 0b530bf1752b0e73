"""Full-size checks (``Xcodec2Config()``, 629M parameters): opt-in, ``python -m pytest -m slow``.

Minutes of CPU and ~10 GB of RAM: the seeded random checkpoint is built once (cached under
``~/.cache/xcodec2_jax``), then run through Transformers and through xcodec2-jax on 6 s of speech.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_nontrivial

from convert.kaldi_reference import reference_feature_extractor
from convert.metrics import snr_db
from convert.speech import speech_clip
from convert.torch_reference import TorchXcodec2Model, full_size_checkpoint
from xcodec2_jax import Xcodec2FeatureExtractor, Xcodec2Model

pytestmark = pytest.mark.slow


def test_full_size_parity_with_transformers():
    checkpoint = full_size_checkpoint()
    audio = speech_clip(6.0, seed=0)
    features = dict(reference_feature_extractor()(audio, sampling_rate=16000, return_tensors="pt"))
    torch_model = TorchXcodec2Model.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch_model(**features, output_latents=True)
    model = Xcodec2Model.from_pretrained(checkpoint)
    got = model(**{k: v.numpy() for k, v in features.items()}, output_latents=True)

    codes, want_codes = got.audio_codes.ravel(), want.audio_codes.numpy().ravel()
    assert np.mean(codes == want_codes) >= 0.999
    snr = snr_db(want.audio_values.numpy(), got.audio_values)
    assert snr >= 60, f"audio SNR vs Transformers {snr:.1f} dB"
    assert_nontrivial(codes, got.audio_values)

    # The whole pipeline from audio, our extractor included, through the engine.
    ours = model.encode_audio(audio)[0]
    ref_codes = want.audio_codes[0, 0][want.audio_codes_mask[0].bool()].numpy()
    assert np.mean(ours == ref_codes) >= 0.999
    assert Xcodec2FeatureExtractor()(audio, sampling_rate=16000)["input_features"].shape == tuple(
        features["input_features"].shape)
