"""Read, write and resample audio files (soundfile + soxr) and check them before they reach the codec.

Samples are float32 in [-1, 1]. A file is ``(samples, channels)`` as soundfile reads it; an in-memory clip is
``(samples,)`` or ``(channels, samples)`` (Transformers' layout); everything the codec sees is mono
``(samples,)``, made by averaging the channels. Every problem with a file or clip raises ``AudioError``
naming it and the problem. These are the only PCM-scaling, mix-down and NaN/Inf rules of the package: the
feature extractor and the model call them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError

# soxr's "HQ" preset (also librosa's default): deterministic, transparent for speech, faster than "VHQ".
RESAMPLE_QUALITY = "HQ"
# One codec frame (hop_length) at 16 kHz: anything shorter cannot be encoded into a single code.
MIN_SAMPLES = 320
# 6 s of synthetic English speech, 16 kHz mono, shipped with the package (see data/README.md).
EXAMPLE_AUDIO = Path(__file__).parent / "data" / "speech.wav"


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a file as float32 ``(samples, channels)`` in [-1, 1] (integer PCM is normalised) and its rate in Hz.

    Raises ``AudioError`` when the file is missing, unreadable, holds no samples or has NaN/Inf samples.
    """
    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, expected an audio file")
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: the file is empty (0 bytes)")
    try:
        wave, sampling_rate = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, TypeError) as err:  # soundfile's LibsndfileError is a RuntimeError
        raise AudioError(
            f"{path}: cannot read the audio, the file is corrupt or not a supported format ({err})"
        ) from err
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: the audio is empty (0 samples)")
    _check_finite(wave, path)
    return wave, sampling_rate


