"""Inference engine: jit-compiled, padding-exact, bucketed and sharded encode/decode over many devices.

How it works
------------
* **Pure functions over** ``(graphdef, state)``: the NNX graph is merged only while tracing; each step shape
  is compiled once ahead of time (``jit(...).lower(...).compile()``), keyed by (step, batch, bucket), so the
  number of compilations is bounded by the buckets whatever the input lengths.
* **One copy on the devices per model**: a :class:`DeviceModel` holds the replicated weights and the
  compiled steps; every :class:`Engine` of a model (one per :class:`EngineSettings`) shares it, so
  host-only settings (windows, cross-fade, workers) duplicate nothing on the devices.
* **Padding-exact batching**: every item carries its valid length. Inside the model, convolutions see
  zeros after an item's end, anti-aliased activations replicate the item's own last sample, GroupNorm
  statistics and attention keys cover only the item's frames, and the ISTFT overlap-add sums only its own
  frames (see ``nn/``); the device fbank normalises each item over its own frames. An item's codes and audio
  therefore do not depend on its batch, its bucket or the padding it received: they equal encoding that item
  alone with Transformers.
* **Length-aware batching**: prepared items wait in a pool sorted by length (up to ``pool_batches``
  batches); each step takes the run of neighbouring lengths that wastes the least padding, padded to the
  smallest bucket that holds its longest item, so computed seconds stay close to audio seconds. Each bucket
  has one batch size (a multiple of the device count): ``batch_size`` up to ``full_batch_seconds``, fewer
  items (powers of two per device, at least one each) at longer buckets, so that a long step holds no more
  audio than a full one; batches are topped up with dummy items only at the very end.
* **Pipelined steps**: the host packs and transfers batch N+1 while the devices run batch N; results come
  back with ``copy_to_host_async`` and are read one step later, so the host never waits between steps.
  Features (on the host) or audio loading run in ``workers`` threads ahead of both.
* **Features on the device** (``device_features``, default on GPU/TPU): the Kaldi fbank runs inside the
  jitted encode step (``nn/fbank.py``), so the host only loads, resamples and pads waveforms.
* **Sharding**: a 1-D ``Mesh`` over this process's devices with axis ``"data"``; parameters replicated,
  batches split along the batch axis (``NamedSharding``). Under ``jax.distributed`` every process runs its
  own steps on its own devices: the step needs no communication (each item is computed on one device), so
  processes never wait for each other and never pad their items to another process's lengths.
* **Long audio**: inputs longer than ``window_seconds`` are cut into windows of that length overlapping by
  ``overlap_seconds``; each window is encoded as an item of its own (its own features), and the codes are
  stitched at the middle of each overlap, so every kept code has at least ``overlap_seconds / 2`` of context
  on both sides. Long code streams are decoded the same way, the audio cross-faded over
  ``crossfade_seconds`` around each cut.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import Xcodec2Config
from .errors import ConfigError
from .features import Xcodec2FeatureExtractor
from .lengths import check_frame_lengths, check_sample_lengths
from .nn.codec import Xcodec2Codec
from .nn.fbank import KaldiFbank
from .nn.layers import Array, weights_in_compute_dtype

DATA_AXIS = "data"
DEFAULT_CACHE_DIR = Path(os.environ.get("XCODEC2_JAX_CACHE", Path.home() / ".cache" / "xcodec2_jax" / "jax"))
# Steps dispatched but not yet read back: 2 is double buffering (pack N+1 while N runs).
MAX_IN_FLIGHT = 2


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Turn on JAX's persistent compilation cache (process-wide) so later processes start fast.

    Without ``directory``, a cache JAX already has (``JAX_COMPILATION_CACHE_DIR``) is kept.
    """
    if directory is None and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = Path(directory or DEFAULT_CACHE_DIR).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


# ------------------------------------------------------------------------------------ device functions
@functools.partial(jax.jit, static_argnames="graphdef")
def _encode_arrays(graphdef: nnx.GraphDef, state: nnx.State, waveform: Array, features: Array,
                   sample_lengths: Array | None, feature_mask: Array | None) -> tuple[Array, Array]:
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.encode(waveform, features, sample_lengths, feature_mask)


