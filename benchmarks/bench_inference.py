"""Throughput of xcodec2-jax against Transformers (eager and torch.compile), measured in ONE run.

    python benchmarks/bench_inference.py                       # CPU, float32, batch {1, 8} x {6 s, 30 s}
    python benchmarks/bench_inference.py --batch-sizes 8 --durations 6 --repeats 3
    python benchmarks/bench_inference.py --device gpu --dtype bfloat16 --batch-sizes 32 --durations 6
    python benchmarks/bench_inference.py --no-torch --checkpoint DIR --batch-sizes 8 --durations 6 \
        --end-to-end 64                                        # + encode_audio / decode_codes on 64 clips

Same seeded random full-size weights (``Xcodec2Config()``, 629M parameters) and the same speech for every
implementation. Encode = features -> codes (features computed beforehand, outside the timing, for both);
decode = codes -> audio. Reported per configuration: audio seconds per wall second, latency per item,
memory (JAX: XLA's buffer assignment for the step, weights excluded; PyTorch on CPU: process RSS above its
level before the call, warm-up call included; on GPU: allocator peaks),
compile time (reported apart), achieved FLOP/s from XLA's cost analysis and its fraction of the device's
peak (``--peak-tflops``, default: a large matmul measured in this run), and the ratios JAX / PyTorch.
Timings are the median of ``--repeats`` runs after one warm-up, implementations interleaved so that
machine noise hits them alike.

``--end-to-end N`` adds rows for the whole engine path: ``encode_audio`` on N clips with lengths drawn
uniformly from ``--end-to-end-seconds`` (default 1-20 s) and ``decode_codes`` on their codes, default engine
settings at the first ``--batch-sizes`` value, against the step alone measured before each of the
``--end-to-end-repeats`` runs and after the last (its mean is the reference; the rows give the median run).
The steps those runs need are compiled beforehand (found by a dry run of the same engine with no-op steps),
so the rows show the steady state; compile time is reported apart. The rows include host work (features,
packing, stitching), padding to buckets and dummy rows; the engine's counters give the padding cost
(computed / audio seconds).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.host_pipeline import no_op_device
from convert.kaldi_reference import reference_feature_extractor
from convert.speech import speech_clip
from convert.torch_reference import (
    TorchXcodec2Config,
    TorchXcodec2Model,
    random_reference_model,
    torch_inputs,
)
from xcodec2_jax import Xcodec2Model
from xcodec2_jax.engine import Engine, EngineSettings


class PeakMemory:
    """Peak process RSS (CPU) or allocator peak (GPU) above the level at entry, in GiB."""

    def __init__(self, gpu: bool):
        self.gpu, self.peak = gpu, 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.gpu:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.base = 0
            return self
        self.base, self.top, self.running = self._rss(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.top = max(self.top, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.gpu:
            stats = jax.devices()[0].memory_stats() or {}
            jax_peak = stats.get("peak_bytes_in_use", 0)
            torch_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
            self.peak = max(jax_peak, torch_peak) / 2**30
            return
        self.running = False
        self.thread.join()
        self.peak = max(self.top - self.base, 0) / 2**30


def measured_peak_tflops(dtype) -> float:
    """A large matmul in JAX: the practical peak of this device for ``dtype``."""
    n = 4096
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(3))
    return 2 * n**3 / best / 1e12


def _timed(fn: Callable[[], object]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


class JaxRunner:
    """Our engine's compiled, padding-exact encode/decode at one (batch, length) shape."""

    def __init__(self, model: Xcodec2Model, batch: int, frames: int):
        seconds = frames / model.config.frame_rate
        settings = EngineSettings(batch_size=batch, bucket_seconds=(seconds,), window_seconds=seconds,
                                  overlap_seconds=seconds / 2, crossfade_seconds=0.0,
                                  full_batch_seconds=None)
        self.engine = model.engine(settings)
        self.frames = frames

    def prepare(self, waves: list[np.ndarray], codes: np.ndarray) -> None:
        """Device-resident inputs: padded waveforms (+ features, when the engine computes them on the host)
        for encode, codes for decode."""
        audio = [wave[: self.frames * self.engine.config.hop_length] for wave in waves]
        extractor = self.engine.extractor
        encode_rows = [(a,) if extractor is None else (a, extractor.item_features(a)) for a in audio]
        self.device_args = {
            "encode": self.engine.device_batch("encode", encode_rows, self.frames),
            "decode": self.engine.device_batch("decode", [(c,) for c in codes], self.frames),
        }

    def compile(self, kind: str) -> tuple[float, float, float]:
        """Compile seconds, XLA's FLOP count of one call, and its working memory in GiB.

        Working memory = XLA's buffer assignment for the step (temporaries + inputs + outputs, weights
        excluded): exact for JAX, unlike process RSS, which stays flat once XLA has reused its buffers.
        """
        step = self.engine.compiled(kind, self.frames)
        cost = step.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = step.memory_analysis()
        weights = sum(x.nbytes for x in jax.tree.leaves(self.engine.device.state))
        working = (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
                   - weights) / 2**30
        key = (self.engine.kinds[kind], self.engine.batch, self.frames)
        return self.engine.device.compile_seconds[key], float(cost.get("flops", 0.0)), working

    def run(self, kind: str) -> object:
        step = self.engine.compiled(kind, self.frames)
        return jax.block_until_ready(step(self.engine.device.state, *self.device_args[kind]))


