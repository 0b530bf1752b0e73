"""Streaming decode: audio while codes are still arriving, in fixed-shape jitted chunk steps.

How it works
------------
* **Chunks with context and lookahead.** Frames are turned into audio ``chunk_frames`` (C) at a time. The step
  that emits frames ``[e, e + C)`` decodes the window ``codes[max(0, e - L) : e + C + A]``: up to L
  (``left_context_frames``) frames before the chunk and A (``lookahead_frames``) after it. The window is
  left-aligned in a buffer of ``L + C + A`` frames with its valid length, and the decoder's frame mask makes
  the unused tail exact padding, so every step has ONE shape: it is compiled once per settings, whatever
  the push sizes. At the start of a stream the window simply holds fewer context frames (exactly what the
  full decode sees there: zeros before frame 0); at ``flush`` the last window holds the true end of the
  sequence, so the last frames are decoded as the full decode decodes them.
* **Final audio only.** A chunk is decoded once its A lookahead frames have arrived and never again, so
  everything returned is final. Windows are placed by the number of frames emitted so far, not by how the
  codes were pushed: the streamed audio is the same for any split of the codes into pushes, and its length
  is exactly ``len(codes) * hop``.
* **Receptive field, and a memory for the rest.** The Vocos decoder mixes neighbouring frames locally
  through the k=7 embed conv (+-3 frames), four ResNet blocks of two k=3 convs (+-4 before and +-4 after the
  transformer) and the ISTFT (n_fft = 4 hops, "same" padding: the samples of frame j come from frames
  j-2 .. j+2): +-13 frames in all, so any L, A >= 13 decode that local part exactly. Two parts see the
  whole sequence: the GroupNorm statistics of the four ResNet blocks, and the bidirectional attention, whose
  RoPE runs over heads, so its scores carry no position at all: each frame pools the sequence by content
  alone. Neither depends on where the other frames are, so each stream keeps a **memory** of its last M
  (``memory_frames``, rounded up to whole chunks) emitted frames: their attention keys and values in every
  layer and the moments of every GroupNorm input, as computed in their own windows. Every step attends to
  and pools statistics over the memory frames before its window plus the window itself. What remains
  approximate is the future beyond the lookahead (and frames older than M) for those two window-wide parts.
  ``benchmarks/streaming.py`` measures each part's share; the numbers are in ``benchmarks/RESULTS.md``.
* **Why the defaults (C, L, A, M) = (50, 25, 25, 250).** Almost all of the streamed audio's difference from
  the full decode is attention's (oracles in RESULTS), and attention has no position: what decides its output
  is which frames it sees, not how near they are. The frame at offset p (0 .. C - 1) of its chunk sees
  ``C - 1 - p + A`` future frames, ``(C - 1) / 2 + A`` on average, so the chunk is the lever: (50, 25, 25)
  lets a frame see 49.5 future frames on average (~1 s) against 25 at (25, 13, 13), for the same 2x decode
  work per emitted frame. L = A = 25 is the +-13 local field with room to spare (the upsampler's +-14 too).
  The price is latency: the first audio needs C + A = 75 codes (1.5 s of speech) plus one step;
  :data:`LOW_LATENCY_SETTINGS` (25, 13, 13, 250) starts after 38 codes, further from the full decode
  (RESULTS has the grid).
* **The upsampler (Anime-XCodec2 44.1 kHz family).** The hop is read from the step's output shape, so
  streaming works unchanged, but the upsampler's own ResNet blocks are not in the memory: their GroupNorm
  statistics see only the window, one more approximation that the benchmark (16 kHz family) does not
  measure. It also widens the local receptive field: with one stage of factor 3 and kernel 9 (the tests'
  configuration) its transposed conv, its block's two k=3 convs and the ISTFT's +-2 frames at the upsampled
  rate reach +-3 frames beyond the backbone's +-11: +-14 in all, within the default L = A = 25.
* **Many streams.** :class:`BatchedStreamingDecoder` steps up to ``slots`` streams in one device call,
  sharded over a mesh of devices like the engine's (axis ``DATA_AXIS``): each stream is one batch row with
  its own valid length, so rows do not influence each other, and free or waiting slots are dummy rows whose
  output is discarded. :class:`StreamingDecoder` is the one-stream face of the same machinery.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .codes import check_codes
from .engine import DATA_AXIS
from .errors import ConfigError
from .nn.codec import Xcodec2Codec
from .nn.decoder import FrameMemory
from .nn.layers import Array, weights_in_compute_dtype

if TYPE_CHECKING:
    from .model import Xcodec2Model


@dataclasses.dataclass(frozen=True)
class StreamingSettings:
    """Frames per step (C), left context (L), lookahead (A) and memory (M).

    Each step decodes a window of ``L + C + A`` frames whose attention and GroupNorm statistics also see up
    to M earlier frames of the stream (0: none). Latency before the first audio: ``C + A`` codes must have
    arrived, plus one step. Why these defaults: the module docstring and ``benchmarks/RESULTS.md``.
    """

    chunk_frames: int = 50  # 1 s at 50 codes/s; a step decodes (25 + 50 + 25) / 50 = 2x the frames it emits
    left_context_frames: int = 25  # the +-13 local receptive field with room, see the module docstring
    lookahead_frames: int = 25
    memory_frames: int = 250  # 5 s (rounded up to whole chunks); why: benchmarks/RESULTS.md

    def __post_init__(self) -> None:
        if self.chunk_frames < 1:
            raise ConfigError(f"chunk_frames={self.chunk_frames} must be >= 1")
        for name in ("left_context_frames", "lookahead_frames", "memory_frames"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")

    @property
    def memory_capacity(self) -> int:
        """Frames the memory holds: ``memory_frames`` rounded up to whole chunks (it keeps chunks)."""
        return -(-self.memory_frames // self.chunk_frames) * self.chunk_frames

    @property
    def window_frames(self) -> int:
        return self.left_context_frames + self.chunk_frames + self.lookahead_frames

    @property
    def output_frames(self) -> int:
        """Frames of audio one step hands back per stream: a chunk, or at the end up to C + A frames."""
        return self.chunk_frames + self.lookahead_frames


DEFAULT_SETTINGS = StreamingSettings()
# First audio after 38 codes instead of 75, further from the full decode (8.4 instead of 10.1 dB on the
# full-size random model; benchmarks/RESULTS.md): StreamingDecoder(model, *LOW_LATENCY_SETTINGS).
LOW_LATENCY_SETTINGS = StreamingSettings(25, 13, 13, 250)


# ------------------------------------------------------------------------------------------ device step
class Memory(NamedTuple):
    """Per stream (batch row), what the decoder keeps of up to M earlier frames, in a ring buffer: the
    fields of :class:`~xcodec2_jax.nn.decoder.FrameMemory` with M frames each (keys and values (B, heads, M,
    head_dim), moments (B, M, groups, 3)), and frames (B, M) int32,
    the stream's frame index held in each entry (-1: none). Order does not matter to attention or
    GroupNorm statistics, so a ring buffer serves."""

    keys: list[Array]
    values: list[Array]
    moments: list[Array]
    frames: Array


def decode_windows(codec: Xcodec2Codec, settings: StreamingSettings, memory: Memory | None, codes: Array,
                   lengths: Array, starts: Array, emitted: Array, counts: Array) -> tuple[Array, Memory | None]:
    """One step for B streams: decode each row's window, keep the audio of the frames it emits, and
    remember what the decoder needs of them.

    Args:
        memory: the streams' memory (None when ``settings.memory_frames`` is 0).
        codes: (B, W) int32 windows, of which the first ``lengths`` (B,) frames are valid.
        starts: (B,) int32, where in the window the first frame to emit is.
        emitted: (B,) int32, that frame's index in its stream (0: a new stream; its memory is cleared).
        counts: (B,) int32, frames the step emits per row (0: a dummy row that must not touch memory).

    Returns:
        audio (B, (C + A) * hop) float32 of frames ``starts ..`` of each window (the caller keeps ``counts``
        of them), and the updated memory.
    """
    frame_memory = None
    if memory is not None:
        frames = jnp.where((emitted == 0)[:, None], -1, memory.frames)
        # Frames before the window only: the window's own context frames are decoded again in it.
        visible = (frames >= 0) & (frames < (emitted - starts)[:, None])
        frame_memory = FrameMemory(memory.keys, memory.values, memory.moments, visible)
    audio, own = codec.acoustic_decoder.decode_with_memory(codec.latents_from_codes(codes), lengths, frame_memory)
    hop = audio.shape[-1] // codes.shape[-1]
    audio = _rows(audio, starts * hop, settings.output_frames * hop)
    if memory is None:
        return audio, None
    # The ring buffer holds M / C chunks; the chunk of frames [e, e + C) goes to slot (e / C) mod (M / C), one
    # contiguous update per row. Rows emitting fewer than C (the end) mark the rest invalid; rows
    # emitting nothing (dummies) write back what the slot held.
    chunk = settings.chunk_frames
    slot = (emitted // chunk) % (settings.memory_capacity // chunk) * chunk
    offsets = jnp.arange(chunk)[None, :]
    held = _rows(frames, slot, chunk)
    new_frames = jnp.where(offsets < counts[:, None], emitted[:, None] + offsets,
                           jnp.where((counts == 0)[:, None], held, -1))

    def remember(buffers: list[Array], new: list[Array], axis: int) -> list[Array]:
        written = []
        for buffer, rows in zip(buffers, new, strict=True):
            rows = jnp.where(_expand(counts > 0, rows.ndim), _rows(rows, starts, chunk, axis),
                             _rows(buffer, slot, chunk, axis))
            written.append(_write_rows(buffer, rows, slot, axis))
        return written

    return audio, Memory(remember(memory.keys, own.keys, 2), remember(memory.values, own.values, 2),
                         remember(memory.moments, own.moments, 1), _write_rows(frames, new_frames, slot, 1))


def _expand(flags: Array, ndim: int) -> Array:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dimensions."""
    return flags.reshape(-1, *[1] * (ndim - 1))