def encode_arrays(graphdef: nnx.GraphDef, state: nnx.State, waveform: Array, features: Array,
                  sample_lengths: Array | None = None, feature_mask: Array | None = None,
                  hop_length: int | None = None) -> tuple[Array, Array]:
    """Any-shape jitted :meth:`Xcodec2Codec.encode` (one compilation per shape): (codes, latents).

    ``sample_lengths`` (B,) must be multiples of the hop in [hop, T]; anything else raises ``ValueError``
    (checked here, before tracing, where the values are known). ``hop_length``: the config's; None takes
    ``T / features.shape[1]``, right for X-Codec2 (NeuCodec's features are one frame shorter: pass it).
    """
    if sample_lengths is not None:
        total = np.shape(waveform)[-1]
        hop_length = hop_length or total // max(np.shape(features)[1], 1)
        check_sample_lengths(sample_lengths, np.shape(waveform)[0], total, hop_length)
    return _encode_arrays(graphdef, state, waveform, features, sample_lengths, feature_mask)


@functools.partial(jax.jit, static_argnames="graphdef")
def _decode_latents(graphdef: nnx.GraphDef, state: nnx.State, latents: Array, frame_lengths: Array | None) -> Array:
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.decode(latents, frame_lengths)


def decode_latents(graphdef: nnx.GraphDef, state: nnx.State, latents: Array,
                   frame_lengths: Array | None = None) -> Array:
    """Any-shape jitted :meth:`Xcodec2Codec.decode`: waveform (B, F * hop) float32.

    ``frame_lengths`` (B,) must lie in [0, F]; anything else raises ``ValueError``.
    """
    if frame_lengths is not None:
        check_frame_lengths(frame_lengths, np.shape(latents)[0], np.shape(latents)[1])
    return _decode_latents(graphdef, state, latents, frame_lengths)


@functools.partial(jax.jit, static_argnames="graphdef")
def codes_to_latents(graphdef: nnx.GraphDef, state: nnx.State, codes: Array) -> Array:
    """codes (B, F) -> quantized latents (B, F, D)."""
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.latents_from_codes(codes)


def _encode(graphdef: nnx.GraphDef, state: nnx.State, waveform: Array, features: Array, sample_lengths: Array,
            feature_mask: Array) -> Array:
    """(B, 1, T), (B, F, 160), (B,), (B, F) -> codes (B, F) int32, each item padding-exact."""
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.encode(waveform, features, sample_lengths, feature_mask)[0]


def _encode_fbank(graphdef: nnx.GraphDef, fbank: KaldiFbank, state: nnx.State, waveform: Array,
                  sample_lengths: Array) -> Array:
    """(B, 1, T), (B,) -> codes (B, F) int32, the features computed on the device."""
    features, feature_mask = fbank(waveform[:, 0], sample_lengths)
    return _encode(graphdef, state, waveform, features, sample_lengths, feature_mask)


def _decode(graphdef: nnx.GraphDef, state: nnx.State, codes: Array, frame_lengths: Array) -> Array:
    """codes (B, F), (B,) -> audio (B, F * hop) float32, each item padding-exact."""
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.decode(codec.latents_from_codes(codes), frame_lengths)


def step_functions(graphdef: nnx.GraphDef, mesh: Mesh, fbank: KaldiFbank | None = None) -> dict[str, Any]:
    """The engine's jitted device steps on ``mesh``: parameters replicated, batch split over ``DATA_AXIS``.

    ``{"encode": f(state, waveform, features, sample_lengths, feature_mask) -> codes,
    "encode_fbank": f(state, waveform, sample_lengths) -> codes (the fbank features computed in the step by
    ``fbank``, default: 16 kHz, hop 320), "decode": f(state, codes, frame_lengths) -> audio}``. Lower them
    with :func:`step_inputs` (and an abstract state) to compile for devices this host does not have, e.g. a
    TPU topology.
    """
    fbank = fbank or KaldiFbank()
    replicated = NamedSharding(mesh, PartitionSpec())
    batched = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

    def step(fn, inputs: int):
        return jax.jit(fn, in_shardings=(replicated, *[batched] * inputs), out_shardings=batched)

    return {
        "encode": step(lambda s, *a: _encode(graphdef, s, *a), 4),
        "encode_fbank": step(lambda s, *a: _encode_fbank(graphdef, fbank, s, *a), 2),
        "decode": step(lambda s, *a: _decode(graphdef, s, *a), 2),
    }


