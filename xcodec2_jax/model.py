"""``Xcodec2Model``: the user-facing codec with Transformers' API, numpy in and out.

Shapes follow Transformers: ``input_values`` (B, 1, T), ``input_features`` (B, T / 320, 160),
``audio_codes`` (B, 1, F), ``latents`` (B, 2048, F), ``audio_values`` (B, 1, T).

One difference on purpose: when ``padding_mask`` is given, batching is padding-exact: each item is
encoded (and, in ``__call__``, decoded) exactly as if it were alone. Transformers only uses
``padding_mask`` for ``audio_codes_mask``, so its padded items differ from unpadded ones near their end.

The same class runs every checkpoint family (see the README's KNOWN_CHECKPOINTS): X-Codec2, NeuCodec
(``input_features`` have one frame fewer, ``audio_values`` are 24 kHz, 480 samples per code), and the
original ``xcodec2`` layout (all ``T // 320 + 1`` codes of a clip are valid, as its ``encode_code`` returns).
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
from safetensors.numpy import save_file

from . import engine
from .audio import as_wave, load_audio, resample
from .codes import check_codes
from .config import Xcodec2Config
from .engine import DeviceModel, Engine, EngineSettings
from .errors import ConfigError
from .hub import CONFIG_NAME, FLAX_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME, resolve_checkpoint_dir
from .lengths import padded_frames
from .nn.codec import DEFAULT_FLOAT32_PARTS, Xcodec2Codec
from .nn.layers import Numerics
from .weights import TRAINING_ONLY, load_params, open_checkpoint, save_flax_params, transformers_state

SAVE_FORMATS = ("flax", "transformers")


@dataclasses.dataclass
class Xcodec2EncoderOutput:
    """``audio_codes`` (B, 1, F) int32; ``audio_codes_mask`` int32 (B, F), or (B, 1, F) for a (B, 1, T)
    ``padding_mask`` (as Transformers returns it), or None; ``latents`` (B, D, F) float32 when asked for."""

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


def _sample_mask(padding_mask, batch: int, total: int) -> jax.Array | None:
    """``padding_mask`` (B, T) or (B, 1, T) (the shape Transformers documents) -> (B, T); None stays None."""
    if padding_mask is None:
        return None
    mask = jnp.asarray(padding_mask)
    if mask.ndim == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.shape != (batch, total):
        raise ValueError(f"padding_mask must be ({batch}, {total}) or ({batch}, 1, {total}) for input_values "
                         f"({batch}, 1, {total}); got shape {tuple(np.shape(padding_mask))}")
    return mask


def _latents_out(latents: jax.Array) -> np.ndarray:
    """Device (B, F, D) -> Transformers' (B, D, F) float32 numpy."""
    return np.array(latents.astype(jnp.float32)).transpose(0, 2, 1)


class _KeyStream:
    """``rngs.params()`` for shape-only construction: a fresh key per call, no NNX RNG state.

    Under ``nnx.eval_shape`` every ``nnx.Rngs`` draw updates a traced counter, and each update formats an
    error message that walks the whole trace, so building the abstract model is quadratic in the number
    of parameters (10 s for the tiny test model); the weights overwrite these draws anyway.
    """

    def __init__(self) -> None:
        self.key, self.count = jax.random.key(0), 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


