"""Streaming decode: quality and latency over a grid of settings, full-size random weights, one run.

    python benchmarks/streaming.py                           # grid, oracles, 16 concurrent streams
    python benchmarks/streaming.py --grid 25,13,13 25,50,13,0 --oracles --streams 0
    python benchmarks/streaming.py --checkpoint DIR          # another checkpoint, e.g. the tests' tiny one

Settings are written ``C,L,A[,M]``: chunk, left context, lookahead and memory frames (default memory: the
decoder's). Codes: espeak-ng speech (``convert/speech.py``) encoded by the same model. For each setting the
codes are pushed one at a time, as an LM emits them, through :class:`StreamingDecoder`, and the audio is
compared with ``decode_codes`` (the whole utterance in one window):

* quality: SNR (dB) and the mean absolute difference of Kaldi log-mel energies (natural log of power);
* latency: time to first audio (TTFA: the call that returned the first samples, one step once C + A codes
  are in), the median step latency, and the real-time factor (audio seconds per second spent decoding);
* where the difference comes from (``--oracle-grid`` settings): the same stream decoded with oracles that
  give every step's GroupNorms the statistics of the full decode, its attention the full decode's keys and
  values, or both. What is left with both is the local receptive field (convs, ISTFT) at the window edges;
* throughput of ``--streams`` concurrent streams in one :class:`BatchedStreamingDecoder` (joining at
  staggered times, one code per stream per tick, a step every chunk) against one stream at batch 1, and
  their agreement with each stream decoded alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.metrics import snr_db
from convert.speech import speech_clip
from convert.torch_reference import full_size_checkpoint
from xcodec2_jax import Xcodec2FeatureExtractor, Xcodec2Model
from xcodec2_jax.engine import EngineSettings
from xcodec2_jax.nn.decoder import KeyValues
from xcodec2_jax.streaming import (
    DEFAULT_SETTINGS,
    LOW_LATENCY_SETTINGS,
    BatchedStreamingDecoder,
    StreamingDecoder,
    StreamingSettings,
)

DEFAULT_GRID = [  # the defaults, the low-latency setting, one knob at a time, then plain windows (no memory)
    DEFAULT_SETTINGS,
    LOW_LATENCY_SETTINGS,
    *(dataclasses.replace(DEFAULT_SETTINGS, lookahead_frames=a) for a in (0, 13, 38)),
    *(dataclasses.replace(DEFAULT_SETTINGS, left_context_frames=left) for left in (0, 13, 50)),
    *(dataclasses.replace(DEFAULT_SETTINGS, chunk_frames=chunk) for chunk in (25, 100)),
    *(dataclasses.replace(DEFAULT_SETTINGS, memory_frames=memory) for memory in (100, 500, 1500)),
    *(dataclasses.replace(DEFAULT_SETTINGS, left_context_frames=left, memory_frames=0) for left in (25, 150)),
]
ORACLES = ("groupnorm", "attention", "both")


# --------------------------------------------------------------------------------------------- metrics
def log_mel_l1(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean |difference| of Kaldi log-mel energies (80 bins, 25 ms / 10 ms, natural log of power)."""
    extractor = Xcodec2FeatureExtractor()
    mel = lambda wave: extractor._log_mel(extractor._frames(wave[None].astype(np.float32))[0])
    return float(np.mean(np.abs(mel(reference) - mel(estimate))))


# ----------------------------------------------------------------------------------------------- oracles
class _Recorder:
    """Passes a GroupNorm / attention module through, keeping the input it saw (the full decode's)."""

    def __init__(self, module: nnx.Module, inputs: list):
        self.module, self.inputs = module, inputs

    def __call__(self, x, *args):
        self.inputs.append(x)
        return self.module(x, *args)

    def __getattr__(self, name: str):  # GroupNorm.moments
        return getattr(self.module, name)


class _Oracle:
    """Runs the module on [window; full-decode input] with only the full part unmasked, keeps the window rows.

    For GroupNorm the mask selects the frames its statistics come from; for attention it selects the keys
    and values (the stream's memory is ignored then). Either way the window's frames are normalised /
    attend exactly as in the full decode's context, through the module's own code.
    """

    def __init__(self, module: nnx.Module, full: jax.Array):
        self.module, self.full = module, full

    def __call__(self, x, mask, memory=None):
        b, w, _ = x.shape
        full = jnp.broadcast_to(self.full.astype(x.dtype), (b, *self.full.shape[1:]))
        select = jnp.concatenate([jnp.zeros((b, w, 1), bool), jnp.ones((b, full.shape[1], 1), bool)], axis=1)
        result = self.module(jnp.concatenate([x, full], axis=1), select)
        if isinstance(result, tuple):  # attention: (out, its own keys and values (B, heads, frames, head_dim))
            out, own = result
            return out[:, :w], KeyValues(own.keys[:, :, :w], own.values[:, :, :w], own.mask[:, :w])
        return result[:, :w]

    def __getattr__(self, name: str):  # GroupNorm.moments
        return getattr(self.module, name)


