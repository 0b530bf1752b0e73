"""Inference engine: jit-compiled, padding-exact, bucketed and sharded encode/decode over many devices.

How it works
------------
* **Pure functions over** ``(graphdef, state)``: the NNX graph is merged only while tracing; each bucket
  shape is compiled once ahead of time (``jit(...).lower(...).compile()``), so the number of compilations
  is at most the number of buckets per direction, whatever the input lengths.
* **Padding-exact batching**: every item carries its valid length. Inside the model, convolutions see
  zeros after an item's end, anti-aliased activations replicate the item's own last sample, GroupNorm
  statistics and attention keys cover only the item's frames, and the ISTFT overlap-add sums only its own
  frames (see ``nn/``). An item's codes and audio therefore do not depend on its batch, its bucket or the
  padding it received: they equal encoding that item alone with Transformers.
* **Buckets**: inputs are padded to the smallest bucket length (in frames) that holds them; batches have a
  fixed size (a multiple of the local device count), topped up with dummy items.
* **Sharding**: a 1-D ``Mesh`` over all devices with axis ``"data"``; parameters replicated, batches split
  along the batch axis (``NamedSharding``). This is what replaces ``pmap``. Under
  ``jax.distributed.initialize()`` every process feeds its own local batch
  (``jax.make_array_from_process_local_data``) and all processes agree on each step's bucket with one tiny
  all-gather, so they stay in lockstep whatever their inputs.
* **Long audio**: inputs longer than ``window_seconds`` are cut into windows of that length overlapping by
  ``overlap_seconds``; each window is encoded as an item of its own (its own features), and the codes are
  stitched at the middle of each overlap, so every kept code has at least ``overlap_seconds / 2`` of context
  on both sides. Long code streams are decoded the same way, the audio cross-faded over
  ``crossfade_frames`` around each cut.
"""

from __future__ import annotations

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
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import multihost
from .config import Xcodec2Config
from .features import Xcodec2FeatureExtractor
from .nn.codec import Xcodec2Codec
from .nn.layers import Array

DATA_AXIS = "data"
DEFAULT_CACHE_DIR = Path(os.environ.get("XCODEC2_JAX_CACHE", Path.home() / ".cache" / "xcodec2_jax" / "jax"))


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
def encode_arrays(graphdef: nnx.GraphDef, state: nnx.State, waveform: Array, features: Array,
                  sample_lengths: Array | None, feature_mask: Array | None) -> tuple[Array, Array]:
    """Any-shape jitted :meth:`Xcodec2Codec.encode` (one compilation per shape): (codes, latents)."""
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.encode(waveform, features, sample_lengths, feature_mask)


@functools.partial(jax.jit, static_argnames="graphdef")
def decode_latents(graphdef: nnx.GraphDef, state: nnx.State, latents: Array, frame_lengths: Array | None) -> Array:
    """Any-shape jitted :meth:`Xcodec2Codec.decode`: waveform (B, F * hop) float32."""
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.decode(latents, frame_lengths)


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


def _decode(graphdef: nnx.GraphDef, state: nnx.State, codes: Array, frame_lengths: Array) -> Array:
    """codes (B, F), (B,) -> audio (B, F * hop) float32, each item padding-exact."""
    codec: Xcodec2Codec = nnx.merge(graphdef, state)
    return codec.decode(codec.latents_from_codes(codes), frame_lengths)