def step_inputs(config: Xcodec2Config, kind: str, global_batch: int, frames: int,
                mesh: Mesh) -> list[jax.ShapeDtypeStruct]:
    """Global shapes of one step's inputs at bucket ``frames``: encode (waveform (B, 1, frames * hop),
    features (B, frames, 160), sample lengths (B,), feature mask (B, frames)); encode_fbank (waveform,
    sample lengths); decode (codes (B, frames), frame lengths (B,))."""
    b, hop, dims = global_batch, config.hop_length, config.semantic.feature_projection_input_dim
    shapes = {
        "encode": [((b, 1, frames * hop), np.float32), ((b, frames, dims), np.float32), ((b,), np.int32),
                   ((b, frames), np.bool_)],
        "encode_fbank": [((b, 1, frames * hop), np.float32), ((b,), np.int32)],
        "decode": [((b, frames), np.int32), ((b,), np.int32)],
    }[kind]
    batched = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return [jax.ShapeDtypeStruct(shape, dtype, sharding=batched) for shape, dtype in shapes]


class DeviceModel:
    """The codec on this process's devices: weights replicated once, each step compiled once per shape.

    Every :class:`Engine` of a model shares one, whatever its settings. Compiled steps are keyed by
    (step kind, batch, bucket frames); see :func:`step_functions` for the kinds.
    """

    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, config: Xcodec2Config,
                 devices: Sequence[jax.Device] | None = None):
        devices = list(devices or jax.local_devices())
        if any(d.process_index != jax.process_index() for d in devices):
            raise ValueError("an engine runs on this process's own devices (jax.local_devices()); under "
                             "jax.distributed every process runs its own engine")
        self.config = config
        self.mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
        self.platform = devices[0].platform
        # bfloat16 layers' weights cast once here rather than in every step (same numbers, half the bytes read)
        self.state = jax.device_put(weights_in_compute_dtype(graphdef, state),
                                    NamedSharding(self.mesh, PartitionSpec()))
        self._batched = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self._jitted = step_functions(graphdef, self.mesh, KaldiFbank(config.sampling_rate, config.hop_length))
        self._compiled: dict[tuple[str, int, int], Any] = {}
        self.compile_seconds: dict[tuple[str, int, int], float] = {}

    def step(self, kind: str, batch: int, frames: int):
        """The compiled ``kind`` step for ``batch`` items at bucket ``frames``; compiled on first use.

        Call it as ``step(device_model.state, *inputs)`` with inputs shaped as :func:`step_inputs` says.
        """
        key = (kind, batch, frames)
        if key not in self._compiled:
            begin = time.perf_counter()
            self._compiled[key] = self._jitted[kind].lower(
                self.state, *step_inputs(self.config, kind, batch, frames, self.mesh)).compile()
            self.compile_seconds[key] = time.perf_counter() - begin
        return self._compiled[key]

    @property
    def num_compilations(self) -> int:
        return len(self._compiled)

    def put(self, batch: np.ndarray) -> jax.Array:
        """A host batch (B, ...) split over the devices along its first axis."""
        return jax.device_put(batch, self._batched)