def _rows(array: Array, starts: Array, size: int, axis: int = 1) -> Array:
    """``array[b, ..., starts[b] : starts[b] + size, ...]`` (along ``axis``) for every row b."""
    return jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, size, axis - 1))(array, starts)


def _write_rows(buffer: Array, rows: Array, starts: Array, axis: int) -> Array:
    """``buffer`` with ``rows[b]`` written at ``starts[b]`` along ``axis``: one dynamic-update-slice per row
    (a vmapped one would be a scatter)."""
    for b in range(buffer.shape[0]):
        index = [b] + [0] * (buffer.ndim - 1)
        index[axis] = starts[b]
        buffer = jax.lax.dynamic_update_slice(buffer, rows[b : b + 1], index)
    return buffer


def _step(graphdef: nnx.GraphDef, settings: StreamingSettings, transform: Callable | None, state: nnx.State,
          memory: Memory | None, *arrays: Array) -> tuple[Array, Memory | None]:
    codec = nnx.merge(graphdef, state)
    if transform is not None:
        transform(codec)
    return decode_windows(codec, settings, memory, *arrays)


def _frame_memory(graphdef: nnx.GraphDef, state: nnx.State, codes: Array) -> FrameMemory:
    codec = nnx.merge(graphdef, state)
    return codec.acoustic_decoder.decode_with_memory(codec.latents_from_codes(codes))[1]


