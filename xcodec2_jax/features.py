"""X-Codec2 feature extractor: padded audio for the acoustic encoder and Kaldi log-mel fbank for the semantic one.

A numpy port of Transformers' ``Xcodec2FeatureExtractor`` (transformers 5.23.0) with the same numerics and
no torch / torchaudio. Transformers loops over the batch calling ``torchaudio.compliance.kaldi.fbank``; here the
whole batch is framed with one strided view and transformed with batched FFTs (in blocks of frames, to bound
memory). That is exact, not an
approximation: each item's audio is followed by zeros both in Transformers' per-item padding and in the padded
batch, so an item's first ``n_i`` frames are identical either way, and only those frames enter its
normalisation statistics.

The Kaldi recipe (what ``fbank`` computes with the options Transformers passes), its constants and its mel
filters live in ``nn/fbank.py``, which also computes the same features on the device inside the engine's
jitted encode step.
"""

from __future__ import annotations

import json
import numbers
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from xcodec2_jax.audio import as_wave
from xcodec2_jax.audio import resample as resample_audio
from xcodec2_jax.config import Xcodec2Config
from xcodec2_jax.errors import AudioError, ConfigError
from xcodec2_jax.hub import PREPROCESSOR_CONFIG_NAME, resolve_checkpoint_dir
from xcodec2_jax.lengths import padded_frames, valid_samples
from xcodec2_jax.nn import fbank as kaldi

_FRAMES_PER_BLOCK = 1024
NEUCODEC_EXTRACTOR = "NeuCodecFeatureExtractor"


