"""``Xcodec2Model``: the user-facing codec with Transformers' API, numpy in and out.

Shapes follow Transformers: ``input_values`` (B, 1, T), ``input_features`` (B, T / 320, 160),
``audio_codes`` (B, 1, F), ``latents`` (B, 2048, F), ``audio_values`` (B, 1, T).

One difference on purpose: when ``padding_mask`` is given, batching is padding-exact: each item is
encoded (and, in ``__call__``, decoded) exactly as if it were alone. Transformers only uses
``padding_mask`` for ``audio_codes_mask``, so its padded items differ from unpadded ones near their end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import engine
from .audio import as_wave, load_audio, resample
from .config import Xcodec2Config
from .engine import DeviceModel, Engine, EngineSettings
from .hub import CONFIG_NAME, FLAX_WEIGHTS_NAME, CheckpointNotFoundError, find_weights, resolve_checkpoint_dir
from .lengths import padded_frames, whole_frames
from .nn.codec import Xcodec2Codec
from .nn.layers import Numerics
from .weights import load_params, save_flax_params


@dataclasses.dataclass
class Xcodec2EncoderOutput:
    """``audio_codes`` (B, 1, F) int32; ``audio_codes_mask`` (B, F) int32 (as Transformers returns it,
    whatever its docstring says) or None; ``latents`` (B, D, F) float32 when asked for."""

    audio_codes: np.ndarray
    audio_codes_mask: np.ndarray | None = None
    latents: np.ndarray | None = None


@dataclasses.dataclass
class Xcodec2DecoderOutput:
    """``audio_values`` (B, 1, T) float32."""

    audio_values: np.ndarray


@dataclasses.dataclass
class Xcodec2Output:
    """Encode + decode: ``audio_values`` (B, 1, T) trimmed to the input length, plus the encoder fields."""

    audio_values: np.ndarray
    audio_codes: np.ndarray
    audio_codes_mask: np.ndarray | None = None
    latents: np.ndarray | None = None


def _as_batch(name: str, array, ndim: int) -> jax.Array:
    array = jnp.asarray(array)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(array.shape)}")
    return array


def _latents_out(latents: jax.Array) -> np.ndarray:
    """Device (B, F, D) -> Transformers' (B, D, F) float32 numpy."""
    return np.array(latents.astype(jnp.float32)).transpose(0, 2, 1)


