"""NeuCodec (16 kHz in, 24 kHz out) against Transformers' ``NeuCodecModel`` / ``NeuCodecFeatureExtractor``.

Transformers' NeuCodec differs from X-Codec2 in three places this port follows: the extractor skips the hop/2
edge padding (one semantic frame fewer; both branches trimmed to it: ``L // 320`` codes), the decoder's ISTFT
runs at 24 kHz (hop 480, n_fft 1920), and ``forward`` trims the audio to ``1.5 x`` the input. One it does not:
its batched ``audio_codes_mask`` scales lengths by 1.5 but divides by the 16 kHz hop, so short items look
longer than they are; here every item is padding-exact (equal to itself alone).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, assert_nontrivial
from transformers import NeuCodecConfig, NeuCodecModel
from transformers.models.neucodec.feature_extraction_neucodec import NeuCodecFeatureExtractor

from convert.speech import speech_clip
from convert.torch_reference import random_reference_model
from xcodec2_jax import Xcodec2Model
from xcodec2_jax.features import Xcodec2FeatureExtractor

AUDIO_TOL = 1e-3
FEATURES_ATOL = 2e-3  # float32 reference vs our float64 Kaldi math (see test_features.py)


@pytest.fixture(scope="module")
def neu_clips() -> list[np.ndarray]:
    """Two clips in one engine bucket, lengths not multiples of the hop."""
    return [speech_clip(1.3, seed=0), speech_clip(1.77, seed=2)]


@pytest.fixture(scope="module")
def neucodec(tmp_path_factory, neu_clips):
    extractor = NeuCodecFeatureExtractor()
    features = extractor(neu_clips[1], sampling_rate=16000, return_tensors="pt")
    calibration = {k: features[k] for k in ("input_values", "input_features", "input_features_mask")}
    torch_model = random_reference_model(NeuCodecConfig(**TINY), seed=0, calibration_inputs=calibration,
                                         model_class=NeuCodecModel)
    directory = tmp_path_factory.mktemp("tiny-neucodec")
    torch_model.save_pretrained(directory)
    extractor.save_pretrained(directory)
    return torch_model, directory, Xcodec2Model.from_pretrained(directory), extractor


def _alone(torch_model, extractor, clip):
    with torch.no_grad():
        return torch_model(**extractor(clip, sampling_rate=16000, return_tensors="pt"))


def test_config_rates(neucodec):
    config = neucodec[2].config
    assert (neucodec[2].sampling_rate, neucodec[2].output_sampling_rate) == (16000, 24000)
    assert (config.hop_length, config.istft_hop_length, config.n_fft, config.output_hop_length) == (320, 480, 1920, 480)
    assert [int(config.num_codes(n)) for n in (639, 640, 959)] == [1, 2, 2]


def test_features_match_transformers(neucodec, neu_clips):
    theirs = neucodec[3](neu_clips, sampling_rate=16000, return_tensors="np")
    ours = Xcodec2FeatureExtractor.from_pretrained(neucodec[1])(neu_clips, sampling_rate=16000)
    assert not Xcodec2FeatureExtractor.from_pretrained(neucodec[1]).center
    for key in ("input_values", "padding_mask", "input_features_mask"):
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    assert ours["input_features"].shape == theirs["input_features"].shape
    assert np.abs(ours["input_features"] - theirs["input_features"]).max() <= FEATURES_ATOL


def test_single_clips_match_neucodec(neucodec, neu_clips):
    torch_model, _, model, extractor = neucodec
    got_codes = model.encode_audio(neu_clips)  # one padded batch; padding-exact, so each as alone
    got_audio = model.decode_codes(got_codes)
    for clip, codes, audio in zip(neu_clips, got_codes, got_audio, strict=True):
        want = _alone(torch_model, extractor, clip)
        assert codes.size == clip.size // 320 == want.audio_codes.shape[-1]
        np.testing.assert_array_equal(codes, want.audio_codes[0, 0].numpy())
        with torch.no_grad():
            want_audio = torch_model.decode(audio_codes=want.audio_codes).audio_values[0, 0].numpy()
        assert audio.shape == want_audio.shape == (codes.size * 480,)
        print(f"neucodec, {clip.size} samples: {codes.size} codes equal; 24 kHz max abs err "
              f"{np.abs(audio - want_audio).max():.3g} (peak {np.abs(want_audio).max():.3g})")
        assert np.abs(audio - want_audio).max() < AUDIO_TOL
        assert_nontrivial(codes, audio)


def test_padded_batch_is_padding_exact(neucodec, neu_clips):
    """Transformers' API on a padded batch: every item as alone (codes, 24 kHz audio, zero after its end)."""
    torch_model, _, model, extractor = neucodec
    torch_batch = extractor(neu_clips, sampling_rate=16000, return_tensors="pt")
    got = model(**{k: v.numpy() for k, v in torch_batch.items()})
    with torch.no_grad():
        theirs = torch_model(**torch_batch)
    assert got.audio_values.shape == theirs.audio_values.shape  # (codes x 480), at most 1.5 x the input
    for i, clip in enumerate(neu_clips):
        want = _alone(torch_model, extractor, clip)
        frames, samples = want.audio_codes.shape[-1], want.audio_values.shape[-1]
        assert got.audio_codes_mask[i].sum() == frames
        np.testing.assert_array_equal(got.audio_codes[i, :, :frames], want.audio_codes[0].numpy())
        assert np.abs(got.audio_values[i, :, :samples] - want.audio_values[0].numpy()).max() < AUDIO_TOL
        assert not got.audio_values[i, :, frames * 480 :].any()
    # Transformers' batched mask marks the short item as 1.5x longer than its codes.
    assert theirs.audio_codes_mask[0].sum() > neu_clips[0].size // 320


def test_export_loads_in_transformers_strictly(neucodec, tmp_path):
    torch_model, _, model, _ = neucodec
    model.save_pretrained(tmp_path, format="transformers")
    exported, info = NeuCodecModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    want = torch_model.state_dict()
    for key, value in exported.state_dict().items():
        if key != "semantic_encoder.masked_spec_embed":  # training only, not kept (exported as zeros)
            torch.testing.assert_close(value, want[key], rtol=0, atol=0)