@dataclasses.dataclass
class _Executable:
    """A compiled step and what its inputs look like."""

    step: Any
    hop: int  # output samples per frame
    memory: Memory | None  # abstract (ShapeDtypeStruct) memory, for allocating it


# Compiled steps per model, then per (settings, slots, devices, transform): a decoder made again with the same
# settings reuses the executable, and it goes away with the model.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_step(model: Xcodec2Model, state: nnx.State, settings: StreamingSettings, mesh: Mesh, slots: int,
                   transform: Callable | None) -> _Executable:
    """The AOT-compiled step (state, memory, codes, lengths, starts, emitted, counts) -> (audio, memory), for
    ``state`` (the decoder's placed weights) on ``mesh``."""
    key = (settings, slots, tuple(d.id for d in mesh.devices.flat), transform)
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        replicated, batched = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(DATA_AXIS))
        rows = lambda *shape, dtype=np.int32: jax.ShapeDtypeStruct((slots, *shape), dtype, sharding=batched)
        memory = None
        if settings.memory_frames:  # the shapes of what the decoder returns per frame, M frames of each
            per_frame = jax.eval_shape(functools.partial(_frame_memory, model.graphdef), state, rows(1))
            m = settings.memory_capacity
            heads = lambda arrays: [rows(a.shape[1], m, *a.shape[3:], dtype=a.dtype) for a in arrays]  # (B, H, M, D)
            frames = lambda arrays: [rows(m, *a.shape[2:], dtype=a.dtype) for a in arrays]
            memory = Memory(heads(per_frame.keys), heads(per_frame.values), frames(per_frame.moments), rows(m))
        step = jax.jit(functools.partial(_step, model.graphdef, settings, transform),
                       in_shardings=(replicated, batched, *[batched] * 5), out_shardings=batched,
                       donate_argnums=1)
        lowered = step.lower(state, memory, rows(settings.window_frames), rows(), rows(), rows(), rows())
        audio = lowered.out_info[0]
        per_model[key] = _Executable(lowered.compile(), audio.shape[-1] // settings.output_frames, memory)
    return per_model[key]


def num_compilations(model: Xcodec2Model) -> int:
    """How many streaming steps have been compiled for ``model`` (one per settings, slots and devices)."""
    return len(_COMPILED.get(model, {}))


# ------------------------------------------------------------------------------------------- streams
@dataclasses.dataclass
class StreamState:
    """One stream's host bookkeeping: ``codes`` holds frames ``[offset, total)``, ``emitted`` are decoded.

    ``window()`` says what the next step decodes and ``advance()`` records it; the decoders below drive it.
    """

    codes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    offset: int = 0
    emitted: int = 0
    finished: bool = False

    @property
    def total(self) -> int:
        return self.offset + self.codes.size

    def ready(self, settings: StreamingSettings) -> bool:
        """A chunk with its full lookahead is there, or the stream has ended (its last piece is due)."""
        return self.finished or self.total - self.emitted >= settings.output_frames

    def window(self, settings: StreamingSettings) -> tuple[np.ndarray, int, int]:
        """(window codes (<= L + C + A,), index of the first emitted frame in it, frames to emit)."""
        start = max(0, self.emitted - settings.left_context_frames)
        end = min(self.total, self.emitted + settings.output_frames)
        left = self.total - self.emitted
        count = settings.chunk_frames if left >= settings.output_frames else left  # the end: all of it
        return self.codes[start - self.offset : end - self.offset], self.emitted - start, count

    def advance(self, frames: int, settings: StreamingSettings) -> None:
        """Mark ``frames`` more as emitted and drop codes no later window needs."""
        self.emitted += frames
        keep_from = max(self.offset, self.emitted - settings.left_context_frames)
        self.codes, self.offset = self.codes[keep_from - self.offset :], keep_from


@dataclasses.dataclass(frozen=True)
class Piece:
    """Audio a step produced for one stream: ``audio`` float32 (frames * hop,), final; ``last`` when the
    stream has ended with it (its slot is free again)."""

    slot: int
    audio: np.ndarray
    last: bool


class BatchedStreamingDecoder:
    """Up to ``slots`` independent streams decoded together, one device call per :meth:`step`.

    A server loop::

        decoder = BatchedStreamingDecoder(model, slots=16)
        slot = decoder.join()                 # a new stream (a user) takes a free slot
        decoder.push(slot, new_codes)         # codes as the LM emits them, for any slot, any count
        decoder.finish(slot)                  # no more codes for this stream
        for piece in decoder.step():          # advances every ready stream by one chunk
            send(piece.slot, piece.audio)     # piece.last: the stream is complete, its slot free again

    Each stream's audio equals decoding it alone with :class:`StreamingDecoder` (same settings): rows carry
    their own valid lengths and the decoder is padding-exact per row. ``slots`` is rounded up to a multiple
    of the number of devices; parameters are replicated and the slots split over ``devices`` along
    ``xcodec2_jax.engine.DATA_AXIS``. By default (this process's devices) the decoder uses the weights the
    model's engines hold there (:meth:`Xcodec2Model.device_model`): no second copy; other ``devices`` get
    their own.
    """

    def __init__(self, model: Xcodec2Model, slots: int = 8, chunk_frames: int = DEFAULT_SETTINGS.chunk_frames,
                 left_context_frames: int = DEFAULT_SETTINGS.left_context_frames,
                 lookahead_frames: int = DEFAULT_SETTINGS.lookahead_frames,
                 memory_frames: int = DEFAULT_SETTINGS.memory_frames, devices: Sequence[jax.Device] | None = None,
                 transform: Callable[[Xcodec2Codec], None] | None = None):
        """``transform``: called on the codec inside the traced step, before decoding (instrumentation, e.g.
        the oracles of ``benchmarks/streaming.py``); a decoder with one compiles its own step."""
        if slots < 1:
            raise ConfigError(f"slots={slots} must be >= 1")
        self.settings = StreamingSettings(chunk_frames, left_context_frames, lookahead_frames, memory_frames)
        if devices is None:  # the weights the model's engines already hold on this process's devices
            shared = model.device_model()
            self.mesh, self.state = shared.mesh, shared.state
        else:
            self.mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
            self.state = jax.device_put(weights_in_compute_dtype(model.graphdef, model.state),
                                        NamedSharding(self.mesh, PartitionSpec()))
        self.slots = math.ceil(slots / self.mesh.size) * self.mesh.size
        self._model = model
        self._batched = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        executable = _compiled_step(model, self.state, self.settings, self.mesh, self.slots, transform)
        self._step, self.hop = executable.step, executable.hop
        # A stream's first step clears its rows, so the memory starts as anything of the right shape.
        self._memory = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                                    executable.memory)
        self._streams: dict[int, StreamState] = {}

    # ------------------------------------------------------------------------------------- streams
    @property
    def active(self) -> list[int]:
        """Slots holding a stream."""
        return sorted(self._streams)

    def join(self) -> int:
        """Start a stream in a free slot; returns the slot. Raises ``RuntimeError`` when all are taken."""
        free = next((s for s in range(self.slots) if s not in self._streams), None)
        if free is None:
            raise RuntimeError(f"all {self.slots} slots hold a stream; finish or leave one first")
        self._streams[free] = StreamState()
        return free

    def push(self, slot: int, codes) -> None:
        """Append codes (1-D ints in [0, codebook_size)) to the stream in ``slot``."""
        stream = self._stream(slot)
        if stream.finished:
            raise RuntimeError(f"slot {slot}: the stream was finished; join() a new one")
        codes = check_codes(codes, f"slot {slot} codes", self._model.config.codebook_size)
        stream.codes = np.concatenate([stream.codes, codes])

    def finish(self, slot: int) -> None:
        """No more codes for ``slot``: its remaining audio comes out of the next steps, the last piece
        marked ``last``, then the slot is free."""
        self._stream(slot).finished = True

    def leave(self, slot: int) -> None:
        """Drop the stream in ``slot`` at once (its pending audio is discarded) and free the slot."""
        self._stream(slot)
        del self._streams[slot]

    def ready(self) -> bool:
        """Whether :meth:`step` has work: some stream has a chunk (with its lookahead) or its end due."""
        return any(s.ready(self.settings) for s in self._streams.values())

    def _stream(self, slot: int) -> StreamState:
        if slot not in self._streams:
            raise KeyError(f"slot {slot} holds no stream (active: {self.active})")
        return self._streams[slot]

    # ---------------------------------------------------------------------------------------- step
    def step(self) -> list[Piece]:
        """Advance every ready stream by one chunk in ONE device call (none when no stream is ready).

        A stream that has ended gets all its remaining frames (at most C + A) in its last piece.
        """
        window, settings = self.settings.window_frames, self.settings
        codes = np.zeros((self.slots, window), np.int32)
        # Free or waiting slots: full-length dummy rows that emit nothing and leave their memory alone.
        lengths = np.full((self.slots,), window, np.int32)
        starts, emitted, counts = (np.zeros((self.slots,), np.int32) for _ in range(3))
        emitted[:] = -1
        due = {slot: s for slot, s in self._streams.items() if s.ready(settings)}
        for slot, stream in due.items():
            row, start, count = stream.window(settings)
            if count:  # an ended stream with nothing left needs no row
                codes[slot, : row.size], lengths[slot], starts[slot] = row, row.size, start
                emitted[slot], counts[slot] = stream.emitted, count
        audio = None
        if counts.any():
            arrays = [jax.device_put(a, self._batched) for a in (codes, lengths, starts, emitted, counts)]
            audio, self._memory = self._step(self.state, self._memory, *arrays)
            audio = np.asarray(audio)
        pieces = []
        for slot, stream in due.items():
            count = int(counts[slot])
            stream.advance(count, settings)
            last = stream.finished and stream.emitted == stream.total
            out = audio[slot, : count * self.hop] if count else np.zeros(0, np.float32)
            pieces.append(Piece(slot, out, last))
            if last:
                del self._streams[slot]
        return pieces