def step_functions(graphdef: nnx.GraphDef, mesh: Mesh) -> dict[str, Any]:
    """The engine's jitted device steps on ``mesh``: parameters replicated, batch split over ``DATA_AXIS``.

    ``{"encode": f(state, waveform, features, sample_lengths, feature_mask) -> codes,
    "decode": f(state, codes, frame_lengths) -> audio}``. Lower them with :func:`step_inputs` (and an
    abstract state) to compile for devices this host does not have, e.g. a TPU topology.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    batched = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return {
        "encode": jax.jit(lambda s, *a: _encode(graphdef, s, *a),
                          in_shardings=(replicated, batched, batched, batched, batched), out_shardings=batched),
        "decode": jax.jit(lambda s, *a: _decode(graphdef, s, *a),
                          in_shardings=(replicated, batched, batched), out_shardings=batched),
    }


def step_inputs(config: Xcodec2Config, kind: str, global_batch: int, frames: int,
                mesh: Mesh) -> list[jax.ShapeDtypeStruct]:
    """Global shapes of one step's inputs at bucket ``frames``: encode (waveform (B, 1, frames * hop),
    features (B, frames, 160), sample lengths (B,), feature mask (B, frames)); decode (codes (B, frames),
    frame lengths (B,))."""
    b, hop, dims = global_batch, config.hop_length, config.semantic.feature_projection_input_dim
    shapes = ([((b, 1, frames * hop), np.float32), ((b, frames, dims), np.float32), ((b,), np.int32),
               ((b, frames), np.bool_)] if kind == "encode" else [((b, frames), np.int32), ((b,), np.int32)])
    batched = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return [jax.ShapeDtypeStruct(shape, dtype, sharding=batched) for shape, dtype in shapes]


# ------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Batching and windowing knobs.

    Attributes:
        batch_size: items per device step in this process (rounded up to a multiple of its device count).
        bucket_seconds: padded lengths; each bucket compiles once per direction. The window length is
            always a bucket.
        window_seconds: longer inputs are processed in overlapping windows of this length.
        overlap_seconds: overlap between consecutive windows (codes and audio are cut at its middle).
        crossfade_frames: frames of linear cross-fade around each cut when decoding long code streams.
        workers: threads computing features while the device runs.
    """

    batch_size: int = 8
    bucket_seconds: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
    window_seconds: float = 30.0
    overlap_seconds: float = 4.0
    crossfade_frames: int = 4
    workers: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if not self.bucket_seconds or min(self.bucket_seconds) <= 0:
            raise ValueError(f"bucket_seconds={self.bucket_seconds} must be positive")
        if not 0 <= self.overlap_seconds < self.window_seconds:
            raise ValueError(f"overlap_seconds={self.overlap_seconds} must be in [0, window_seconds)")


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
    results: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------- engine
