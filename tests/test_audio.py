"""``xcodec2_jax.audio``: reading, mono mixdown, resampling, writing, and the errors for bad files."""

import numpy as np
import pytest
import soundfile as sf

from convert.speech import speech_clip
from xcodec2_jax.audio import (
    MIN_SAMPLES,
    AudioError,
    load_audio,
    load_audio_with_info,
    read_audio,
    resample,
    save_audio,
    to_mono,
)

DURATION = 1.25  # seconds


def write(path, rate, channels=1, subtype="PCM_16"):
    """Speech at ``rate`` (a second channel is a quieter, delayed copy); returns the float samples written."""
    mono = speech_clip(DURATION, sampling_rate=rate, seed=rate)
    samples = mono if channels == 1 else np.stack([mono, 0.5 * np.roll(mono, 11)], axis=1)
    sf.write(path, samples, rate, subtype=subtype)
    return samples


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize(
    ("suffix", "subtype", "channels"), [(".wav", "PCM_16", 1), (".flac", "PCM_16", 2), (".wav", "FLOAT", 2)]
)
def test_load_resamples_to_16k_mono(tmp_path, rate, suffix, subtype, channels):
    path = tmp_path / f"speech_{rate}{suffix}"
    write(path, rate, channels, subtype)
    wave, orig_rate = load_audio_with_info(path)
    assert orig_rate == rate
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - DURATION * 16000) <= 1
    assert np.abs(wave).max() <= 1.0
    np.testing.assert_array_equal(load_audio(path), wave)  # deterministic resampling


def test_stereo_16k_is_the_mean_of_channels(tmp_path):
    path = tmp_path / "stereo.wav"
    samples = write(path, 16000, channels=2, subtype="FLOAT").astype(np.float32)
    np.testing.assert_allclose(load_audio(path), samples.mean(axis=1), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(read_audio(path)[0], samples)  # no resampling at the file's own rate


def test_int_pcm_is_normalised(tmp_path):
    path = tmp_path / "pcm.wav"
    pcm = np.tile(np.array([-32768, -16384, 0, 16384, 32767], dtype=np.int16), 100)
    sf.write(path, pcm, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(path)[:5], [-1.0, -0.5, 0.0, 0.5, 32767 / 32768])


def test_resample_keeps_layout_and_is_deterministic():
    stereo = np.stack([speech_clip(0.5, 48000), speech_clip(0.5, 48000, seed=1)], axis=1)
    out = resample(stereo, 48000, 16000)
    assert out.shape == (8000, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out, resample(stereo, 48000, 16000))
    np.testing.assert_allclose(to_mono(out), resample(to_mono(stereo), 48000, 16000), atol=1e-5)


@pytest.mark.parametrize(("subtype", "atol"), [("PCM_16", 1 / 32768), ("FLOAT", 0.0)])
def test_save_round_trip(tmp_path, subtype, atol):
    wave = speech_clip(0.5)
    path = save_audio(tmp_path / "new" / "dir" / "out.wav", wave, subtype=subtype)
    assert sf.info(path).subtype == subtype
    np.testing.assert_allclose(load_audio(path), wave, rtol=0, atol=atol)


def test_save_clips_pcm_instead_of_wrapping(tmp_path):
    path = save_audio(tmp_path / "loud.wav", np.array([2.0, -3.0] * 200, np.float32))
    np.testing.assert_allclose(load_audio(path)[:2], [32767 / 32768, -1.0])


def make_bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.wav"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "zero_length":
        sf.write(path, np.zeros(0, np.float32), 16000)
    elif kind == "nan":
        sf.write(path, np.array([0.1, np.nan, 0.2] * 200, np.float32), 16000, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing", "no such file"),
        ("corrupt", "cannot read the audio, the file is corrupt"),
        ("empty_file", "the file is empty (0 bytes)"),
        ("zero_length", "the audio is empty (0 samples)"),
        ("nan", "the audio has 200 NaN or Inf sample(s)"),
    ],
)
def test_bad_files_raise_audio_error(tmp_path, kind, problem):
    path = tmp_path / f"{kind}.wav" if kind == "missing" else make_bad_file(tmp_path, kind)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_too_short_audio_raises_after_resampling(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, speech_clip(0.015, 8000), 8000)  # 120 samples at 8 kHz -> 240 at 16 kHz
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert str(path) in str(info.value) and f"240 samples at 16000 Hz, need at least {MIN_SAMPLES}" in str(info.value)
    assert load_audio(path, min_samples=1).size == 240


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)


def test_save_rejects_bad_audio_and_formats(tmp_path):
    with pytest.raises(AudioError, match=r"nan\.wav: the audio has 1 NaN"):
        save_audio(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.0], np.float32))
    with pytest.raises(AudioError, match=r"out\.flac: cannot write the audio"):
        save_audio(tmp_path / "out.flac", np.zeros(400, np.float32), subtype="FLOAT")  # FLAC has no float