class Xcodec2Model:
    """X-Codec2 in JAX: 16 kHz speech <-> one code in [0, 65536) per 20 ms (50 tokens/s).

    Attributes:
        config: the :class:`Xcodec2Config`.
        graphdef, state: the NNX split of the codec module, for use in your own jitted functions
            (``nnx.merge(model.graphdef, model.state)`` gives the :class:`Xcodec2Codec`).
    """

    def __init__(self, config: Xcodec2Config, codec: Xcodec2Codec):
        self.config = config
        self.graphdef, self.state = nnx.split(codec)
        self.dtype = codec.numerics.dtype
        self._device: DeviceModel | None = None  # the weights on the devices, shared by all engines
        self._engines: dict[EngineSettings, Engine] = {}

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def from_config(cls, config: Xcodec2Config, dtype=jnp.float32, seed: int = 0) -> Xcodec2Model:
        """A randomly initialised model (for tests and training from scratch)."""
        codec = Xcodec2Codec(config, numerics=Numerics.for_dtype(dtype), rngs=nnx.Rngs(seed))
        return cls(config, codec)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, dtype=jnp.float32,
                        revision: str | None = None) -> Xcodec2Model:
        """Load a Transformers checkpoint (converted on the fly) or one written by :meth:`save_pretrained`.

        Args:
            path_or_repo_id: a local directory (``config.json`` + ``model.safetensors``, a sharded
                ``model.safetensors.index.json``, or ``flax_model.safetensors``) or a Hub repo id such
                as ``"HKUSTAudio/xcodec2-hf"``. The Hub cache and ``HF_HUB_OFFLINE`` are respected.
            dtype: ``jnp.float32`` (default, full-precision ops) or ``jnp.bfloat16`` (matmuls and convs
                in bf16; norms, FSQ and ISTFT stay float32).
            revision: Hub branch, tag or commit.
        """
        directory = resolve_checkpoint_dir(path_or_repo_id, revision)
        if not (directory / CONFIG_NAME).is_file():
            raise CheckpointNotFoundError(f"{directory} has no {CONFIG_NAME}; expected an X-Codec2 checkpoint")
        config = Xcodec2Config.from_json_file(directory / CONFIG_NAME)
        numerics = Numerics.for_dtype(dtype)
        abstract = nnx.eval_shape(lambda: Xcodec2Codec(config, numerics=numerics, rngs=nnx.Rngs(0)))
        source, files = find_weights(directory)
        params = load_params(abstract, files, source=source)
        nnx.update(abstract, params)
        return cls(config, abstract)

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``config.json`` + ``flax_model.safetensors`` (Flax layout; loads back without torch)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", "utf-8")
        save_flax_params(nnx.merge(self.graphdef, self.state), directory / FLAX_WEIGHTS_NAME)

    # ---------------------------------------------------------------------------- Transformers API
    def _lengths(self, padding_mask, total: int) -> jax.Array | None:
        """Per-item sample count rounded up to the hop: the length each item would have alone."""
        if padding_mask is None:
            return None
        mask = _as_batch("padding_mask", padding_mask, 2)
        if mask.shape[1] != total:
            raise ValueError(f"padding_mask has {mask.shape[1]} samples but input_values has {total}")
        hop = self.config.hop_length
        return padded_frames(mask.astype(jnp.int32).sum(-1), hop) * hop

    def _encode(self, input_values, input_features, padding_mask, input_features_mask):
        """Validated device encode: codes (B, F), latents (B, F, D), codes mask (B, F) or None, lengths."""
        waveform = _as_batch("input_values", input_values, 3)
        features = _as_batch("input_features", input_features, 3)
        b, channels, total = waveform.shape
        hop, frames = self.config.hop_length, total // self.config.hop_length
        if channels != 1 or total % hop:
            raise ValueError(f"input_values must be (B, 1, T) with T a multiple of {hop}; got {waveform.shape}")
        want = (b, frames, self.config.semantic.feature_projection_input_dim)
        if features.shape != want:
            raise ValueError(f"input_features must have shape {want} for input_values {waveform.shape}; "
                             f"got {features.shape}")
        lengths = self._lengths(padding_mask, total)
        feature_mask = None
        if input_features_mask is not None:
            feature_mask = _as_batch("input_features_mask", input_features_mask, 2).astype(bool)
        elif lengths is not None:
            feature_mask = jnp.arange(frames)[None, :] < (lengths // hop)[:, None]
        codes, latents = engine.encode_arrays(self.graphdef, self.state, waveform, features, lengths, feature_mask)
        codes_mask = None
        if padding_mask is not None:
            # As Transformers: only frames fully covered by real samples count as valid codes.
            valid = whole_frames(jnp.asarray(padding_mask).astype(jnp.int32).sum(-1, keepdims=True), hop)
            codes_mask = (jnp.arange(frames)[None, :] < valid).astype(jnp.int32)
        return codes, latents, codes_mask, lengths

    def _decode(self, latents: jax.Array, frame_lengths: jax.Array | None) -> jax.Array:
        """(B, F, D) -> audio (B, F * hop); zero after each item's ``frame_lengths`` when given."""
        audio = engine.decode_latents(self.graphdef, self.state, latents, frame_lengths)
        if frame_lengths is None:
            return audio
        samples = jnp.arange(audio.shape[-1])[None, :]
        return jnp.where(samples < frame_lengths[:, None] * self.config.hop_length, audio, 0.0)

    def encode(self, input_values, input_features, padding_mask=None, input_features_mask=None,
               output_latents: bool = False) -> Xcodec2EncoderOutput:
        """Audio + features (from :class:`Xcodec2FeatureExtractor`) -> codes.

        Args:
            input_values: (B, 1, T) float waveform, T a multiple of the hop length (320).
            input_features: (B, T / 320, 160) stacked log-mel features.
            padding_mask: (B, T) 1 for real samples. When given, each item is encoded exactly as if it
                were alone, and ``audio_codes_mask`` marks its valid codes (as Transformers).
            input_features_mask: (B, T / 320) valid feature frames; defaults to the frames implied by
                ``padding_mask``.
            output_latents: also return the quantized latents (B, 2048, F).
        """
        codes, latents, codes_mask, _ = self._encode(input_values, input_features, padding_mask,
                                                      input_features_mask)
        return Xcodec2EncoderOutput(
            audio_codes=np.array(codes)[:, None, :],
            audio_codes_mask=None if codes_mask is None else np.array(codes_mask),
            latents=_latents_out(latents) if output_latents else None,
        )

    def decode(self, audio_codes=None, latents=None, audio_codes_mask=None) -> Xcodec2DecoderOutput:
        """Codes (B, 1, F) or latents (B, D, F) -> ``audio_values`` (B, 1, F * 320).

        ``audio_codes_mask`` (B, F) or (B, 1, F): decode each item's valid codes as if alone (padding-
        exact); samples after an item's last valid frame are zero.
        """
        if audio_codes is None and latents is None:
            raise ValueError("Either `audio_codes` or `latents` must be provided.")
        if audio_codes is not None:
            codes = _as_batch("audio_codes", audio_codes, 3)
            if codes.shape[1] != 1 or not jnp.issubdtype(codes.dtype, jnp.integer):
                raise ValueError(f"audio_codes must be integer (B, 1, F); got {codes.dtype} {codes.shape}")
            if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
                raise ValueError(f"audio_codes must lie in [0, {self.config.codebook_size}); "
                                 f"got values in [{int(codes.min())}, {int(codes.max())}]")
            hidden = engine.codes_to_latents(self.graphdef, self.state, codes[:, 0].astype(jnp.int32))
        else:
            hidden = _as_batch("latents", latents, 3).transpose(0, 2, 1)
            if hidden.shape[-1] != self.config.quantization_dim:
                raise ValueError(f"latents must be (B, {self.config.quantization_dim}, F); got {latents.shape}")
        frame_lengths = None
        if audio_codes_mask is not None:
            mask = jnp.asarray(audio_codes_mask)
            frame_lengths = mask.reshape(mask.shape[0], -1).astype(jnp.int32).sum(-1)
        return Xcodec2DecoderOutput(audio_values=np.array(self._decode(hidden, frame_lengths))[:, None, :])

    def __call__(self, input_values, input_features, padding_mask=None, input_features_mask=None,
                 output_latents: bool = False) -> Xcodec2Output:
        """Encode, then decode from the latents; audio trimmed to the input length (as Transformers)."""
        codes, latents, codes_mask, lengths = self._encode(input_values, input_features, padding_mask,
                                                            input_features_mask)
        frame_lengths = None if lengths is None else lengths // self.config.hop_length
        audio = self._decode(latents, frame_lengths)[:, : np.shape(input_values)[-1]]
        return Xcodec2Output(
            audio_values=np.array(audio)[:, None, :],
            audio_codes=np.array(codes)[:, None, :],
            audio_codes_mask=None if codes_mask is None else np.array(codes_mask),
            latents=_latents_out(latents) if output_latents else None,
        )

    # -------------------------------------------------------------------------- many clips (engine)
    def engine(self, settings: EngineSettings | None = None) -> Engine:
        """The batched, bucketed, sharded :class:`Engine` for ``settings`` (created once, then reused).

        All engines of a model share one :class:`DeviceModel`: one copy of the weights on the devices and
        one compiled step per (step, batch, bucket).
        """
        settings = settings or EngineSettings()
        if settings not in self._engines:
            if self._device is None:
                self._device = DeviceModel(self.graphdef, self.state, self.config)
            self._engines[settings] = Engine(self._device, settings)
        return self._engines[settings]

    def encode_audio(self, waves_or_paths, sampling_rate: int | None = None, *, progress: bool = False,
                     settings: EngineSettings | None = None) -> list[np.ndarray]:
        """Clips or audio files -> one 1-D int32 code array per clip (50 codes per second at 16 kHz).

        Args:
            waves_or_paths: a clip, a path, or a list of them. Clips are (samples,) or (channels, samples)
                arrays (channels are averaged); files are read with soundfile, mixed to mono and resampled,
                in the engine's worker threads while the devices run.
            sampling_rate: the rate of the in-memory clips (default: the model's, 16 kHz); other rates are
                resampled with soxr.
            progress: show a progress bar.
            settings: batching, bucketing and windowing (:class:`EngineSettings`).

        Each clip's codes are those of the clip encoded alone (padding-exact batching), with the trailing
        partial frame dropped as Transformers' ``audio_codes_mask`` does: ``(len(clip) + 1) // 320`` codes.
        """
        items = waves_or_paths if isinstance(waves_or_paths, (list, tuple)) else [waves_or_paths]
        rate = self.config.sampling_rate
        waves = []
        for index, item in enumerate(items):
            if isinstance(item, (str, Path)):
                waves.append(functools.partial(load_audio, item, rate))
                continue
            wave = as_wave(item, f"audio item {index}", min_samples=1)
            if sampling_rate is not None and sampling_rate != rate:
                wave = resample(wave, sampling_rate, rate)
            waves.append(as_wave(wave, f"audio item {index}"))
        return self.engine(settings).encode(waves, progress=progress)

    def decode_codes(self, codes, *, progress: bool = False, settings: EngineSettings | None = None
                     ) -> list[np.ndarray]:
        """1-D integer code arrays -> float32 16 kHz waveforms of ``len(codes) * 320`` samples each."""
        items = codes if isinstance(codes, (list, tuple)) else [codes]
        checked = [self._check_codes(c, index) for index, c in enumerate(items)]
        nonempty = [i for i, c in enumerate(checked) if c.size]
        audio = self.engine(settings).decode([checked[i] for i in nonempty], progress=progress)
        out = [np.zeros(0, np.float32) for _ in checked]
        for i, wave in zip(nonempty, audio, strict=True):
            out[i] = wave
        return out

    def _check_codes(self, codes, index: int) -> np.ndarray:
        array = np.asarray(codes)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"codes item {index}: expected a 1-D integer array, got {array.dtype} {array.shape}")
        size = self.config.codebook_size
        if array.size and (array.min() < 0 or array.max() >= size):
            raise ValueError(f"codes item {index}: values must lie in [0, {size}); "
                             f"got values in [{array.min()}, {array.max()}]")
        return array.astype(np.int32)