class StreamingDecoder:
    """Decode one stream of codes to audio while the codes are still arriving.

    ``push(codes)`` returns the audio that is final now (possibly empty), ``flush()`` the rest, after which
    the decoder is ready for a new stream; ``reset()`` drops the current stream. Everything returned for a
    stream, concatenated, has exactly ``len(codes) * hop`` samples (float32, the model's output rate) and
    does not depend on how the codes were split into pushes. Each device step is one jitted call of fixed
    shape, compiled once per model and settings (at construction).
    """

    def __init__(self, model: Xcodec2Model, chunk_frames: int = DEFAULT_SETTINGS.chunk_frames,
                 left_context_frames: int = DEFAULT_SETTINGS.left_context_frames,
                 lookahead_frames: int = DEFAULT_SETTINGS.lookahead_frames,
                 memory_frames: int = DEFAULT_SETTINGS.memory_frames, device: jax.Device | None = None):
        self._batch = BatchedStreamingDecoder(model, 1, chunk_frames, left_context_frames, lookahead_frames,
                                              memory_frames, devices=[device or jax.local_devices()[0]])
        self.settings, self.hop = self._batch.settings, self._batch.hop
        self._slot = self._batch.join()

    def push(self, codes) -> np.ndarray:
        """Append codes (1-D ints); returns the audio now final: float32 (k * hop,), k a multiple of the chunk."""
        self._batch.push(self._slot, codes)
        return self._drain()

    def flush(self) -> np.ndarray:
        """End the stream: the remaining audio (float32); the decoder then starts a new stream."""
        self._batch.finish(self._slot)
        audio = self._drain()
        self._slot = self._batch.join()
        return audio

    def reset(self) -> None:
        """Drop the current stream (its undecoded codes) and start a new one."""
        self._batch.leave(self._slot)
        self._slot = self._batch.join()

    def _drain(self) -> np.ndarray:
        pieces = [np.zeros(0, np.float32)]
        while self._batch.ready():
            pieces += [piece.audio for piece in self._batch.step()]
        return np.concatenate(pieces)


__all__ = ["DEFAULT_SETTINGS", "LOW_LATENCY_SETTINGS", "BatchedStreamingDecoder", "Memory", "Piece", "StreamState",
           "StreamingDecoder", "StreamingSettings", "decode_windows", "num_compilations"]