class BatchFeature(dict):
    """The extractor's output: a dict whose keys are also attributes (``features.input_values``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no field {name!r}; fields: {sorted(self)}") from None


class Xcodec2FeatureExtractor:
    """Turns raw audio into the four inputs of ``Xcodec2Model``, matching Transformers' extractor.

    Args:
        feature_size: stored and saved for compatibility; the fbank always has ``num_mel_bins = 80`` bins, as in
            Transformers.
        sampling_rate: the rate the model expects, in Hz.
        padding_value: value of padded fbank frames (the acoustic audio is always padded with zeros).
        hop_length: audio samples per codec frame; audio is padded to a multiple of it.
        center: pad each clip with ``hop_length // 2`` zeros on both sides before the fbank (X-Codec2). NeuCodec's
            extractor (``center=False``) skips it: one stacked frame fewer per clip.
    """

    # Fixed in Transformers' ``__init__`` (not read from the config); saved for compatibility.
    num_mel_bins = kaldi.NUM_MEL_BINS
    stride = kaldi.STRIDE  # fbank frames stacked per semantic-encoder frame
    frame_length = kaldi.FRAME_LENGTH  # samples per fbank frame (25 ms at 16 kHz)
    frame_shift = kaldi.FRAME_SHIFT  # samples between fbank frames (10 ms at 16 kHz)
    model_input_names = ("input_features", "input_values", "padding_mask", "input_features_mask")

    def __init__(
        self,
        feature_size: int = 80,
        sampling_rate: int = 16000,
        padding_value: float = 1.0,
        hop_length: int = 320,
        center: bool = True,
    ) -> None:
        self.feature_size = feature_size
        self.sampling_rate = sampling_rate
        self.padding_value = padding_value
        self.hop_length = hop_length
        self.center = center

        self._sizes = kaldi.FrameSizes.at(sampling_rate)
        self._window = kaldi.povey_window(self._sizes.window)
        # (fft_size // 2 + 1, num_mel_bins), contiguous for a fast right matmul
        self._mel_filters = np.ascontiguousarray(kaldi.mel_filters(sampling_rate))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(feature_size={self.feature_size}, sampling_rate={self.sampling_rate}, "
            f"padding_value={self.padding_value}, hop_length={self.hop_length}, center={self.center})"
        )

    @classmethod
    def from_config(cls, config: Xcodec2Config) -> Xcodec2FeatureExtractor:
        """The extractor a model config expects (its input rate, hop and NeuCodec's edge padding)."""
        return cls(sampling_rate=config.sampling_rate, hop_length=config.hop_length,
                   center=config.semantic_frame_lag == 0)

    # ----------------------------------------------------------------------------------------- config I/O

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, revision: str | None = None) -> Xcodec2FeatureExtractor:
        """Read ``preprocessor_config.json`` from a local directory or Hub repo; defaults when it is absent."""
        config_file = resolve_checkpoint_dir(path_or_repo_id, revision) / PREPROCESSOR_CONFIG_NAME
        if not config_file.is_file():
            return cls()
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{config_file}: not valid JSON ({err})") from err
        if not isinstance(config, dict):
            raise ConfigError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        if config.get("padding_side", "right") != "right":
            raise ConfigError(f"{config_file}: padding_side={config['padding_side']!r} is not supported, only 'right'")
        names = ("feature_size", "sampling_rate", "padding_value", "hop_length")
        center = config.get("feature_extractor_type") != NEUCODEC_EXTRACTOR
        return cls(**{name: config[name] for name in names if name in config}, center=center)

    def to_dict(self) -> dict[str, Any]:
        """The fields Transformers' extractor serialises, so either library can load the other's file."""
        return {
            "feature_extractor_type": "Xcodec2FeatureExtractor" if self.center else NEUCODEC_EXTRACTOR,
            "feature_size": self.feature_size,
            "frame_length": self.frame_length,
            "frame_shift": self.frame_shift,
            "hop_length": self.hop_length,
            "num_mel_bins": self.num_mel_bins,
            "padding_side": "right",
            "padding_value": self.padding_value,
            "return_attention_mask": True,
            "sampling_rate": self.sampling_rate,
            "stride": self.stride,
        }

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``preprocessor_config.json`` (Transformers' format) into ``save_directory``; returns its path."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        config_file = directory / PREPROCESSOR_CONFIG_NAME
        config_file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return config_file

    # ------------------------------------------------------------------------------------------ features

    def __call__(
        self,
        audio: Any,
        sampling_rate: int | None = None,
        padding: bool | str = True,
        return_tensors: str | None = "np",
        resample: bool = False,
    ) -> BatchFeature:
        """Compute the model inputs for one clip or a batch.

        Args:
            audio: one clip or a list of clips, interpreted like Transformers' ``make_list_of_audio``: an array
                (any array-like with ``ndim``) or a list of numbers is ONE clip; a list/tuple of those is a
                batch; a list of lists of clips is flattened. A 1-D clip is ``(samples,)``. A 2-D array is one
                clip shaped ``(channels, samples)`` (never a batch) and is mixed down to mono by averaging the
                channels. Float arrays are used as they are (float64 is cast to float32, like Transformers);
                integer arrays are PCM and are scaled to [-1, 1] like soundfile does (int16 / 2**15,
                int32 / 2**31, uint8 as (x - 128) / 128). Lists of numbers are read as float samples.
            sampling_rate: rate of ``audio`` in Hz. A mismatch raises ``ValueError`` unless ``resample=True``.
                ``None`` warns and assumes ``self.sampling_rate``.
            padding: only ``True`` / ``"longest"`` (pad to the longest clip) is supported; Transformers' other
                strategies fail or mis-size the fbank padding for this extractor.
            return_tensors: ``"np"`` or ``None`` for numpy arrays, ``"jax"`` for jax arrays.
            resample: resample ``audio`` from ``sampling_rate`` to ``self.sampling_rate`` instead of raising.

        Returns:
            ``BatchFeature`` with, for B clips, ``T`` = longest clip + 1 rounded up to a multiple of
            ``hop_length``, ``F`` = (number of 10 ms fbank frames of the longest clip rounded up to even) / 2:

            - ``input_values``: float32 (B, 1, T), zero-padded audio.
            - ``padding_mask``: int32 (B, T), 1 for each clip's samples plus one extra (Transformers counts the
              zero sample it appends as valid).
            - ``input_features``: float32 (B, F, 160), normalised log-mel frames stacked in pairs.
            - ``input_features_mask``: int32 (B, F), 1 where both stacked frames are valid.
        """
        if return_tensors not in (None, "np", "jax"):
            raise ValueError(f"return_tensors must be 'np', 'jax' or None, got {return_tensors!r}")
        if padding not in (True, "longest"):
            raise ValueError(f"only padding=True / 'longest' is supported, got {padding!r}")
        waves = [_to_mono_float32(clip, index) for index, clip in enumerate(_make_list_of_audio(audio))]
        waves = self._check_sampling_rate(waves, sampling_rate, resample)

        input_values, padding_mask, lengths = self._pad_audio(waves)
        features, frame_mask = self._normalized_fbank(input_values, lengths)
        outputs = {
            "input_values": input_values[:, None, :],
            "padding_mask": padding_mask,
            "input_features": features,
            "input_features_mask": frame_mask,
        }
        if return_tensors == "jax":
            outputs = {name: jnp.asarray(value) for name, value in outputs.items()}
        return BatchFeature(outputs)

    def item_features(self, waveform: np.ndarray) -> np.ndarray:
        """Stacked log-mel features (T / hop, 160) float32 of one mono clip already zero-padded to a hop multiple.

        What the batch call computes for a clip on its own, minus its one-sample padding rule: the inference
        engine uses it for clips it has padded itself and for the windows it cuts from long audio.
        """
        if waveform.ndim != 1 or waveform.size == 0 or waveform.size % self.hop_length:
            raise ValueError(f"waveform must be 1-D with a length that is a multiple of {self.hop_length}, "
                             f"got shape {waveform.shape}")
        wave = waveform.astype(np.float32, copy=False)[None, :]
        features, _ = self._normalized_fbank(wave, np.array([wave.shape[1]]))
        return features[0]

    def _check_sampling_rate(
        self, waves: list[np.ndarray], sampling_rate: int | None, resample: bool
    ) -> list[np.ndarray]:
        if sampling_rate is None:
            warnings.warn(
                f"No sampling_rate passed to {type(self).__name__}; assuming {self.sampling_rate} Hz. Pass it "
                "to catch audio at the wrong rate, which otherwise fails silently.",
                UserWarning,
                stacklevel=3,
            )
            return waves
        if sampling_rate == self.sampling_rate:
            return waves
        if not resample:
            raise ValueError(
                f"The audio is sampled at {sampling_rate} Hz but this feature extractor expects "
                f"{self.sampling_rate} Hz. Resample it first, or pass resample=True."
            )
        return [resample_audio(wave, sampling_rate, self.sampling_rate) for wave in waves]

    def _pad_audio(self, waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Append one zero sample per clip, then zero-pad to the longest, rounded up to a hop multiple.

        Returns ``input_values`` float32 (B, T), ``padding_mask`` int32 (B, T) and the valid lengths (B,).
        """
        lengths = valid_samples(np.array([wave.size for wave in waves]))
        total = padded_frames(lengths.max(), self.hop_length) * self.hop_length
        input_values = np.zeros((len(waves), total), dtype=np.float32)
        for row, wave in zip(input_values, waves, strict=True):
            row[: wave.size] = wave
        padding_mask = (np.arange(total) < lengths[:, None]).astype(np.int32)
        return input_values, padding_mask, lengths

    def _normalized_fbank(self, input_values: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-clip normalised Kaldi fbank, padded and stacked: float32 (B, F, 160) and int32 mask (B, F)."""
        batch = input_values.shape[0]
        # Transformers runs fbank on each clip's valid length rounded up to a hop multiple, plus hop // 2
        # zeros each side (NeuCodec: none); the batch padded the same way yields the same first frames per clip.
        edge = self.hop_length // 2 if self.center else 0
        samples = padded_frames(lengths, self.hop_length) * self.hop_length
        num_frames = self._sizes.num_frames(samples, self.hop_length, centred=self.center)  # (B,)
        if num_frames.min() < 2:
            index = int(num_frames.argmin())
            raise ValueError(
                f"audio item {index} gives {max(int(num_frames[index]), 0)} fbank frame(s); the per-bin variance "
                f"needs at least 2 (hop_length={self.hop_length} is too small for {self._sizes.window}-sample "
                "frames)"
            )
        frames = self._frames(np.pad(input_values, ((0, 0), (edge, edge))))  # (B, N, window) view
        valid = np.arange(frames.shape[1]) < num_frames[:, None]  # (B, N)
        # Only each clip's own frames are transformed, clip after clip: (M, 80) for M = sum(num_frames). Blocks
        # keep the float64 temporaries a few MB, cache-resident and flat in memory however long the batch.
        clip_index, frame_index = np.nonzero(valid)
        log_mel = np.empty((clip_index.size, self.num_mel_bins))
        for start in range(0, clip_index.size, _FRAMES_PER_BLOCK):
            block = slice(start, start + _FRAMES_PER_BLOCK)
            log_mel[block] = self._log_mel(frames[clip_index[block], frame_index[block]])

        # Per-clip, per-bin statistics over contiguous row segments; the variance is unbiased, as in Transformers.
        starts = np.concatenate([[0], np.cumsum(num_frames)[:-1]])
        mean = np.add.reduceat(log_mel, starts, axis=0) / num_frames[:, None]  # (B, 80)
        centered = log_mel - np.repeat(mean, num_frames, axis=0)
        variance = np.add.reduceat(np.square(centered), starts, axis=0) / (num_frames[:, None] - 1)
        normalized = centered / np.repeat(np.sqrt(variance + kaldi.NORM_EPSILON), num_frames, axis=0)

        # Pad to an even number of frames with padding_value, then stack frame pairs into 2 * 80 features.
        total_frames = -(-frames.shape[1] // self.stride) * self.stride
        features = np.full((batch, total_frames, self.num_mel_bins), self.padding_value, dtype=np.float32)
        features[:, : frames.shape[1]][valid] = normalized
        frame_mask = np.zeros((batch, total_frames), dtype=np.int32)
        frame_mask[:, : frames.shape[1]] = valid
        stacked = features.reshape(batch, total_frames // self.stride, self.stride * self.num_mel_bins)
        return stacked, frame_mask.reshape(batch, -1, self.stride).min(axis=-1)

    def _frames(self, waves: np.ndarray) -> np.ndarray:
        """Kaldi's snip_edges framing (only whole frames) of (B, L) audio: a strided view (B, N, window)."""
        windows = np.lib.stride_tricks.sliding_window_view(waves, self._sizes.window, axis=-1)
        return windows[:, :: self._sizes.shift]

    def _log_mel(self, frames: np.ndarray) -> np.ndarray:
        """Kaldi log-mel fbank of float32 frames (..., window) of audio in [-1, 1]: float64 (..., 80).

        Computed in float64, i.e. Kaldi's math without rounding; the float32 reference differs from it by its
        own rounding, mostly in bins whose energy is tiny next to the rest of the frame.
        """
        frames = np.multiply(frames, kaldi.INT16_SCALE, dtype=np.float64)  # a copy, safe to modify in place
        frames -= frames.mean(axis=-1, keepdims=True)  # remove DC offset
        # Pre-emphasis x[j] - 0.97 x[j - 1]; Kaldi uses x[0] itself as the predecessor of the first sample
        # (which the Povey window then zeroes anyway).
        previous = np.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
        frames -= kaldi.PREEMPHASIS * previous
        frames *= self._window
        spectrum = np.fft.rfft(frames, n=self._sizes.fft, axis=-1)  # zero-padded to the FFT size
        power = np.square(spectrum.real) + np.square(spectrum.imag)
        return np.log(np.maximum(power @ self._mel_filters, kaldi.KALDI_EPSILON))


def _is_clip(value: Any) -> bool:
    """One clip: an array-like with ``ndim`` (numpy, jax, torch) or a non-empty list/tuple of numbers."""
    if isinstance(value, np.ndarray) or (hasattr(value, "__array__") and hasattr(value, "ndim")):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], numbers.Real)


def _make_list_of_audio(audio: Any) -> list[Any]:
    """Transformers' ``make_list_of_audio`` rules: one clip -> [clip]; a batch stays; nested batches flatten."""
    if _is_clip(audio):
        return [audio]
    if isinstance(audio, (list, tuple)) and audio:
        if all(_is_clip(item) for item in audio):
            return list(audio)
        if all(isinstance(group, (list, tuple)) and all(_is_clip(item) for item in group) for group in audio):
            return [item for group in audio for item in group]
    raise ValueError(
        "audio must be one clip (an array or a list of floats), a list of clips, or a list of lists of clips; "
        f"got {type(audio).__name__}" + (" (empty)" if isinstance(audio, (list, tuple)) and not audio else "")
    )


def _to_mono_float32(clip: Any, index: int) -> np.ndarray:
    """Validate one clip and return it as float32 (samples,): a list is read as float samples, an array as
    :func:`~xcodec2_jax.audio.as_wave` reads it (PCM scaled, ``(channels, samples)`` averaged, NaN/Inf refused)."""
    name = f"audio item {index}"
    if isinstance(clip, (list, tuple)):
        try:
            clip = np.asarray(clip, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise AudioError(f"{name}: cannot read the list as float samples ({err})") from None
    return as_wave(clip, name, min_samples=1)


__all__ = ["BatchFeature", "Xcodec2FeatureExtractor"]
