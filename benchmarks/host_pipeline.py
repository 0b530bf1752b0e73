"""The engine's host side alone: every device step replaced by a no-op of the same shapes, measured in ONE run.

    python benchmarks/host_pipeline.py                   # 64 WAV files of 1-20 s at 16 kHz
    python benchmarks/host_pipeline.py --rate 44100      # files at 44.1 kHz: soxr resampling included
    python benchmarks/host_pipeline.py --clips 128 --repeats 5

What runs is the real ``Engine.encode`` on paths (so the real loaders): each file is read (soundfile), mixed
to mono, resampled to 16 kHz (soxr), padded and windowed in the ``workers`` threads (plus the Kaldi fbank
when the features are computed on the host), then batched by length, packed, transferred (``device_put``),
"computed" by a jitted no-op that returns zeros of the real step's output shape, read back and stitched.
The no-op takes a state with the full-size model's pytree structure (one tiny array per parameter), so the
per-call flattening of the weights' pytree is counted too. ``decode`` likewise from code arrays.

Reported per configuration: audio seconds per wall second, the main thread's time per step (pack, transfer,
dispatch, read-back, stitch: what a fast device would wait for) and the padding cost (computed / audio
seconds). Repeats are interleaved so that machine noise hits all configurations alike; the median is shown.
WAV files are read from the page cache after the first repeat, as in a corpus on a fast disk.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from convert.speech import speech_clip
from xcodec2_jax.audio import load_audio
from xcodec2_jax.config import Xcodec2Config
from xcodec2_jax.engine import DATA_AXIS, DeviceModel, Engine, EngineSettings
from xcodec2_jax.nn.codec import Xcodec2Codec


class NoOpDevice(DeviceModel):
    """A :class:`DeviceModel` whose steps return zeros of the real outputs' shapes at once."""

    def step(self, kind: str, batch: int, frames: int):
        key = (kind, batch, frames)
        if key not in self._compiled:
            shape, dtype = ((batch, frames), jnp.int32) if kind.startswith("encode") else \
                ((batch, frames * self.config.hop_length), jnp.float32)
            out = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
            self._compiled[key] = jax.jit(lambda state, *inputs: jnp.zeros(shape, dtype), out_shardings=out)
        return self._compiled[key]


def no_op_device(config: Xcodec2Config) -> NoOpDevice:
    """The full-size codec's graph with one 1-element array per parameter (the pytree the real step takes)."""
    abstract = nnx.eval_shape(lambda: Xcodec2Codec(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda x: jnp.zeros((1,) * len(x.shape), x.dtype), state)
    return NoOpDevice(graphdef, state, config)


class MainThreadClock:
    """Time the engine's main thread spends per step in ``_dispatch`` and ``_collect``."""

    def __init__(self, engine: Engine):
        self.seconds, self.steps = 0.0, 0
        dispatch, collect = engine._dispatch, engine._collect

        def timed_dispatch(*args):
            begin = time.perf_counter()
            try:
                return dispatch(*args)
            finally:
                self.seconds += time.perf_counter() - begin
                self.steps += 1

        def timed_collect(*args):
            items = collect(*args)
            while True:  # a generator: time each resumption, not the consumer's work between them
                begin = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    self.seconds += time.perf_counter() - begin
                    return
                self.seconds += time.perf_counter() - begin
                yield item

        engine._dispatch, engine._collect = timed_dispatch, timed_collect


def write_corpus(directory: Path, clips: int, rate: int, low: float, high: float, seed: int) -> tuple[list, float]:
    lengths = np.random.default_rng(seed).uniform(low, high, clips)
    paths = []
    for i, seconds in enumerate(lengths):
        path = directory / f"clip{i:04d}.wav"
        sf.write(path, speech_clip(float(seconds), sampling_rate=rate, seed=i), rate, subtype="PCM_16")
        paths.append(path)
    return paths, float(lengths.sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=16000, help="sampling rate of the WAV files")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    config = Xcodec2Config()
    device = no_op_device(config)
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; {os.cpu_count()} cpus; "
          f"{args.clips} WAV clips of {args.min_seconds:g}-{args.max_seconds:g} s at {args.rate} Hz, batch "
          f"{args.batch_size}; device step = no-op\n")
    with tempfile.TemporaryDirectory(prefix="xcodec2-host-pipeline-") as tmp:
        paths, total = write_corpus(Path(tmp), args.clips, args.rate, args.min_seconds, args.max_seconds, 0)
        loaders = [functools.partial(load_audio, path, config.sampling_rate) for path in paths]
        configs = [(where, workers) for where in ("device", "host") for workers in args.workers]
        engines = {c: Engine(device, EngineSettings(batch_size=args.batch_size, workers=c[1],
                                                     device_features=c[0] == "device")) for c in configs}
        codes = engines[configs[0]].encode(loaders)  # warm-up: compiles the no-ops, fills the page cache
        decoder = Engine(device, EngineSettings(batch_size=args.batch_size))
        rates: dict = {c: [] for c in [*configs, "decode"]}
        per_step: dict = {c: [] for c in rates}
        for _ in range(args.repeats):
            for c in rates:
                engine = decoder if c == "decode" else engines[c]
                clock = MainThreadClock(engine)
                begin = time.perf_counter()
                engine.decode(codes) if c == "decode" else engine.encode(loaders)
                rates[c].append(total / (time.perf_counter() - begin))
                per_step[c].append(clock.seconds / clock.steps)
                del engine._dispatch, engine._collect
    print("| direction | features | workers | audio s / s | main thread per step (ms) | computed / audio s |")
    print("|---|---|---|---|---|---|")
    for c in rates:
        stats = decoder.stats.decode if c == "decode" else engines[c].stats.encode
        where, workers = ("-", "-") if c == "decode" else c
        print(f"| {'decode' if c == 'decode' else 'encode'} | {where} | {workers} | "
              f"{statistics.median(rates[c]):,.0f} | {1e3 * statistics.median(per_step[c]):.2f} | "
              f"{stats.computed_per_audio_second:.3f} |")
    for where in ("device", "host"):
        if len(args.workers) > 1:
            first, last = (statistics.median(rates[(where, w)]) for w in (args.workers[0], args.workers[-1]))
            print(f"features on the {where}: {args.workers[0]} -> {args.workers[-1]} workers: {last / first:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