class Engine:
    """Bucketed, padding-exact, sharded encode/decode of many clips (see the module docstring)."""

    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, config: Xcodec2Config,
                 settings: EngineSettings | None = None, extractor: Xcodec2FeatureExtractor | None = None,
                 devices: Sequence[jax.Device] | None = None):
        self.config, self.settings = config, settings or EngineSettings()
        self.extractor = extractor or Xcodec2FeatureExtractor(sampling_rate=config.sampling_rate,
                                                              hop_length=config.hop_length)
        self.mesh = Mesh(np.asarray(devices or jax.devices()), (DATA_AXIS,))
        self.multiprocess = jax.process_count() > 1
        local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
        self.local_batch = math.ceil(self.settings.batch_size / local) * local
        self.global_batch = self.local_batch * (self.mesh.size // local)
        rate = config.frame_rate
        self.window_frames = round(self.settings.window_seconds * rate)
        self.overlap_frames = round(self.settings.overlap_seconds * rate)
        self.buckets = tuple(sorted({min(round(s * rate), self.window_frames) for s in self.settings.bucket_seconds}
                                    | {self.window_frames}))

        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batched = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self.state = self._replicate(state)
        self._jitted = step_functions(graphdef, self.mesh)
        self._compiled: dict[tuple[str, int], Any] = {}
        self.compile_seconds: dict[tuple[str, int], float] = {}
        # Seconds of audio this process's device steps computed (every row of every step, filler rows and
        # padding included); over the seconds of audio fed, it is the padding waste.
        self.computed_seconds = 0.0

    # ---------------------------------------------------------------------------------- device plumbing
    def _replicate(self, state: nnx.State) -> nnx.State:
        if not self.multiprocess:
            return jax.device_put(state, self._replicated)
        host = jax.tree.map(np.asarray, state)
        return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, self._replicated, lambda i: x[i]), host)

    def _to_device(self, local: np.ndarray) -> jax.Array:
        if not self.multiprocess:
            return jax.device_put(local, self._batched)
        shape = (self.global_batch, *local.shape[1:])
        return jax.make_array_from_process_local_data(self._batched, local, shape)

    def _to_host(self, array: jax.Array) -> np.ndarray:
        if not self.multiprocess:
            return np.asarray(array)
        return np.asarray(multihost_utils.global_array_to_host_local_array(array, self.mesh,
                                                                          PartitionSpec(DATA_AXIS)))

    def compiled(self, kind: str, frames: int):
        """The AOT-compiled step for ``kind`` ("encode"/"decode") at bucket ``frames``; compiled on first use.

        Call it as ``compiled(engine.state, *engine.device_batch(kind, rows, frames))``.
        """
        key = (kind, frames)
        if key not in self._compiled:
            begin = time.perf_counter()
            self._compiled[key] = self._jitted[kind].lower(
                self.state, *step_inputs(self.config, kind, self.global_batch, frames, self.mesh)).compile()
            self.compile_seconds[key] = time.perf_counter() - begin
        return self._compiled[key]

    @property
    def num_compilations(self) -> int:
        return len(self._compiled)

    def bucket_for(self, frames: int) -> int:
        """Smallest bucket (in frames) holding ``frames``."""
        return next(b for b in self.buckets if b >= frames)

    # ------------------------------------------------------------------------------------ batch packing
    def device_batch(self, kind: str, rows: list[tuple[np.ndarray, ...]], frames: int) -> list[jax.Array]:
        """Pack up to ``local_batch`` rows into one padded step at bucket ``frames``, on the devices.

        Encode rows are (waveform (f * hop,), features (f, 160)); decode rows are (codes (f,),). Missing
        rows are dummy items (full-length silence / zero codes) whose outputs are discarded.
        """
        pack = self._pack_encode if kind == "encode" else self._pack_decode
        return [self._to_device(a) for a in pack(rows, frames)]

    def _pack_encode(self, rows: list[tuple[np.ndarray, ...]], frames: int) -> tuple[np.ndarray, ...]:
        hop, n = self.config.hop_length, self.local_batch
        waveform = np.zeros((n, 1, frames * hop), np.float32)
        features = np.full((n, frames, self.config.semantic.feature_projection_input_dim),
                           self.extractor.padding_value, np.float32)
        lengths = np.full((n,), frames * hop, np.int32)  # dummy rows: full-length silence
        mask = np.ones((n, frames), bool)
        for row, (wave, feats) in enumerate(rows):
            f = feats.shape[0]
            waveform[row, 0, : f * hop], features[row, :f] = wave, feats
            lengths[row], mask[row] = f * hop, np.arange(frames) < f
        return waveform, features, lengths, mask

    def _pack_decode(self, rows: list[tuple[np.ndarray, ...]], frames: int) -> tuple[np.ndarray, ...]:
        codes = np.zeros((self.local_batch, frames), np.int32)
        lengths = np.full((self.local_batch,), frames, np.int32)
        for row, (item_codes,) in enumerate(rows):
            codes[row, : item_codes.size] = item_codes
            lengths[row] = item_codes.size
        return codes, lengths

    def _run(self, kind: str, segments: list[_Segment], frames: int) -> np.ndarray:
        step = self.compiled(kind, frames)
        return self._to_host(step(self.state, *self.device_batch(kind, [s.arrays for s in segments], frames)))

    # ---------------------------------------------------------------------------------- preparation
    def _prepare_encode(self, item: int, key: Any, wave: np.ndarray) -> tuple[_Pending, list[_Segment]]:
        """Pad one clip as the feature extractor would, cut it into windows, compute each window's features."""
        hop = self.config.hop_length
        total = -(-(wave.size + 1) // hop)  # the extractor appends one sample, then pads to the hop
        padded = np.zeros(total * hop, np.float32)
        padded[: wave.size] = wave
        windows = plan_windows(total, self.window_frames, self.overlap_frames)
        segments = []
        for index, w in enumerate(windows):
            audio = padded[w.start * hop : (w.start + w.frames) * hop]
            segments.append(_Segment(item, index, w, (audio, self.extractor.item_features(audio))))
        # Transformers' audio_codes_mask: only frames fully covered by real samples (plus the extra one).
        return _Pending(key, windows, (wave.size + 1) // hop), segments

    def _prepare_decode(self, item: int, key: Any, codes: np.ndarray) -> tuple[_Pending, list[_Segment]]:
        windows = plan_windows(codes.size, self.window_frames, self.overlap_frames)
        segments = [_Segment(item, i, w, (codes[w.start : w.start + w.frames],)) for i, w in enumerate(windows)]
        return _Pending(key, windows, codes.size * self.config.hop_length), segments

    def _stitch_codes(self, pending: _Pending) -> np.ndarray:
        parts = [pending.results[i][w.keep_start - w.start : w.keep_end - w.start]
                 for i, w in enumerate(pending.windows)]
        return np.concatenate(parts)[: pending.valid].astype(np.int32)

    def _stitch_audio(self, pending: _Pending) -> np.ndarray:
        """Sum the windows' audio, each weighted by ramps that cross-fade around the cuts (weights sum to 1)."""
        hop, fade = self.config.hop_length, self.settings.crossfade_frames * self.config.hop_length
        out = np.zeros(pending.valid, np.float32)
        last = len(pending.windows) - 1
        for i, w in enumerate(pending.windows):
            span = slice(w.start * hop, (w.start + w.frames) * hop)
            positions = np.arange(span.start, span.stop)
            weight = np.ones(positions.size, np.float32)
            if i > 0:
                weight *= _rise(positions, w.keep_start * hop, fade)
            if i < last:
                weight *= 1 - _rise(positions, w.keep_end * hop, fade)
            out[span] += pending.results[i][: positions.size] * weight
        return out

    # ---------------------------------------------------------------------------------------- streams
    def _stream(self, kind: str, items: Iterable[tuple[Any, np.ndarray]],
                prepare: Callable[[int, Any, np.ndarray], tuple[_Pending, list[_Segment]]],
                stitch: Callable[[_Pending], np.ndarray], threaded: bool) -> Iterator[tuple[Any, np.ndarray]]:
        """Bucket segments of prepared items into fixed-size batches; yield (key, result) as items complete."""
        queues: dict[int, collections.deque[_Segment]] = {b: collections.deque() for b in self.buckets}
        pending: dict[int, _Pending] = {}
        prepared = _prefetch(itertools.starmap(lambda i, kv: (i, *kv), enumerate(items)), prepare,
                             self.settings.workers if threaded else 0, lookahead=2 * self.local_batch)
        exhausted = False
        while True:
            while not exhausted and not any(len(q) >= self.local_batch for q in queues.values()):
                try:
                    item, entry, segments = next(prepared)
                except StopIteration:
                    exhausted = True
                    break
                pending[item] = entry
                for segment in segments:
                    queues[self.bucket_for(segment.window.frames)].append(segment)
            ready = [b for b in self.buckets if len(queues[b]) >= self.local_batch]
            nonempty = [b for b in self.buckets if queues[b]]
            bucket = ready[-1] if ready else (nonempty[-1] if nonempty else -1)
            step = self._agree(bucket)
            if step < 0:
                return
            batch = [queues[bucket].popleft() for _ in range(min(self.local_batch, len(queues[bucket])))] \
                if bucket >= 0 else []
            outputs = self._run(kind, batch, step)
            self.computed_seconds += self.local_batch * step / self.config.frame_rate
            for segment, output in zip(batch, outputs, strict=False):
                entry = pending[segment.item]
                entry.results[segment.index] = output
                if len(entry.results) == len(entry.windows):
                    del pending[segment.item]
                    yield entry.key, stitch(entry)

    def _agree(self, bucket: int) -> int:
        """All processes run the same step: the largest bucket any of them wants (-1: everyone is done)."""
        if not self.multiprocess:
            return bucket
        return int(np.max(multihost.allgather(np.int32(bucket))))

    def encode_stream(self, items: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray]]:
        """(key, mono 16 kHz float32 wave) -> (key, int32 codes), yielded as items complete.

        Features are computed in background threads while the device runs. Memory stays bounded by the
        buckets' queues, so this scales to corpora that do not fit in memory.
        """
        return self._stream("encode", items, self._prepare_encode, self._stitch_codes, threaded=True)

    def decode_stream(self, items: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray]]:
        """(key, 1-D int codes) -> (key, float32 16 kHz audio of len(codes) * hop samples)."""
        return self._stream("decode", items, self._prepare_decode, self._stitch_audio, threaded=False)

    def encode(self, waves: Sequence[np.ndarray], progress: bool = False) -> list[np.ndarray]:
        """Codes of each clip, in input order."""
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


__all__ = ["DATA_AXIS", "Engine", "EngineSettings", "Window", "enable_compilation_cache", "plan_windows",
           "step_functions", "step_inputs"]
