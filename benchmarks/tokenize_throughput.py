"""Corpus tokenization end to end against the encode step alone, at the same batch, in one run.

    python benchmarks/tokenize_throughput.py                      # 200 clips of 1-20 s, full-size random weights
    python benchmarks/tokenize_throughput.py --half-size          # the encode path halved (RESULTS.md)
    python benchmarks/tokenize_throughput.py --clips 24 --model <tiny checkpoint dir>      # a quick check

1. Builds one WebDataset shard: ``--clips`` espeak-ng speech clips of uniformly random length in
   [``--min-seconds``, ``--max-seconds``] (seeded), alternately FLAC and MP3 at 16 / 22.05 / 44.1 kHz, each
   with a JSON transcript.
2. Loads the model and compiles the encode step of every bucket the corpus needs (timed apart: compilation is
   paid once per bucket and cached across runs, whatever the corpus size).
3. End to end: ``tokenize_corpus(shard, --keep-columns text)`` with the loaded model: reading the tar,
   decoding MP3/FLAC, resampling, features, bucketing, the device steps, writing Parquet. Wall time of the
   call, in x real time (seconds of audio per second).
4. The ceiling (measured first): the same compiled step, same batch, timed on full batches of real speech at each bucket
   (``--repeats`` times, median), giving each bucket's rate in audio seconds per second; the corpus's audio
   at those rates (every clip at the rate of its bucket, no padding, no filler items, no host work) takes
   ``sum(audio in bucket / rate of bucket)`` seconds. The ratio is end to end / ceiling.
5. Reports the padding waste that the run's manifest records (computed / audio seconds), and splits the gap:
   the steps the run executed (counted per bucket) at the measured step times give the device time of the
   run; ceiling / device time is what padding and filler items cost, device time / end to end what the host
   side (reading, decoding, features, waiting) cost.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from convert.speech import speech_clip
from convert.torch_reference import full_size_checkpoint, half_size_checkpoint
from convert.webdataset import audio_bytes, write_shard
from xcodec2_jax import Xcodec2Model
from xcodec2_jax.engine import Engine, EngineSettings, enable_compilation_cache
from xcodec2_jax.tokenize import tokenize_corpus

# (container, subtype, rate): what corpora ship, alternating.
FORMATS = (("FLAC", "PCM_16", 16000), ("MP3", "MPEG_LAYER_III", 22050), ("FLAC", "PCM_16", 44100),
           ("MP3", "MPEG_LAYER_III", 16000))


def build_shard(folder: Path, clips: int, low: float, high: float, seed: int) -> tuple[Path, list[float]]:
    """The corpus as one tar shard; -> (path, each clip's duration in seconds)."""
    durations = np.random.default_rng(seed).uniform(low, high, clips)
    samples = []
    for i, seconds in enumerate(durations):
        fmt, subtype, rate = FORMATS[i % len(FORMATS)]
        wave = speech_clip(float(seconds), sampling_rate=rate, seed=i)
        samples.append((f"spk{i % 10}/utt{i:05d}", {fmt.lower(): audio_bytes(wave, rate, fmt, subtype),
                                                     "json": json.dumps({"text": f"utterance {i}"}).encode()}))
    return write_shard(folder / "shard-000000.tar", samples), [float(d) for d in durations]


def bucket_of(engine: Engine, seconds: float) -> int:
    """The bucket (frames) a clip of ``seconds`` at 16 kHz goes to, as the engine pads it."""
    samples = round(seconds * engine.config.sampling_rate)
    return engine.bucket_for(-(-(samples + 1) // engine.config.hop_length))


def step_seconds(engine: Engine, frames: int, repeats: int) -> float:
    """Median wall time of the compiled encode step on a full batch of speech at bucket ``frames``."""
    hop, rate = engine.config.hop_length, engine.config.sampling_rate
    rows = []
    for i in range(engine.batch_for(frames)):
        audio = speech_clip(frames * hop / rate, sampling_rate=rate, seed=1000 + i)
        rows.append((audio,) if engine.extractor is None else (audio, engine.extractor.item_features(audio)))
    step = engine.compiled("encode", frames)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        np.asarray(step(engine.device.state, *engine.device_batch("encode", rows, frames)))
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: the seeded random full-size checkpoint)")
    parser.add_argument("--half-size", action="store_true",
                        help="the seeded random half-size checkpoint (convert.torch_reference.HALF_SIZE) instead")
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=EngineSettings.batch_size)
    parser.add_argument("--buckets", type=float, nargs="+", default=EngineSettings.bucket_seconds)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per bucket for the ceiling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    enable_compilation_cache()  # as the command line does: a second run compiles nothing
    work = Path(tempfile.mkdtemp(prefix="xcodec2-tokenize-bench-"))
    try:
        begin = time.perf_counter()
        shard, durations = build_shard(work, args.clips, args.min_seconds, args.max_seconds, args.seed)
        print(f"corpus: {len(durations)} clips, {sum(durations):.0f} s of audio, {shard.stat().st_size / 1e6:.1f} MB "
              f"shard ({time.perf_counter() - begin:.0f} s to build)", flush=True)

        begin = time.perf_counter()
        checkpoint = args.model or (half_size_checkpoint() if args.half_size else full_size_checkpoint())
        model = Xcodec2Model.from_pretrained(checkpoint)
        load_seconds = time.perf_counter() - begin
        settings = EngineSettings(batch_size=args.batch_size, bucket_seconds=tuple(args.buckets),
                                  workers=args.workers)
        engine = model.engine(settings)
        audio_per_bucket: dict[int, float] = {}
        for seconds in durations:
            audio_per_bucket[bucket_of(engine, seconds)] = audio_per_bucket.get(bucket_of(engine, seconds), 0) + seconds
        begin = time.perf_counter()
        for frames in sorted(audio_per_bucket):
            engine.compiled("encode", frames)
        compile_seconds = time.perf_counter() - begin
        print(f"model loaded in {load_seconds:.1f} s; {len(audio_per_bucket)} bucket(s) compiled in "
              f"{compile_seconds:.1f} s", flush=True)

        buckets = []
        for frames, bucket_audio in sorted(audio_per_bucket.items()):
            seconds = step_seconds(engine, frames, args.repeats)
            rate = engine.batch_for(frames) * frames / model.config.frame_rate / seconds
            buckets.append({"bucket_s": frames / model.config.frame_rate, "audio_s": bucket_audio,
                            "step_s": seconds, "step_rate_x": rate})
            print(f"  step at {frames / model.config.frame_rate:g} s x {engine.batch_for(frames)}: {seconds:.2f} s "
                  f"= {rate:.3f}x real time ({bucket_audio:.0f} s of the corpus)", flush=True)
        steps: collections.Counter[int] = collections.Counter()  # the engine fetches its compiled step per step
        compiled = engine.compiled
        engine.compiled = lambda kind, frames: steps.update([frames]) or compiled(kind, frames)
        begin = time.perf_counter()
        summary = tokenize_corpus(shard, work / "tokens", model=model, batch_size=args.batch_size,
                                  buckets=args.buckets, workers=args.workers, keep_columns=("text",), progress=False)
        end_to_end = time.perf_counter() - begin
        engine.compiled = compiled
        manifest = json.loads((work / "tokens" / "manifest.json").read_text())
        audio = summary.audio_seconds
        print(f"end to end: {audio:.0f} s of audio in {end_to_end:.1f} s = {audio / end_to_end:.3f}x real time "
              f"({summary.encoded} rows, {summary.failed} errors)", flush=True)

        for bucket in buckets:
            bucket["steps_run"] = steps[round(bucket["bucket_s"] * model.config.frame_rate)]
        ceiling = sum(b["audio_s"] / b["step_rate_x"] for b in buckets)
        device = sum(b["steps_run"] * b["step_s"] for b in buckets) or None  # None: the engine was not counted
        result = {
            "device": jax.devices()[0].device_kind, "machine": platform.processor() or platform.machine(),
            "clips": len(durations), "audio_s": audio, "batch_size": args.batch_size,
            "buckets_s": list(args.buckets), "workers": args.workers, "load_s": load_seconds,
            "compile_s": compile_seconds, "end_to_end_s": end_to_end, "end_to_end_x": audio / end_to_end,
            "ceiling_s": ceiling, "ceiling_x": audio / ceiling, "fraction_of_ceiling": ceiling / end_to_end,
            "padding_ratio": manifest["last_run"]["padding_ratio"], "steps": buckets,
            "device_s": device, "ceiling_over_device": device and ceiling / device,
            "device_over_end_to_end": device and device / end_to_end,
        }
        padding = result["padding_ratio"]
        print(f"encode step alone (ceiling): {result['ceiling_x']:.3f}x real time\n"
              f"end to end / ceiling: {result['fraction_of_ceiling']:.1%}; padding waste (manifest): "
              f"{'n/a' if padding is None else f'{padding:.2f}x computed per audio second'}")
        if device:
            print(f"the run's {sum(steps.values())} steps take {device:.1f} s alone: padding and filler items cost "
                  f"{1 - ceiling / device:.1%} of the device time, the host side {1 - device / end_to_end:.1%} of "
                  "the wall time")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