def _sites(codec) -> dict[str, list[tuple[object, str]]]:
    """(parent, attribute) of every GroupNorm and every decoder attention."""
    decoder = codec.acoustic_decoder
    blocks = [*decoder.prior_net, *decoder.post_net]
    return {"groupnorm": [(b, name) for b in blocks for name in ("norm1", "norm2")],
            "attention": [(layer, "self_attn") for layer in decoder.layers]}


@functools.partial(jax.jit, static_argnames="graphdef")
def _record(state, codes, graphdef):
    """The full decode's GroupNorm and attention inputs: {kind: [(1, F, C) per site]}."""
    codec = nnx.merge(graphdef, state)
    recorded = {kind: [] for kind in ("groupnorm", "attention")}
    for kind, sites in _sites(codec).items():
        for parent, name in sites:
            setattr(parent, name, _Recorder(getattr(parent, name), recorded[kind]))
    codec.decode(codec.latents_from_codes(codes))
    return recorded


def oracle_stream(model: Xcodec2Model, settings: StreamingSettings, codes: np.ndarray, oracle: str) -> np.ndarray:
    """The streamed audio when the steps' GroupNorms use the full decode's statistics and/or their attention
    the full decode's keys and values (``oracle`` in ``ORACLES``): what is left is the other part's error."""
    recorded = _record(model.state, codes[None].astype(np.int32), model.graphdef)
    kinds = ("groupnorm", "attention") if oracle == "both" else (oracle,)

    def transform(codec) -> None:
        for kind in kinds:
            for (parent, name), full in zip(_sites(codec)[kind], recorded[kind], strict=True):
                setattr(parent, name, _Oracle(getattr(parent, name), full))

    decoder = BatchedStreamingDecoder(model, 1, *dataclasses.astuple(settings), transform=transform)
    slot = decoder.join()
    decoder.push(slot, codes)
    decoder.finish(slot)
    pieces = []
    while decoder.ready():
        pieces += [piece.audio for piece in decoder.step()]
    return np.concatenate(pieces)


# ----------------------------------------------------------------------------------------------- streams
def stream_one(decoder: StreamingDecoder, codes: np.ndarray) -> tuple[np.ndarray, list[float], float]:
    """Push codes one at a time: (audio, latencies of the calls that returned audio, total seconds)."""
    pieces, latencies, total = [], [], 0.0
    for index in range(codes.size + 1):
        begin = time.perf_counter()
        audio = decoder.push(codes[index : index + 1]) if index < codes.size else decoder.flush()
        elapsed = time.perf_counter() - begin
        total += elapsed
        if audio.size:
            pieces.append(audio)
            latencies.append(elapsed)
    return np.concatenate(pieces), latencies, total


def concurrent_streams(model: Xcodec2Model, settings: StreamingSettings, streams: list[np.ndarray],
                       stagger: int) -> tuple[list[np.ndarray], float, int]:
    """Stream ``streams`` through one batched decoder: stream k joins at tick k * stagger, every stream gets
    one code per tick, and the server steps every ``chunk_frames`` ticks (so a step carries most streams).
    Returns (each stream's audio, wall seconds, device steps)."""
    decoder = BatchedStreamingDecoder(model, len(streams), *dataclasses.astuple(settings))
    slots: dict[int, int] = {}  # stream -> slot
    sent = [0] * len(streams)
    audio: list[list[np.ndarray]] = [[] for _ in streams]
    done, steps, tick = 0, 0, 0
    begin = time.perf_counter()
    while done < len(streams):
        for k, codes in enumerate(streams):
            if k not in slots and tick == k * stagger:
                slots[k] = decoder.join()
            if k in slots and sent[k] < codes.size:
                decoder.push(slots[k], codes[sent[k] : sent[k] + 1])
                sent[k] += 1
                if sent[k] == codes.size:
                    decoder.finish(slots[k])
        tick += 1
        if tick % settings.chunk_frames and any(sent[k] < s.size for k, s in enumerate(streams)):
            continue
        by_slot = {slot: k for k, slot in slots.items()}
        while decoder.ready():
            steps += 1
            for piece in decoder.step():
                k = by_slot[piece.slot]
                audio[k].append(piece.audio)
                if piece.last:
                    del slots[k]
                    done += 1
    return [np.concatenate(a) for a in audio], time.perf_counter() - begin, steps


