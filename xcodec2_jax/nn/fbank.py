"""Kaldi log-mel fbank features, Transformers' ``Xcodec2FeatureExtractor`` recipe, on the device.

This module is the one home of the recipe's numbers and matrices: the host extractor (``features.py``,
numpy, float64) builds its window and mel filters here too, so both paths share every constant.

The recipe per 25 ms frame, 10 ms apart, on ``wave * 32768`` (Kaldi reads 16-bit PCM as integers): subtract
the frame mean, pre-emphasis 0.97 (the first sample uses itself as its predecessor), Povey window
(``hann ** 0.85``, symmetric), zero-pad to 512, power spectrum, 80 triangular mel filters between 20 Hz and
Nyquist on Kaldi's mel scale ``1127 ln(1 + f / 700)``, ``log(max(e, eps))`` with float32's epsilon. Then,
per clip and bin, ``(x - mean) / sqrt(unbiased var + 1e-7)`` over the clip's own frames, padding frames set
to ``padding_value``, pairs of frames stacked (160 features per codec frame).

On the device, everything from the raw frame to the spectrum is linear, so DC removal, pre-emphasis, the
window, the int16 scale and the real DFT fold into ONE (frame_samples, 2 * bins) matrix, built in float64
once: the fbank is a frame gather made of slices, one matmul (MXU/tensor-core friendly, unlike an FFT on a
TPU), a square, a second matmul with the mel filters, a log and masked per-item statistics. Both matmuls run
in float32 at ``HIGHEST`` precision.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..lengths import check_sample_lengths
from .layers import Array

NUM_MEL_BINS = 80
STRIDE = 2  # fbank frames stacked per codec frame
FRAME_LENGTH = 400  # samples per fbank frame at 16 kHz (25 ms)
FRAME_SHIFT = 160  # samples between fbank frames at 16 kHz (10 ms)
# Kaldi floors energies at std::numeric_limits<float>::epsilon() before the log.
KALDI_EPSILON = float(np.finfo(np.float32).eps)
# Kaldi reads 16-bit PCM as integers; Transformers rescales float audio in [-1, 1] to that range.
INT16_SCALE = 2.0**15
PREEMPHASIS = 0.97
POVEY_EXPONENT = 0.85
LOW_FREQ_HZ = 20.0
# Per-bin normalisation: (x - mean) / sqrt(unbiased var + this), as in Transformers.
NORM_EPSILON = 1e-7


@dataclasses.dataclass(frozen=True)
class FrameSizes:
    """Kaldi's frame geometry at a sampling rate: window and shift in samples, FFT size."""

    window: int
    shift: int
    fft: int

    @classmethod
    def at(cls, sampling_rate: int) -> FrameSizes:
        # Transformers passes frame length and shift to Kaldi in milliseconds and Kaldi turns them back into
        # samples with int(); repeat that float round trip so odd sampling rates truncate the same way.
        window = int(sampling_rate * (FRAME_LENGTH / sampling_rate * 1000) * 0.001)
        shift = int(sampling_rate * (FRAME_SHIFT / sampling_rate * 1000) * 0.001)
        return cls(window, shift, 1 << (window - 1).bit_length())  # Kaldi's round_to_power_of_two

    def num_frames(self, samples, hop_length: int, centred: bool = True):
        """Fbank frames of clips of ``samples`` (multiples of the hop; int or integer array): Transformers pads
        each clip with ``hop_length // 2`` zeros on both sides (X-Codec2; NeuCodec, not ``centred``: none)
        and keeps only whole frames (snip_edges)."""
        return 1 + (samples + 2 * (hop_length // 2) * centred - self.window) // self.shift


def povey_window(size: int) -> np.ndarray:
    """Kaldi's Povey window, a symmetric Hann window to the power 0.85: float64 (size,)."""
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(size) / (size - 1))
    return hann**POVEY_EXPONENT


def kaldi_mel_filters(num_bins: int, fft_size: int, sample_freq: float, low_freq: float,
                      high_freq: float) -> np.ndarray:
    """Kaldi's triangular mel filters (no VTLN warp): float64 (num_bins, fft_size // 2 + 1).

    The filters are triangles equally spaced on the mel scale ``1127 ln(1 + f / 700)``, evaluated at the FFT
    bin centres in mel; the Nyquist bin gets weight 0, as in Kaldi.
    """

    def mel(freq):
        return 1127.0 * np.log(1.0 + np.asarray(freq) / 700.0)

    mel_low, mel_high = mel(low_freq), mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)  # num_bins + 1 intervals: the edge triangles spread out
    left = mel_low + np.arange(num_bins)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    bin_mel = mel(sample_freq / fft_size * np.arange(fft_size // 2))[None, :]
    up_slope = (bin_mel - left) / (center - left)
    down_slope = (right - bin_mel) / (right - center)
    filters = np.maximum(0.0, np.minimum(up_slope, down_slope))
    return np.pad(filters, ((0, 0), (0, 1)))


def mel_filters(sampling_rate: int) -> np.ndarray:
    """The extractor's filters at ``sampling_rate``: float64 (fft // 2 + 1, 80), for a right matmul."""
    fft = FrameSizes.at(sampling_rate).fft
    return kaldi_mel_filters(NUM_MEL_BINS, fft, float(sampling_rate), LOW_FREQ_HZ, float(sampling_rate // 2)).T


@functools.cache
def _spectrum_matrices(sampling_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 (window, 2 * bins) frame -> [real | imaginary] spectrum, and float32 (bins, 80) mel filters.

    ``bins = fft // 2``: the Nyquist bin is dropped, its mel weight is 0. The spectrum matrix is
    ``32768 * (I - 1/N) @ preemphasis @ diag(povey) @ [cos | -sin]``, composed in float64.
    """
    sizes = FrameSizes.at(sampling_rate)
    n, bins = sizes.window, sizes.fft // 2
    remove_dc = np.eye(n) - 1.0 / n
    preemphasis = np.eye(n) - PREEMPHASIS * np.eye(n, k=-1)  # y[j] = x[j] - 0.97 x[j - 1] ...
    preemphasis[0, 0] -= PREEMPHASIS  # ... and y[0] = x[0] - 0.97 x[0]
    angle = 2.0 * np.pi * np.outer(np.arange(n), np.arange(bins)) / sizes.fft
    dft = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)  # (n, 2 * bins)
    frame_to_spectrum = INT16_SCALE * (povey_window(n)[:, None] * (preemphasis @ remove_dc)).T @ dft
    return frame_to_spectrum.astype(np.float32), mel_filters(sampling_rate)[:bins].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class KaldiFbank:
    """Transformers' Xcodec2 features of a padded batch, computed on the device (jit-friendly, hashable).

    Per-item statistics cover only each item's own frames, so an item's features do not depend on its batch
    or its padding (they equal the extractor's on the item alone).
    """

    sampling_rate: int = 16000
    hop_length: int = 320
    padding_value: float = 1.0

    def __call__(self, waveform: Array, sample_lengths: Array) -> tuple[Array, Array]:
        """Features of each item's first ``sample_lengths`` samples.

        Args:
            waveform: (B, T) float audio in [-1, 1], T a multiple of the hop length.
            sample_lengths: (B,) int valid samples per item, multiples of the hop length, at least one hop.

        Returns:
            features (B, T / hop, 160) float32, normalised log-mel frames stacked in pairs, ``padding_value``
            after each item's frames; mask (B, T / hop) bool, True on each item's valid stacked frames.
        """
        batch, total = waveform.shape
        check_sample_lengths(sample_lengths, batch, total, self.hop_length)
        sizes, edge = FrameSizes.at(self.sampling_rate), self.hop_length // 2
        count = sizes.num_frames(total, self.hop_length)
        if -(-count // STRIDE) != total // self.hop_length:
            raise ValueError(f"{count} fbank frames do not stack into {total // self.hop_length} codec frames "
                             f"(sampling_rate={self.sampling_rate}, hop_length={self.hop_length})")
        to_spectrum, filters = (jnp.asarray(m) for m in _spectrum_matrices(self.sampling_rate))

        # Zero each item's padding (it must look like the zeros Transformers pads one clip with), add the
        # extractor's hop // 2 edges, and cut into shift-sized chunks: frame n is chunks n, n + 1, ... joined.
        samples = jnp.arange(total)[None, :] < sample_lengths[:, None]
        wave = jnp.where(samples, waveform.astype(jnp.float32), 0.0)
        pieces = -(-sizes.window // sizes.shift)
        wave = jnp.pad(wave, ((0, 0), (edge, (count + pieces - 1) * sizes.shift - total - edge)))
        chunks = wave.reshape(batch, count + pieces - 1, sizes.shift)
        frames = jnp.concatenate([chunks[:, k : k + count] for k in range(pieces)], axis=-1)[..., : sizes.window]

        highest = jax.lax.Precision.HIGHEST
        spectrum = jnp.matmul(frames, to_spectrum, precision=highest)  # (B, N, 2 * bins)
        real, imag = jnp.split(spectrum, 2, axis=-1)
        power = jnp.square(real) + jnp.square(imag)
        log_mel = jnp.log(jnp.maximum(jnp.matmul(power, filters, precision=highest), KALDI_EPSILON))

        valid_count = sizes.num_frames(sample_lengths, self.hop_length)  # (B,)
        valid = (jnp.arange(count)[None, :] < valid_count[:, None])[..., None]  # (B, N, 1)
        mean = jnp.where(valid, log_mel, 0.0).sum(1, keepdims=True) / valid_count[:, None, None]
        centered = jnp.where(valid, log_mel - mean, 0.0)
        variance = jnp.square(centered).sum(1, keepdims=True) / (valid_count[:, None, None] - 1)
        normalized = jnp.where(valid, centered / jnp.sqrt(variance + NORM_EPSILON), self.padding_value)

        padded = -(-count // STRIDE) * STRIDE
        normalized = jnp.pad(normalized, ((0, 0), (0, padded - count), (0, 0)), constant_values=self.padding_value)
        valid = jnp.pad(valid[..., 0], ((0, 0), (0, padded - count)))
        features = normalized.reshape(batch, padded // STRIDE, STRIDE * NUM_MEL_BINS)
        return features, valid.reshape(batch, padded // STRIDE, STRIDE).all(-1)


__all__ = ["FrameSizes", "KaldiFbank", "kaldi_mel_filters", "mel_filters", "povey_window"]