def to_mono(wave: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """Average the channels of float 2-D audio (``channel_axis`` 1: ``(samples, channels)`` as files are read;
    0: ``(channels, samples)``) into float32 ``(samples,)``, in float32; 1-D audio passes through as float32."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 2:
        return wave
    if wave.shape[channel_axis] == 1:  # one channel: that channel, not a slow reduction over a length-1 axis
        return np.take(wave, 0, axis=channel_axis)
    return wave.mean(axis=channel_axis, dtype=np.float32)


def pcm_to_float32(wave: np.ndarray, name: str) -> np.ndarray:
    """Float samples cast to float32; integer PCM scaled into [-1, 1] the way soundfile reads it (int16 / 2**15,
    int32 / 2**31, unsigned 8-bit as (x - 128) / 128). Any other dtype raises ``AudioError`` naming ``name``."""
    if wave.dtype.kind == "f":
        return wave.astype(np.float32, copy=False)
    if wave.dtype.kind in "iu":
        half_range = 2.0 ** (8 * wave.dtype.itemsize - 1)
        offset = half_range if wave.dtype.kind == "u" else 0.0  # unsigned PCM (8-bit WAV) is centred at 128
        return ((wave.astype(np.float64) - offset) / half_range).astype(np.float32)
    raise AudioError(f"{name}: has dtype {wave.dtype}; expected float or integer PCM samples")


def resample(wave: np.ndarray, orig_sampling_rate: int, target_sampling_rate: int) -> np.ndarray:
    """Resample float ``(samples,)`` or ``(samples, channels)`` audio with soxr; float32, same layout.

    Deterministic: the same input always gives the same output. Equal rates return the input as float32.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sampling_rate == target_sampling_rate:
        return wave
    return soxr.resample(wave, orig_sampling_rate, target_sampling_rate, quality=RESAMPLE_QUALITY)


def load_audio_with_info(
    path: str | Path, sampling_rate: int = 16000, min_samples: int = MIN_SAMPLES
) -> tuple[np.ndarray, int]:
    """Load a file as float32 mono ``(samples,)`` at ``sampling_rate``, and the file's own rate in Hz.

    Channels are averaged, then the audio is resampled when the file's rate differs. Raises ``AudioError``
    for the problems ``read_audio`` checks and for audio shorter than ``min_samples`` after resampling.
    """
    wave, orig_sampling_rate = read_audio(path)
    wave = resample(to_mono(wave), orig_sampling_rate, sampling_rate)
    if wave.size < min_samples:
        raise AudioError(
            f"{path}: the audio is too short: {wave.size} samples at {sampling_rate} Hz, "
            f"need at least {min_samples} (one codec frame)"
        )
    return wave, orig_sampling_rate


def load_audio(path: str | Path, sampling_rate: int = 16000, min_samples: int = MIN_SAMPLES) -> np.ndarray:
    """Load a file as float32 mono ``(samples,)`` at ``sampling_rate``; see ``load_audio_with_info``."""
    return load_audio_with_info(path, sampling_rate, min_samples)[0]


def as_wave(wave, name: str, min_samples: int = MIN_SAMPLES) -> np.ndarray:
    """Check an in-memory clip and return it as float32 mono ``(samples,)``.

    ``wave`` is ``(samples,)`` or ``(channels, samples)`` (averaged to mono in float32), float (cast to
    float32) or integer PCM (scaled to [-1, 1] as soundfile does). ``name`` identifies the clip in the
    ``AudioError`` raised when it is not numeric, has another shape (or more channels than samples: a
    transposed array), is empty or shorter than ``min_samples``, or has NaN/Inf samples.
    """
    wave = pcm_to_float32(np.asarray(wave), name)
    if wave.ndim not in (1, 2):
        raise AudioError(f"{name}: has shape {wave.shape}; expected (samples,) or (channels, samples)")
    if wave.size == 0:
        raise AudioError(f"{name}: the audio is empty (shape {wave.shape})")
    if wave.ndim == 2:
        if wave.shape[0] > wave.shape[1]:
            raise AudioError(f"{name}: has shape {wave.shape}, more channels than samples; expected "
                             "(channels, samples): transpose (samples, channels) arrays")
        wave = to_mono(wave, channel_axis=0)
    if wave.size < min_samples:
        raise AudioError(f"{name}: the audio is too short: {wave.size} samples, need at least {min_samples} "
                         "(one codec frame)")
    _check_finite(wave, name)
    return wave


def save_audio(path: str | Path, wave: np.ndarray, sampling_rate: int = 16000, subtype: str = "PCM_16") -> Path:
    """Write float audio ``(samples,)`` or ``(samples, channels)`` in [-1, 1]; creates parent directories.

    ``subtype`` is a soundfile subtype: ``"PCM_16"`` (default), ``"PCM_24"``, ``"FLOAT"``, ... The format comes
    from the extension (``.wav``, ``.flac``, ...). Integer PCM is clipped to [-1, 1] first, since libsndfile
    would otherwise wrap out-of-range samples around. Returns the path written.
    """
    path = Path(path)
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim not in (1, 2) or wave.size == 0:
        raise AudioError(f"{path}: cannot save audio of shape {wave.shape}; expected (samples,) or (samples, channels)")
    _check_finite(wave, path)
    if subtype.startswith("PCM"):
        wave = np.clip(wave, -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sf.write(path, wave, sampling_rate, subtype=subtype)
    except (RuntimeError, TypeError, ValueError) as err:  # LibsndfileError, or a bad subtype for the format
        raise AudioError(f"{path}: cannot write the audio ({err})") from err
    return path


def _check_finite(wave: np.ndarray, name: Path | str) -> None:
    """Raise ``AudioError`` if float ``(samples,)`` or ``(samples, channels)`` audio has NaN/Inf samples."""
    finite = np.isfinite(wave)
    if not finite.all():
        first = tuple(np.argwhere(~finite)[0])
        raise AudioError(f"{name}: the audio has {finite.size - np.count_nonzero(finite)} NaN or Inf sample(s), "
                         f"the first at sample {first[0]}: {wave[first]}")


__all__ = [
    "EXAMPLE_AUDIO",
    "MIN_SAMPLES",
    "AudioError",
    "as_wave",
    "load_audio",
    "load_audio_with_info",
    "pcm_to_float32",
    "read_audio",
    "resample",
    "save_audio",
    "to_mono",
]