class TorchRunner:
    def __init__(self, model, features: dict, codes: torch.Tensor, compiled: bool):
        self.model, self.features, self.codes = model, features, codes
        self.encode_fn, self.decode_fn = model.encode, model.decode
        if compiled:
            self.encode_fn, self.decode_fn = torch.compile(model.encode), torch.compile(model.decode)

    def run(self, kind: str) -> object:
        with torch.inference_mode():
            if kind == "encode":
                return self.encode_fn(**self.features)
            return self.decode_fn(audio_codes=self.codes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--durations", type=float, nargs="+", default=[6.0, 30.0])
    parser.add_argument("--directions", nargs="+", choices=("encode", "decode"), default=["encode", "decode"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-torch", action="store_true", help="JAX only (no ratios)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the FLOP/s fraction")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of building random weights")
    parser.add_argument("--end-to-end", type=int, default=0, metavar="N",
                        help="also time encode_audio / decode_codes on N clips (see above)")
    parser.add_argument("--end-to-end-seconds", type=float, nargs=2, default=[1.0, 20.0], metavar=("MIN", "MAX"))
    parser.add_argument("--end-to-end-repeats", type=lambda t: max(1, int(t)), default=1, metavar="R",
                        help="end-to-end runs, each after a timing of the step alone (default: %(default)s)")
    args = parser.parse_args(argv)

    gpu = args.device == "gpu"
    torch_device = torch.device("cuda" if gpu else "cpu")
    jax_dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")

    clip = speech_clip(max(args.durations), seed=args.seed)
    if args.checkpoint is None:
        calibration = torch_inputs(dict(reference_feature_extractor()(clip[: 6 * 16000], sampling_rate=16000)))
        torch_model = random_reference_model(TorchXcodec2Config(), args.seed, calibration)
        with tempfile.TemporaryDirectory(prefix="xcodec2-bench-") as checkpoint:  # 2.5 GB: removed once loaded
            torch_model.save_pretrained(checkpoint)
            model = Xcodec2Model.from_pretrained(checkpoint, dtype=jax_dtype)
    else:
        torch_model = None if args.no_torch else TorchXcodec2Model.from_pretrained(args.checkpoint)
        model = Xcodec2Model.from_pretrained(args.checkpoint, dtype=jax_dtype)
    if torch_model is not None:
        torch_model = torch_model.to(torch_device, torch_dtype).eval()
    peak = args.peak_tflops or measured_peak_tflops(jax_dtype)
    print(f"device peak used for the FLOP/s fraction: {peak:.2f} TFLOP/s"
          f"{'' if args.peak_tflops else ' (measured: 4096^3 matmul in JAX)'}\n")

    rows, step_alone = [], None
    for seconds in args.durations:
        for batch in args.batch_sizes:
            frames = round(seconds * model.config.frame_rate)
            waves = [np.roll(clip, 1601 * i)[: frames * 320].astype(np.float32) for i in range(batch)]
            runners: dict[str, object] = {"jax": JaxRunner(model, batch, frames)}
            if torch_model is None:  # decode timing does not depend on the code values
                runners["jax"].prepare(waves, np.random.default_rng(args.seed).integers(
                    0, model.config.codebook_size, (batch, frames), dtype=np.int32))
            else:
                features = {k: v.to(torch_device) for k, v in dict(reference_feature_extractor()(
                    waves, sampling_rate=16000, return_tensors="pt")).items()}
                features["input_features"] = features["input_features"].to(torch_dtype)
                features["input_values"] = features["input_values"].to(torch_dtype)
                with torch.inference_mode():
                    codes = torch_model.encode(**features).audio_codes
                runners["jax"].prepare(waves, codes.cpu().numpy()[:, 0, :frames].astype(np.int32))
            step_alone = step_alone or runners["jax"]
            if not args.no_torch:
                runners["torch eager"] = TorchRunner(torch_model, features, codes, compiled=False)
                if not args.no_torch_compile:
                    runners["torch.compile"] = TorchRunner(torch_model, features, codes, compiled=True)
            for kind in args.directions:
                compile_s, flops, jax_memory = runners["jax"].compile(kind)
                warm, memory = {}, {}
                for name, runner in list(runners.items()):
                    try:
                        with PeakMemory(gpu) as mem:  # the first call allocates: count it
                            warm[name] = _timed(lambda r=runner, k=kind: r.run(k))  # incl. torch.compile's compile
                        memory[name] = mem.peak
                    except Exception as err:  # torch.compile may fail on this model/platform
                        print(f"  {name} {kind} failed: {type(err).__name__}: {str(err)[:200]}")
                        runners.pop(name)
                memory["jax"] = jax_memory if not gpu else memory["jax"]
                times: dict[str, list[float]] = {name: [] for name in runners}
                for _ in range(args.repeats):
                    for name, runner in runners.items():
                        with PeakMemory(gpu) as mem:
                            times[name].append(_timed(lambda r=runner, k=kind: r.run(k)))
                        memory[name] = max(memory[name], mem.peak)
                audio_seconds = batch * frames / model.config.frame_rate
                for name in runners:
                    wall = statistics.median(times[name])
                    rows.append({
                        "direction": kind, "batch": batch, "seconds": seconds, "impl": name, "wall_s": wall,
                        "audio_s_per_s": audio_seconds / wall, "latency_per_item_s": wall / batch,
                        "peak_mem_gib": memory[name],
                        "compile_s": compile_s if name == "jax" else max(warm[name] - wall, 0.0),
                        "tflops": flops / wall / 1e12 if name == "jax" else None,
                    })
                    row = rows[-1]
                    extra = f", {row['tflops']:.2f} TFLOP/s ({row['tflops'] / peak:.0%} of peak)" \
                        if name == "jax" and flops else ""
                    print(f"{kind} b={batch} {seconds:g}s {name:14s}: {row['audio_s_per_s']:7.2f} audio-s/s, "
                          f"{row['latency_per_item_s']:.3f} s/item, peak +{row['peak_mem_gib']:.2f} GiB, "
                          f"compile {row['compile_s']:.1f} s{extra}", flush=True)

    print("\n| direction | batch x length | impl | audio s / s | s / item | peak mem (GiB) | compile (s) "
          "| TFLOP/s (% peak) | JAX / impl |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        jax_row = next(r for r in rows if r["impl"] == "jax" and all(
            r[k] == row[k] for k in ("direction", "batch", "seconds")))
        ratio = jax_row["audio_s_per_s"] / row["audio_s_per_s"]
        flops = f"{row['tflops']:.2f} ({row['tflops'] / peak:.0%})" if row["tflops"] else "-"
        print(f"| {row['direction']} | {row['batch']} x {row['seconds']:g} s | {row['impl']} | "
              f"{row['audio_s_per_s']:.2f} | {row['latency_per_item_s']:.3f} | {row['peak_mem_gib']:.2f} | "
              f"{row['compile_s']:.1f} | {flops} | {'-' if row['impl'] == 'jax' else f'{ratio:.2f}x'} |")
    end_to_end = run_end_to_end(model, step_alone, args) if args.end_to_end else []
    if args.json:
        args.json.write_text(json.dumps({"peak_tflops": peak, "dtype": args.dtype, "rows": rows,
                                         "end_to_end": end_to_end}, indent=2))
    return 0


def run_end_to_end(model: Xcodec2Model, step: JaxRunner, args: argparse.Namespace) -> list[dict]:
    """encode_audio / decode_codes on clips of random lengths against ``step`` alone, timed before and after."""
    low, high = args.end_to_end_seconds
    lengths = np.random.default_rng(args.seed).uniform(low, high, args.end_to_end)
    clips = [speech_clip(float(s), seed=i) for i, s in enumerate(lengths)]
    settings = EngineSettings(batch_size=step.engine.batch)
    engine = model.engine(settings)
    # The steps these runs use, found by the same engine with no-op steps, compiled before the clock starts.
    dry = Engine(no_op_device(model.config), dataclasses.replace(settings, device_features=engine.device_features))
    calls, no_op_step = collections.Counter(), dry.device.step
    dry.device.step = lambda *key: calls.update([key]) or no_op_step(*key)
    dry.decode(dry.encode(clips))
    begin = time.perf_counter()
    for kind, batch, frames in dry.device._compiled:
        engine.device.step(kind, batch, frames)
    compile_s = time.perf_counter() - begin
    print(f"\nend to end: {len(clips)} clips of {low:g}-{high:g} s ({lengths.sum():.0f} s of audio), "
          f"{len(dry.device._compiled)} steps compiled beforehand in {compile_s:.0f} s", flush=True)

    step_rates = {kind: [] for kind in ("encode", "decode")}

    def time_step_alone() -> None:
        for kind in step_rates:
            for _ in range(args.repeats):
                step_rates[kind].append(step.engine.batch * step.frames / model.config.frame_rate
                                        / _timed(lambda k=kind: step.run(k)))

    walls = {kind: [] for kind in step_rates}
    for _ in range(args.end_to_end_repeats):
        time_step_alone()
        begin = time.perf_counter()
        codes = model.encode_audio(clips, settings=settings)
        walls["encode"].append(time.perf_counter() - begin)
        begin = time.perf_counter()
        model.decode_codes(codes, settings=settings)
        walls["decode"].append(time.perf_counter() - begin)
    time_step_alone()
    back_to_back = time_same_steps(engine, calls)

    rows = []
    print(f"\n| direction | path | audio s / s | vs the step alone ({step.engine.batch} x "
          f"{step.frames / model.config.frame_rate:g} s, no padding) | computed / audio s |")
    print("|---|---|---|---|---|")
    runs = args.end_to_end_repeats
    for kind, counters in (("encode", engine.stats.encode), ("decode", engine.stats.decode)):
        alone, wall = statistics.mean(step_rates[kind]), statistics.median(walls[kind])
        audio_seconds, steps = counters.audio_seconds / runs, counters.steps // runs  # the counters add up the runs
        rows.append({"direction": kind, "step_alone_audio_s_per_s": alone, "audio_s_per_s": audio_seconds / wall,
                     "wall_s": wall, "walls_s": walls[kind], "audio_seconds": audio_seconds,
                     "computed_seconds": counters.computed_seconds / runs})
        print(f"| {kind} | step alone (mean of {len(step_rates[kind])}: {min(step_rates[kind]):.2f}-"
              f"{max(step_rates[kind]):.2f}) | {alone:.2f} | 1 | 1 |")
        rows[-1]["same_steps_back_to_back_s"] = back_to_back[kind]
        print(f"| {kind} | the run's {steps} steps back to back, inputs ready ({back_to_back[kind]:.1f} s) | "
              f"{audio_seconds / back_to_back[kind]:.2f} | {audio_seconds / back_to_back[kind] / alone:.0%} | "
              f"{counters.computed_per_audio_second:.3f} |")
        print(f"| {kind} | {'encode_audio' if kind == 'encode' else 'decode_codes'} (median of "
              f"{', '.join(f'{w:.1f}' for w in walls[kind])} s) | "
              f"{audio_seconds / wall:.2f} | **{audio_seconds / wall / alone:.0%}** "
              f"({back_to_back[kind] / wall:.0%} of the same steps back to back) | "
              f"{counters.computed_per_audio_second:.3f} |")
    return rows


def time_same_steps(engine: Engine, calls: collections.Counter) -> dict[str, float]:
    """Seconds the compiled steps of ``calls`` ((kind, batch, frames) -> count) take run back to back on inputs
    already on the device (full-length speech-like rows), per direction: the end-to-end run's step time
    without its host work, so ``this / wall`` is the share of the wall time the steps account for."""
    rng, hop, seconds = np.random.default_rng(0), engine.config.hop_length, collections.Counter()
    for (kind, batch, frames), count in calls.items():
        direction = "decode" if kind == "decode" else "encode"
        if direction == "encode":
            wave = (0.1 * rng.standard_normal(frames * hop)).astype(np.float32)
            rows = [(wave,) if engine.extractor is None else (wave, engine.extractor.item_features(wave))] * batch
        else:
            rows = [(rng.integers(0, engine.config.codebook_size, frames).astype(np.int32),)] * batch
        inputs = engine.device_batch(direction, rows, frames)
        run = functools.partial(engine.device.step(kind, batch, frames), engine.device.state, *inputs)
        for _ in range(count):
            seconds[direction] += _timed(lambda run=run: jax.block_until_ready(run()))
    return seconds


if __name__ == "__main__":
    raise SystemExit(main())
