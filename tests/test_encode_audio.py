"""``encode_audio`` / ``decode_codes`` from audio files, end to end, against Transformers; and their input checks.

Reference: the same files loaded and resampled to 16 kHz mono, each clip run alone through Transformers' own
feature extractor and ``Xcodec2Model.encode`` (codes trimmed with ``audio_codes_mask``), then ``decode``.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import assert_audio_close, assert_nontrivial

from convert.kaldi_reference import reference_feature_extractor
from convert.speech import speech_clip
from xcodec2_jax.audio import AudioError, load_audio
from xcodec2_jax.engine import EngineSettings

# Every clip here is under 2 s, so all of them land in one 2 s bucket: one encode and one decode compilation,
# the same shapes as tests/test_cli.py (`--batch-size 2`, its clips in the default 2 s bucket) uses.
SETTINGS = EngineSettings(batch_size=2, bucket_seconds=(2.0,))
CODE_MATCH = 0.999


@pytest.fixture(scope="module")
def wav_files(tmp_path_factory):
    """Speech files as users have them: 16 kHz mono, 22.05 kHz mono (resampled on load), 16 kHz stereo."""
    root = tmp_path_factory.mktemp("wavs")
    stereo = np.stack([speech_clip(1.9, seed=2), 0.5 * speech_clip(1.9, seed=3)], axis=1)
    files = {
        "mono_16k.wav": (speech_clip(1.3, seed=0), 16000),
        "mono_22k.wav": (speech_clip(1.7, sampling_rate=22050, seed=1), 22050),
        "stereo_16k.wav": (stereo, 16000),
    }
    for name, (wave, rate) in files.items():
        sf.write(root / name, wave, rate, subtype="PCM_16")
    return [root / name for name in files]


def _transformers_codes(torch_model, wave: np.ndarray) -> np.ndarray:
    """Transformers' extractor and encoder on one 16 kHz clip: its valid codes, (F,) int64."""
    features = dict(reference_feature_extractor()(wave, sampling_rate=16000, return_tensors="pt"))
    with torch.no_grad():
        encoded = torch_model.encode(**features)
    return encoded.audio_codes[0, 0, : int(encoded.audio_codes_mask.sum())].numpy()


def test_encode_audio_from_files_matches_transformers(reference, wav_files):
    got = reference.model.encode_audio(wav_files, settings=SETTINGS)
    want = [_transformers_codes(reference.torch_model, load_audio(path)) for path in wav_files]

    for path, g, w in zip(wav_files, got, want, strict=True):
        assert g.dtype == np.int32 and g.ndim == 1, (path, g.dtype, g.shape)
        assert g.shape == w.shape, (path, g.shape, w.shape)
    got, want = np.concatenate(got), np.concatenate(want)
    match = np.mean(got == want)
    assert match >= CODE_MATCH, f"code match rate {match:.5f} over {got.size} codes"
    assert len(np.unique(got)) > 0.5 * got.size, "codes are not diverse enough to prove anything"


def test_decode_codes_matches_transformers(reference, wav_files):
    codes = [_transformers_codes(reference.torch_model, load_audio(path)) for path in wav_files]
    got = reference.model.decode_codes(codes, settings=SETTINGS)

    for item, audio in zip(codes, got, strict=True):
        with torch.no_grad():
            want = reference.torch_model.decode(audio_codes=torch.from_numpy(item)[None, None]).audio_values
        want = want[0, 0].numpy()
        assert audio.dtype == np.float32 and audio.shape == want.shape == (item.size * 320,)
        assert_audio_close(audio, want)
        assert_nontrivial(item, audio)


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (np.array([0, 65536, 3]), r"codes must lie in \[0, 65536\); 1 do not, the first at index 1: 65536"),
        (np.array([5, -1, 3]), r"codes must lie in \[0, 65536\); 1 do not, the first at index 1: -1"),
        (np.array([1.0, 2.0]), r"expected a 1-D integer array of codes, got dtype float64 and shape \(2,\)"),
        (np.zeros((1, 4), np.int32), r"expected a 1-D integer array of codes, got dtype int32 and shape \(1, 4\)"),
    ],
    ids=["too-large", "negative", "float", "2-D"],
)
def test_decode_codes_rejects_bad_codes(reference, codes, message):
    with pytest.raises(ValueError, match=r"codes item 0: " + message):
        reference.model.decode_codes(codes)


def test_encode_audio_rejects_bad_audio(reference, tmp_path):
    nan = speech_clip(0.5)
    nan[100] = np.nan
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 64)
    cases = [
        (np.zeros(0, np.float32), r"audio item 0: the audio is (empty|too short: 0 samples)"),
        (nan, r"audio item 0: the audio has 1 NaN or Inf sample\(s\)"),
        (np.zeros(100, np.float32), r"audio item 0: the audio is too short: 100 samples, need at least 320"),
        (tmp_path / "missing.wav", r"missing\.wav: no such file"),
        (corrupt, r"corrupt\.wav: cannot read the audio, the file is corrupt or not a supported format"),
    ]
    for item, message in cases:
        with pytest.raises(AudioError, match=message):
            reference.model.encode_audio(item)