# ------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Batching and windowing knobs.

    Attributes:
        batch_size: items per step, split among this process's devices (rounded up to a multiple of the device
            count), at buckets up to ``full_batch_seconds``.
        full_batch_seconds: longer buckets take fewer items: per device, the largest power of two whose step
            holds no more than ``batch_size * full_batch_seconds`` seconds of audio, and at least one item per
            device; on one device with the defaults, 8 items up to 6 s, 4 up to 12 s, 2 up to 24 s, 1 beyond.
            So a few long clips are not batched (and padded) with many shorter ones, and a long step holds no
            more audio than a full one (unless one item per device already does); powers of two because odd
            batches ran slower per audio second on XLA:CPU. None: ``batch_size`` items at every bucket. On
            GPU/TPU, where bigger steps pay, raise ``batch_size`` (the budget scales with it) or use None.
        bucket_seconds: padded lengths; each bucket compiles once per direction, with its one batch size (the
            persistent compilation cache keeps them across processes). The window length is always a bucket.
            The defaults are 0.5 s apart up to 12 s, then 1 s (under 9% apart from 6 s up), so padding to a
            bucket costs ~3% of long clips.
        window_seconds: longer inputs are processed in overlapping windows of this length.
        overlap_seconds: overlap between consecutive windows (codes and audio are cut at its middle); > 0.
        crossfade_seconds: linear cross-fade around each cut when decoding long code streams; at most the
            overlap, so that the fading windows both cover it (their weights then sum to 1).
        workers: threads loading audio and computing host features while the devices run.
        device_features: compute the fbank features inside the encode step (True) or on the host (False);
            None: on the device on GPU/TPU, on the host on CPU.
        pool_batches: prepared items held for length-aware batching, in batches (host memory: up to this
            many batches of windows, plus their features when computed on the host).
    """

    batch_size: int = 8
    full_batch_seconds: float | None = 6.0
    bucket_seconds: tuple[float, ...] = (*(0.5 * n for n in range(2, 25)), *map(float, range(13, 31)))
    window_seconds: float = 30.0
    overlap_seconds: float = 4.0
    crossfade_seconds: float = 0.08
    workers: int = 2
    device_features: bool | None = None
    pool_batches: int = 16

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.full_batch_seconds is not None and not 0 < self.full_batch_seconds < math.inf:
            raise ConfigError(f"full_batch_seconds={self.full_batch_seconds} must be positive and finite (or None)")
        if not self.bucket_seconds or min(self.bucket_seconds) <= 0:
            raise ConfigError(f"bucket_seconds={self.bucket_seconds} must be positive")
        if not 0 < self.overlap_seconds < self.window_seconds:
            raise ConfigError(f"overlap_seconds={self.overlap_seconds} must be in (0, window_seconds="
                             f"{self.window_seconds})")
        if not 0 <= self.crossfade_seconds <= self.overlap_seconds:
            raise ConfigError(f"crossfade_seconds={self.crossfade_seconds} must be in [0, overlap_seconds="
                             f"{self.overlap_seconds}]: a longer fade reaches past a window's edge, and the "
                             "windows' weights would no longer sum to 1")
        if self.workers < 0 or self.pool_batches < 1:
            raise ConfigError(f"workers={self.workers} must be >= 0 and pool_batches={self.pool_batches} >= 1")


@dataclasses.dataclass
class Counters:
    """What one direction of an engine has done: ``computed_seconds / audio_seconds`` is its padding cost.

    Attributes:
        items: inputs completed.
        steps: device steps run.
        audio_seconds: seconds of the completed inputs (audio for encode, codes / frame rate for decode).
        computed_seconds: seconds the devices computed: batch x bucket per step, padding, window overlaps and
            dummy rows included.
    """

    items: int = 0
    steps: int = 0
    audio_seconds: float = 0.0
    computed_seconds: float = 0.0

    @property
    def computed_per_audio_second(self) -> float:
        return self.computed_seconds / self.audio_seconds if self.audio_seconds else math.nan


@dataclasses.dataclass
class EngineStats:
    """Cumulative :class:`Counters` of an engine, per direction."""

    encode: Counters = dataclasses.field(default_factory=Counters)
    decode: Counters = dataclasses.field(default_factory=Counters)

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {name: {**dataclasses.asdict(c), "computed_per_audio_second": c.computed_per_audio_second}
                for name, c in (("encode", self.encode), ("decode", self.decode))}


@dataclasses.dataclass(frozen=True)
class Window:
    """Frames [start, start + frames) of an input, of which [keep_start, keep_end) are kept."""

    start: int
    frames: int
    keep_start: int
    keep_end: int


def plan_windows(total: int, window: int, overlap: int) -> list[Window]:
    """Cover ``total`` frames with windows of ``window`` frames overlapping by at least ``overlap``.

    Windows start every ``window - overlap`` frames, the last one flush with the end; consecutive windows
    hand over at the middle of their overlap.
    """
    if total <= window:
        return [Window(0, total, 0, total)]
    step = window - overlap
    starts = [*range(0, total - window, step), total - window]
    cuts = [(nxt + cur + window) // 2 for cur, nxt in itertools.pairwise(starts)]
    bounds = [0, *cuts, total]
    return [Window(s, window, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


@dataclasses.dataclass
class _Segment:
    """One device item: a window of an input with its host arrays."""

    item: int
    index: int
    window: Window
    arrays: tuple[np.ndarray, ...]


@dataclasses.dataclass
class _Pending:
    key: Any
    windows: list[Window]
    valid: int  # outputs to keep: codes (encode) or samples (decode)
    seconds: float  # the input's duration, for the counters
    results: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


class _Pool:
    """Prepared segments sorted by length; hands out the batches that waste the least padding."""

    def __init__(self, bucket_for: Callable[[int], int], batch_for: Callable[[int], int]):
        self.bucket_for, self.batch_for = bucket_for, batch_for
        self.entries: list[tuple[int, int, _Segment]] = []  # (frames, arrival, segment), sorted
        self.arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, segment: _Segment) -> None:
        bisect.insort(self.entries, (segment.window.frames, next(self.arrivals), segment), key=lambda e: e[:2])

    def take(self, drain: bool) -> tuple[list[_Segment], int]:
        """Up to ``batch_for(bucket)`` segments of neighbouring lengths and their bucket; ([], 0) when empty.

        While inputs keep coming, the full run (its bucket's batch) with the least computed frames per valid
        frame; at the end (``drain``), the longest first, so that only the last, shortest batch has dummy rows.
        """
        if not self.entries:
            return [], 0
        frames = np.array([e[0] for e in self.entries])
        buckets = np.array([self.bucket_for(f) for f in frames])  # of the run ending at each entry
        rows = np.array([self.batch_for(b) for b in buckets])
        ends = np.arange(1, frames.size + 1)
        counts = np.minimum(rows, ends)
        if drain:
            end = frames.size
        else:
            valid = np.concatenate([[0], np.cumsum(frames)])
            cost = rows * buckets / (valid[ends] - valid[ends - counts])
            if (counts == rows).any():  # short runs (dummy rows) wait for the end
                cost = np.where(counts == rows, cost, np.inf)
            end = int(np.argmin(cost)) + 1
        run = self.entries[end - counts[end - 1] : end]
        del self.entries[end - counts[end - 1] : end]
        return [e[2] for e in run], int(buckets[end - 1])


# --------------------------------------------------------------------------------------------- engine
class Engine:
    """Bucketed, padding-exact, sharded encode/decode of many clips (see the module docstring).

    ``Engine(device_model, settings)``; ``Xcodec2Model.engine(settings)`` builds and caches them, all on the
    model's one :class:`DeviceModel`. ``stats`` counts audio and computed seconds per direction.
    """

    def __init__(self, device: DeviceModel, settings: EngineSettings | None = None):
        self.device, self.config, self.settings = device, device.config, settings or EngineSettings()
        count = device.mesh.size
        self.batch = math.ceil(self.settings.batch_size / count) * count
        rate = self.config.frame_rate
        self.window_frames = round(self.settings.window_seconds * rate)
        # An even overlap of at least overlap_seconds puts each cut exactly at its middle, overlap / 2 from
        # both edges; the cross-fade (<= the overlap) then lies inside both windows.
        self.overlap_frames = 2 * math.ceil(round(self.settings.overlap_seconds * rate, 9) / 2)  # 9: float noise
        if self.overlap_frames >= self.window_frames:
            raise ConfigError(f"overlap_seconds={self.settings.overlap_seconds} rounds to {self.overlap_frames} "
                             f"frames, not less than the {self.window_frames}-frame window")
        self.fade_samples = int(self.settings.crossfade_seconds * self.config.output_rate)
        self.buckets = tuple(sorted({min(round(s * rate), self.window_frames) for s in self.settings.bucket_seconds}
                                    | {self.window_frames}))
        if self.buckets[0] < 1:
            raise ConfigError(f"bucket_seconds={self.settings.bucket_seconds}: {min(self.settings.bucket_seconds)} s "
                              f"rounds to 0 frames at {rate} frames per second")
        full = self.window_frames if self.settings.full_batch_seconds is None else \
            round(self.settings.full_batch_seconds * rate)
        fits = {b: max(1, self.batch // count * full // b) for b in self.buckets}  # items per device
        self.batches = {b: self.batch if b <= full else 2 ** (fits[b].bit_length() - 1) * count for b in self.buckets}
        self.device_features = self._device_features(self.settings.device_features)
        self.extractor = None if self.device_features else Xcodec2FeatureExtractor.from_config(self.config)
        self.kinds = {"encode": "encode_fbank" if self.device_features else "encode", "decode": "decode"}
        self.stats = EngineStats()

    # ---------------------------------------------------------------------------------- device plumbing
    def compiled(self, direction: str, frames: int):
        """The compiled step for ``direction`` ("encode"/"decode") at bucket ``frames`` (shared by all engines
        of the model). Call it as ``compiled(engine.device.state, *engine.device_batch(direction, rows, frames))``.
        """
        return self.device.step(self.kinds[direction], self.batches[frames], frames)

    @property
    def num_compilations(self) -> int:
        """Compiled steps on this engine's :class:`DeviceModel` (shared with the model's other engines)."""
        return self.device.num_compilations

    def _device_features(self, requested: bool | None) -> bool:
        """Whether the fbank runs in the encode step: as requested, by default on GPU/TPU. The device fbank
        pads each clip by half a hop on both sides as X-Codec2's extractor does; NeuCodec's extractor does
        not, so NeuCodec checkpoints keep their features on the host."""
        centred = self.config.semantic_frame_lag == 0
        if requested and not centred:
            raise ConfigError(f"device_features=True: the {self.config.model_type} feature extractor (no edge "
                              "padding) runs on the host only; leave device_features unset")
        return centred and (self.device.platform != "cpu" if requested is None else requested)

    def bucket_for(self, frames: int) -> int:
        """Smallest bucket (in frames) holding ``frames``."""
        return self.buckets[bisect.bisect_left(self.buckets, frames)]

    def batch_for(self, bucket: int) -> int:
        """Items per step at ``bucket`` frames (see ``EngineSettings.full_batch_seconds``)."""
        return self.batches[bucket]

    # ------------------------------------------------------------------------------------ batch packing
    def device_batch(self, direction: str, rows: list[tuple[np.ndarray, ...]], frames: int) -> list[jax.Array]:
        """Pack up to ``batch_for(frames)`` rows into one padded step at bucket ``frames``, on the devices.

        Encode rows are (waveform (f * hop,),) with features on the device, (waveform, features (f, 160))
        with features on the host; decode rows are (codes (f,),). Missing rows are dummy items (full-length
        silence / zero codes) whose outputs are discarded.
        """
        pack = self._pack_encode if direction == "encode" else self._pack_decode
        return [self.device.put(a) for a in pack(rows, frames)]

    def _pack_encode(self, rows: list[tuple[np.ndarray, ...]], frames: int) -> tuple[np.ndarray, ...]:
        hop, n = self.config.hop_length, self.batches[frames]
        waveform = np.zeros((n, 1, frames * hop), np.float32)
        lengths = np.full((n,), frames * hop, np.int32)  # dummy rows: full-length silence
        for row, (wave, *_) in enumerate(rows):
            waveform[row, 0, : wave.size], lengths[row] = wave, wave.size
        if self.device_features:
            return waveform, lengths
        features = np.full((n, frames, self.config.semantic.feature_projection_input_dim),
                           self.extractor.padding_value, np.float32)
        mask = np.ones((n, frames), bool)
        for row, (_, feats) in enumerate(rows):
            f = feats.shape[0]  # semantic frames: wave.size // hop, NeuCodec one fewer
            features[row, :f], mask[row] = feats, np.arange(frames) < f
        return waveform, features, lengths, mask

    def _pack_decode(self, rows: list[tuple[np.ndarray, ...]], frames: int) -> tuple[np.ndarray, ...]:
        codes = np.zeros((self.batches[frames], frames), np.int32)
        lengths = np.full((self.batches[frames],), frames, np.int32)
        for row, (item_codes,) in enumerate(rows):
            codes[row, : item_codes.size] = item_codes
            lengths[row] = item_codes.size
        return codes, lengths

    # ---------------------------------------------------------------------------------- preparation
    def _prepare_encode(self, item: int, key: Any, value: np.ndarray | Callable[[], np.ndarray]
                        ) -> tuple[_Pending, list[_Segment]]:
        """Load (when ``value`` is a loader), pad as the extractor would, cut into windows (+ host features)."""
        wave = value() if callable(value) else value
        hop = self.config.hop_length
        padded = np.zeros(self.config.padded_frames(wave.size) * hop, np.float32)
        padded[: wave.size] = wave
        windows = plan_windows(padded.size // hop, self.window_frames, self.overlap_frames)
        segments = []
        for index, w in enumerate(windows):
            audio = padded[w.start * hop : (w.start + w.frames) * hop]
            arrays = (audio,) if self.device_features else (audio, self.extractor.item_features(audio))
            segments.append(_Segment(item, index, w, arrays))
        # As many codes as the checkpoint family's reference keeps (Transformers' audio_codes_mask for X-Codec2).
        return _Pending(key, windows, int(self.config.num_codes(wave.size)), wave.size / self.config.sampling_rate), \
            segments

    def _prepare_decode(self, item: int, key: Any, codes: np.ndarray) -> tuple[_Pending, list[_Segment]]:
        windows = plan_windows(codes.size, self.window_frames, self.overlap_frames)
        segments = [_Segment(item, i, w, (codes[w.start : w.start + w.frames],)) for i, w in enumerate(windows)]
        samples, seconds = codes.size * self.config.output_hop_length, codes.size / self.config.frame_rate
        return _Pending(key, windows, samples, seconds), segments

    def _stitch_codes(self, pending: _Pending) -> np.ndarray:
        parts = [pending.results[i][w.keep_start - w.start : w.keep_end - w.start]
                 for i, w in enumerate(pending.windows)]
        return np.concatenate(parts)[: pending.valid].astype(np.int32)

    def _stitch_audio(self, pending: _Pending) -> np.ndarray:
        """Sum the windows' audio, each weighted by ramps that cross-fade around the cuts (weights sum to 1)."""
        hop = self.config.output_hop_length  # decoded samples per code
        out = np.zeros(pending.valid, np.float32)
        last = len(pending.windows) - 1
        for i, w in enumerate(pending.windows):
            span = slice(w.start * hop, (w.start + w.frames) * hop)
            positions = np.arange(span.start, span.stop)
            weight = np.ones(positions.size, np.float32)
            if i > 0:
                weight *= _rise(positions, w.keep_start * hop, self.fade_samples)
            if i < last:
                weight *= 1 - _rise(positions, w.keep_end * hop, self.fade_samples)
            out[span] += pending.results[i][: positions.size] * weight
        return out

    # ---------------------------------------------------------------------------------------- streams
    def _stream(self, direction: str, items: Iterable[tuple[Any, Any]],
                prepare: Callable[[int, Any, Any], tuple[_Pending, list[_Segment]]],
                stitch: Callable[[_Pending], np.ndarray], threaded: bool) -> Iterator[tuple[Any, np.ndarray]]:
        """Pool prepared segments, run them in length-aware batches, pipelined; yield (key, result) as items
        complete."""
        pool, pending = _Pool(self.bucket_for, self.batch_for), {}
        limit = self.settings.pool_batches * self.batch
        prepared = _prefetch(itertools.starmap(lambda i, kv: (i, *kv), enumerate(items)), prepare,
                             self.settings.workers if threaded else 0, lookahead=max(2 * self.batch, limit // 4))
        in_flight: collections.deque = collections.deque()
        exhausted = False
        while True:
            while not exhausted and len(pool) < limit:
                try:
                    item, entry, segments = next(prepared)
                except StopIteration:
                    exhausted = True
                    break
                pending[item] = entry
                for segment in segments:
                    pool.add(segment)
            segments, frames = pool.take(drain=exhausted)
            if segments:
                in_flight.append(self._dispatch(direction, segments, frames))
            if len(in_flight) > (MAX_IN_FLIGHT - 1 if segments else 0):
                yield from self._collect(direction, *in_flight.popleft(), pending, stitch)
            elif not segments:
                return

    def _dispatch(self, direction: str, segments: list[_Segment], frames: int) -> tuple[list[_Segment], jax.Array]:
        """Pack, transfer and launch one step without waiting for it; its output starts copying back when ready."""
        step = self.compiled(direction, frames)
        output = step(self.device.state, *self.device_batch(direction, [s.arrays for s in segments], frames))
        output.copy_to_host_async()
        counters = getattr(self.stats, direction)
        counters.steps += 1
        counters.computed_seconds += self.batches[frames] * frames / self.config.frame_rate
        return segments, output

    def _collect(self, direction: str, segments: list[_Segment], output: jax.Array, pending: dict[int, _Pending],
                 stitch: Callable[[_Pending], np.ndarray]) -> Iterator[tuple[Any, np.ndarray]]:
        """Read one step's outputs back (waits for it) and yield the items it completes."""
        counters = getattr(self.stats, direction)
        for segment, result in zip(segments, np.asarray(output), strict=False):
            entry = pending[segment.item]
            entry.results[segment.index] = result
            if len(entry.results) == len(entry.windows):
                del pending[segment.item]
                counters.items += 1
                counters.audio_seconds += entry.seconds
                yield entry.key, stitch(entry)

    def encode_stream(self, items: Iterable[tuple[Any, np.ndarray | Callable[[], np.ndarray]]]
                      ) -> Iterator[tuple[Any, np.ndarray]]:
        """(key, mono 16 kHz float32 wave, or a zero-argument loader returning one) -> (key, int32 codes),
        yielded as items complete (not in input order).

        Loaders run in the ``workers`` threads, like host features, while the devices run. Memory stays
        bounded by the pool, so this scales to corpora that do not fit in memory.
        """
        return self._stream("encode", items, self._prepare_encode, self._stitch_codes, threaded=True)

    def decode_stream(self, items: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray]]:
        """(key, 1-D int codes) -> (key, float32 audio at the output rate, len(codes) * output hop samples), as
        items complete."""
        return self._stream("decode", items, self._prepare_decode, self._stitch_audio, threaded=False)

    def encode(self, waves: Sequence[np.ndarray | Callable[[], np.ndarray]], progress: bool = False
               ) -> list[np.ndarray]:
        """Codes of each clip (or loader), in input order."""
        return _ordered(self.encode_stream(enumerate(waves)), len(waves), progress, "encode")

    def decode(self, codes: Sequence[np.ndarray], progress: bool = False) -> list[np.ndarray]:
        """Audio of each code array, in input order."""
        return _ordered(self.decode_stream(enumerate(codes)), len(codes), progress, "decode")


def _rise(positions: np.ndarray, cut: int, fade: int) -> np.ndarray:
    """0 before ``cut - fade / 2``, 1 after ``cut + fade / 2``, linear in between (a step when fade is 0)."""
    if fade == 0:
        return (positions >= cut).astype(np.float32)
    return np.clip((positions - (cut - fade / 2)) / fade, 0.0, 1.0).astype(np.float32)


def _prefetch(items: Iterator[tuple], prepare: Callable, workers: int, lookahead: int) -> Iterator[tuple]:
    """(item, key, value) -> (item, *prepare(item, key, value)), computed ``lookahead`` ahead in threads."""
    if workers <= 0:
        for item, key, value in items:
            yield (item, *prepare(item, key, value))
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xcodec2-prepare") as pool:
        futures: collections.deque = collections.deque()
        for item, key, value in items:
            futures.append((item, pool.submit(prepare, item, key, value)))
            if len(futures) >= lookahead:
                done_item, future = futures.popleft()
                yield (done_item, *future.result())
        while futures:
            done_item, future = futures.popleft()
            yield (done_item, *future.result())


def _ordered(stream: Iterator[tuple[int, np.ndarray]], count: int, progress: bool, what: str) -> list[np.ndarray]:
    results: list[np.ndarray | None] = [None] * count
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=count, desc=what, unit="clip")
    for index, result in stream:
        results[index] = result
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


__all__ = ["DATA_AXIS", "Counters", "DeviceModel", "Engine", "EngineSettings", "EngineStats", "Window",
           "codes_to_latents", "decode_latents", "enable_compilation_cache", "encode_arrays", "plan_windows",
           "step_functions", "step_inputs"]