class Xcodec2Model:
    """X-Codec2 in JAX: 16 kHz speech <-> one code in [0, 65536) per 20 ms (50 tokens/s).

    Decoded audio is at :attr:`output_sampling_rate` (16 kHz, NeuCodec 24 kHz, Anime-XCodec2 44.1 kHz).

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

    @property
    def sampling_rate(self) -> int:
        """Rate of the audio the encoder takes, in Hz."""
        return self.config.sampling_rate

    @property
    def output_sampling_rate(self) -> int:
        """Rate of the audio the decoder gives, in Hz."""
        return self.config.output_rate

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def from_config(cls, config: Xcodec2Config, dtype=jnp.float32, seed: int = 0, precision: str | None = None,
                    float32_parts: tuple[str, ...] = DEFAULT_FLOAT32_PARTS) -> Xcodec2Model:
        """A randomly initialised model (for tests and training from scratch); arguments as :meth:`from_pretrained`."""
        codec = Xcodec2Codec(config, numerics=Numerics.create(dtype, precision), float32_parts=float32_parts,
                             rngs=nnx.Rngs(seed))
        return cls(config, codec)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, dtype=jnp.float32, revision: str | None = None,
                        precision: str | None = None,
                        float32_parts: tuple[str, ...] = DEFAULT_FLOAT32_PARTS) -> Xcodec2Model:
        """Load a checkpoint of any known layout, converted on the fly on the host.

        Transformers' X-Codec2 and NeuCodec, the original ``xcodec2`` 0.1.5 release and its fine-tunes
        (detected by their keys), and checkpoints written by :meth:`save_pretrained`. Safetensors only.

        Args:
            path_or_repo_id: a local directory (``config.json`` + ``model.safetensors``, a sharded
                ``model.safetensors.index.json``, or ``flax_model.safetensors``) or a Hub repo id such
                as ``"HKUSTAudio/xcodec2-hf"``. The Hub cache and ``HF_HUB_OFFLINE`` are respected.
            dtype: compute dtype, ``jnp.float32`` (default) or ``jnp.bfloat16``: matmuls and convs in bf16
                except ``float32_parts``; norms, FSQ, the anti-aliased activations and the ISTFT head stay
                float32. Parameters are stored in float32 either way.
            revision: Hub branch, tag or commit.
            precision: matmul/conv precision for float32 operands, passed to every matmul and conv:
                "highest" (float32 accuracy: 6 bf16 passes on TPU, full fp32 on GPU), "high" (3 bf16 passes
                on TPU, TF32 on GPU) or "default" (1 bf16 pass on TPU, TF32 on GPU). None (default):
                "highest", except for a bf16/fp16 model's float32 parts when JAX's default backend is a TPU:
                "high" (as accurate for the codes there, half the passes). Lower precision is faster on
                TPU/GPU and flips FSQ codes: with the arithmetic emulated on the full-size random model, a
                float32 model keeps 99.5% of its codes at TPU "high", 51% at TPU "default" and 84% at GPU
                TF32 (``benchmarks/RESULTS.md``, "Precision on accelerators"). It changes nothing on CPU.
            float32_parts: parts kept in float32 when ``dtype`` is bf16/fp16 (see
                ``xcodec2_jax.nn.codec.PARTS``); the default keeps fc_encoder -> project_in, whose output
                FSQ rounds to pick the codes, and the acoustic encoder (98% of the codes then equal float32's
                on the full-size random model, 45% without it; ``benchmarks/RESULTS.md``).
        """
        directory = resolve_checkpoint_dir(path_or_repo_id, revision)
        config, source, flax = open_checkpoint(directory)
        numerics = Numerics.create(dtype, precision)
        abstract = nnx.eval_shape(lambda: Xcodec2Codec(config, numerics=numerics, float32_parts=float32_parts,
                                                       rngs=_KeyStream()))
        nnx.update(abstract, load_params(abstract, source, flax=flax))
        return cls(config, abstract)

    def save_pretrained(self, save_directory: str | Path, format: str = "flax") -> None:
        """Write ``config.json`` and the weights into ``save_directory``.

        Args:
            format: ``"flax"``: ``flax_model.safetensors`` in Flax layout (loads back here, without torch).
                ``"transformers"``: ``model.safetensors`` that Transformers' ``Xcodec2Model`` /
                ``NeuCodecModel.from_pretrained`` loads with no missing or unexpected keys (weights changed
                in JAX go back to PyTorch users). Models with a decoder upsampler (Anime-XCodec2) have no
                Transformers class and are refused.
        """
        if format not in SAVE_FORMATS:
            raise ValueError(f"format={format!r}; expected one of {SAVE_FORMATS}")
        codec = nnx.merge(self.graphdef, self.state)
        if format == "transformers" and self.config.upsample_factors:
            raise ConfigError("this model has a decoder upsampler (upsample_factors="
                              f"{self.config.upsample_factors}), which Transformers has no model for; save it with "
                              "format='flax'")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", "utf-8")
        if format == "flax":
            save_flax_params(codec, directory / FLAX_WEIGHTS_NAME)
            return
        extras = {key: shape(self.config) for key, shape in TRAINING_ONLY.items()}
        save_file(transformers_state(codec, extras), str(directory / TRANSFORMERS_WEIGHTS_NAME),
                  metadata={"format": "pt"})

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
        semantic_frames = frames - self.config.semantic_frame_lag
        want = (b, semantic_frames, self.config.semantic.feature_projection_input_dim)
        if features.shape != want:
            raise ValueError(f"input_features must have shape {want} for input_values {waveform.shape}; "
                             f"got {features.shape}")
        mask_has_channel_axis = np.ndim(padding_mask) == 3
        padding_mask = _sample_mask(padding_mask, b, total)
        lengths = self._lengths(padding_mask, total)
        feature_mask = None
        if input_features_mask is not None:
            feature_mask = _as_batch("input_features_mask", input_features_mask, 2).astype(bool)
        elif lengths is not None:
            valid = lengths // hop - self.config.semantic_frame_lag
            feature_mask = jnp.arange(semantic_frames)[None, :] < valid[:, None]
        codes, latents = engine.encode_arrays(self.graphdef, self.state, waveform, features, lengths, feature_mask,
                                              hop_length=hop)
        codes_mask = None
        if padding_mask is not None:
            # The padding mask counts each clip's samples plus the one zero the extractor appends. X-Codec2 (as
            # Transformers): only frames fully covered by them are valid; NeuCodec: its single-clip count;
            # original layout: every frame (see Xcodec2Config.num_codes).
            samples = np.asarray(padding_mask).astype(np.int64).reshape(b, -1).sum(-1) - 1
            valid = self.config.num_codes(samples)
            codes_mask = (np.arange(codes.shape[1])[None, :] < valid[:, None]).astype(np.int32)
            if mask_has_channel_axis:  # Transformers' codes mask keeps the (B, 1, ...) layout of padding_mask
                codes_mask = codes_mask[:, None, :]
        return codes, latents, codes_mask, lengths

    def _decode(self, latents: jax.Array, frame_lengths: jax.Array | None) -> jax.Array:
        """(B, F, D) -> audio (B, F * hop); zero after each item's ``frame_lengths`` when given."""
        audio = engine.decode_latents(self.graphdef, self.state, latents, frame_lengths)
        if frame_lengths is None:
            return audio
        samples = jnp.arange(audio.shape[-1])[None, :]
        return jnp.where(samples < frame_lengths[:, None] * self.config.output_hop_length, audio, 0.0)

    def encode(self, input_values, input_features, padding_mask=None, input_features_mask=None,
               output_latents: bool = False) -> Xcodec2EncoderOutput:
        """Audio + features (from :class:`Xcodec2FeatureExtractor`) -> codes.

        Args:
            input_values: (B, 1, T) float waveform, T a multiple of the hop length (320).
            input_features: (B, T / 320, 160) stacked log-mel features.
            padding_mask: (B, T) or (B, 1, T), 1 for real samples. When given, each item is encoded exactly as
                if it were alone, and ``audio_codes_mask`` marks its valid codes (as Transformers).
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
        """Codes (B, 1, F) or latents (B, D, F) -> ``audio_values`` (B, 1, F * output hop), e.g. F * 320.

        ``audio_codes_mask`` (B, F) or (B, 1, F): decode each item's valid codes as if alone (padding-
        exact); samples after an item's last valid frame are zero.
        """
        if audio_codes is None and latents is None:
            raise ValueError("Either `audio_codes` or `latents` must be provided.")
        if audio_codes is not None:
            codes = check_codes(audio_codes, "audio_codes", self.config.codebook_size, ndim=3)
            if codes.shape[1] != 1:
                raise ValueError(f"audio_codes must be (B, 1, F); got shape {codes.shape}")
            hidden = engine.codes_to_latents(self.graphdef, self.state, jnp.asarray(codes[:, 0]))
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
        """Encode, then decode from the latents; audio trimmed to the input duration (as Transformers)."""
        codes, latents, codes_mask, lengths = self._encode(input_values, input_features, padding_mask,
                                                            input_features_mask)
        frame_lengths = None
        if lengths is not None:  # the frames with latents (NeuCodec: one fewer than the padded clip's)
            frame_lengths = lengths // self.config.hop_length - self.config.semantic_frame_lag
        duration = int(np.shape(input_values)[-1] * self.config.output_rate / self.config.sampling_rate)
        audio = self._decode(latents, frame_lengths)[:, :duration]
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
            self._engines[settings] = Engine(self.device_model(), settings)
        return self._engines[settings]

    def device_model(self) -> DeviceModel:
        """The weights replicated on this process's devices, placed on first use and then shared by every
        engine and streaming decoder of this model."""
        if self._device is None:
            self._device = DeviceModel(self.graphdef, self.state, self.config)
        return self._device

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

        Each clip's codes are those of the clip encoded alone (padding-exact batching), as many as its
        family's reference keeps (``config.num_codes``): X-Codec2 drops the trailing partial frame as
        Transformers' ``audio_codes_mask`` does, ``(len(clip) + 1) // 320`` codes; NeuCodec gives
        ``len(clip) // 320``; the original layout ``len(clip) // 320 + 1``, as its ``encode_code``.
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
        """1-D integer code arrays -> float32 waveforms at :attr:`output_sampling_rate`, of
        ``len(codes) * config.output_hop_length`` samples each (320 at 16 kHz)."""
        items = codes if isinstance(codes, (list, tuple)) else [codes]
        size = self.config.codebook_size
        checked = [check_codes(c, f"codes item {index}", size) for index, c in enumerate(items)]
        nonempty = [i for i, c in enumerate(checked) if c.size]
        audio = self.engine(settings).decode([checked[i] for i in nonempty], progress=progress)
        out = [np.zeros(0, np.float32) for _ in checked]
        for i, wave in zip(nonempty, audio, strict=True):
            out[i] = wave
        return out