# -------------------------------------------------------------------------------------------------- main
def _settings(text: str) -> StreamingSettings:
    """"C,L,A" or "C,L,A,M" -> settings (M: the default memory)."""
    return StreamingSettings(*(int(v) for v in text.split(",")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12.0, help="length of the speech (default 12 s)")
    parser.add_argument("--grid", nargs="*", type=_settings, default=DEFAULT_GRID, metavar="C,L,A[,M]",
                        help="settings: chunk, left context, lookahead[, memory] (default: the built-in grid)")
    parser.add_argument("--oracles", nargs="*", default=list(ORACLES), choices=ORACLES,
                        help="oracle decodes for the --oracle-grid settings (default: all; none: skip)")
    parser.add_argument("--oracle-grid", nargs="*", type=_settings, metavar="C,L,A[,M]",
                        default=[DEFAULT_SETTINGS, dataclasses.replace(DEFAULT_SETTINGS, memory_frames=0)],
                        help="settings decoded with the oracles (default: the defaults with and without memory; "
                             "the flag alone: none)")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (0: skip)")
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the seeded random full-size one)")
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")

    model = Xcodec2Model.from_pretrained(args.checkpoint or full_size_checkpoint())
    one = EngineSettings(batch_size=1)
    begin = time.perf_counter()
    codes = model.encode_audio(speech_clip(args.seconds, seed=0), settings=one)[0]
    print(f"{args.seconds:g} s of espeak-ng speech -> {codes.size} codes ({time.perf_counter() - begin:.1f} s); "
          f"{len(np.unique(codes))} distinct; devices {jax.devices()}")
    full = model.decode_codes(codes, settings=one)[0]
    seconds = full.size / model.config.sampling_rate
    print("\n| chunk | left | lookahead | memory | window | SNR dB | log-mel L1 | TTFA ms | step ms (median) | RTF | "
          "compile s |")
    print("|" + "---|" * 11)
    rng = np.random.default_rng(0)
    for settings in args.grid:
        begin = time.perf_counter()
        decoder = StreamingDecoder(model, *dataclasses.astuple(settings))
        compile_s = time.perf_counter() - begin
        decoder.push(codes[: settings.output_frames])  # warm-up step
        decoder.reset()
        audio, latencies, total = stream_one(decoder, codes)
        assert audio.size == codes.size * decoder.hop
        if settings == DEFAULT_SETTINGS:  # the same audio from random push sizes (the tests check it too)
            splits = np.cumsum(rng.integers(0, 2 * settings.output_frames, codes.size))
            pieces = [decoder.push(part) for part in np.split(codes, splits[splits < codes.size])]
            assert np.array_equal(np.concatenate([*pieces, decoder.flush()]), audio), "depends on the push sizes"
        print(f"| {' | '.join(str(v) for v in dataclasses.astuple(settings))} | {settings.window_frames} | "
              f"{snr_db(full, audio):.1f} | {log_mel_l1(full, audio):.3f} | {latencies[0] * 1e3:.0f} | "
              f"{np.median(latencies) * 1e3:.0f} | {seconds / total:.2f} | {compile_s:.1f} |", flush=True)

    if args.oracles:
        print(f"\n| chunk | left | lookahead | memory | SNR dB | {' | '.join(f'SNR, oracle {o}' for o in ORACLES)} |")
        print("|" + "---|" * (5 + len(args.oracles)))
        for settings in args.oracle_grid:
            decoder = StreamingDecoder(model, *dataclasses.astuple(settings))
            audio = np.concatenate([decoder.push(codes), decoder.flush()])
            snrs = [snr_db(full, oracle_stream(model, settings, codes, o)) for o in args.oracles]
            print(f"| {' | '.join(str(v) for v in dataclasses.astuple(settings))} | {snr_db(full, audio):.1f} | "
                  f"{' | '.join(f'{v:.1f}' for v in snrs)} |", flush=True)

    if args.streams:
        settings = DEFAULT_SETTINGS
        streams = [np.roll(codes, 37 * k)[: codes.size - 13 * k] for k in range(args.streams)]
        decoder = StreamingDecoder(model)
        alone, _, batch1_s = zip(*(stream_one(decoder, s) for s in streams[:2]), strict=True)
        concurrent_streams(model, settings, streams[:2], stagger=3)  # compiles and warms up
        outputs, wall, steps = concurrent_streams(model, settings, streams, stagger=3)
        audio_s = sum(s.size for s in streams) / model.config.frame_rate
        batch1_rate = sum(s.size for s in streams[:2]) / model.config.frame_rate / sum(batch1_s)
        worst = max(float(np.abs(o - a).max()) for o, a in zip(outputs, alone, strict=False))
        print(f"\n{args.streams} concurrent streams at the defaults: {audio_s:.1f} s of audio in {wall:.1f} s "
              f"({steps} steps): {audio_s / wall:.2f} audio s/s, against {batch1_rate:.2f} audio s/s for one "
              f"stream at batch 1 ({audio_s / wall / batch1_rate:.2f}x); max |batched - alone| {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
