"""Padding cost of a two-process (``jax.distributed``) run where one host holds only short clips and the other
only long ones: computed seconds / audio seconds per process and in total, and the codes against one process.

    python benchmarks/multihost_padding.py                       # 24 clips of 1-3 s here, 24 of 12-20 s there
    python benchmarks/multihost_padding.py --buckets 1 2 4 8 15 30

Each process runs its own engine on its own devices (CPU, 1 device per process, gloo collectives for the
distributed runtime) with the same seeded tiny random codec: padding is a matter of shapes, not of model
size. The codes of both processes are compared with one process encoding all clips.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# A small config with every code path of the full one (what tests/conftest.py calls TINY).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 16, "encoder_hidden_size": 8, "quantization_dim": 96,
        "semantic_model_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 64}}


def clips(rank: int, count: int, short: tuple[float, float], long: tuple[float, float]):
    """Process ``rank``'s clips: speech of lengths drawn from ``short`` (rank 0) or ``long`` (rank 1)."""
    import numpy as np

    from convert.speech import speech_clip

    low, high = short if rank == 0 else long
    lengths = np.random.default_rng(rank).uniform(low, high, count)
    return [speech_clip(float(s), seed=100 * rank + i) for i, s in enumerate(lengths)]


def model_and_settings(args: argparse.Namespace):
    from xcodec2_jax import Xcodec2Model
    from xcodec2_jax.config import Xcodec2Config
    from xcodec2_jax.engine import EngineSettings, enable_compilation_cache

    enable_compilation_cache(args.cache)
    model = Xcodec2Model.from_config(Xcodec2Config.from_dict(TINY), seed=0)
    buckets = {"bucket_seconds": tuple(args.buckets)} if args.buckets else {}
    return model, EngineSettings(batch_size=args.batch_size, **buckets)


def worker(args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=2, process_id=args.rank)
    model, settings = model_and_settings(args)
    codes = model.encode_audio(clips(args.rank, args.clips, args.short, args.long), settings=settings)
    stats = model.engine(settings).stats.encode
    Path(args.out).write_text(json.dumps({"codes": [c.tolist() for c in codes], "steps": stats.steps,
                                          "audio": stats.audio_seconds, "computed": stats.computed_seconds}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24, help="clips per process")
    parser.add_argument("--short", type=float, nargs=2, default=[1.0, 3.0], help="process 0's lengths (s)")
    parser.add_argument("--long", type=float, nargs=2, default=[12.0, 20.0], help="process 1's lengths (s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--buckets", type=float, nargs="+", help="bucket seconds (default: the engine's)")
    parser.add_argument("--cache", help="persistent compilation cache (default: a temporary one)")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is not None:
        worker(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="xcodec2-multihost-") as tmp:
        args.cache = args.cache or str(Path(tmp) / "cache")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        forwarded = argv if argv is not None else sys.argv[1:]  # + the cache: the last --cache wins
        procs = [subprocess.Popen([sys.executable, __file__, *forwarded, "--cache", args.cache, "--rank", str(r),
                                   "--port", str(port), "--out", str(Path(tmp) / f"out{r}.json")],
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
                 for r in range(2)]
        if [p.wait() for p in procs] != [0, 0]:
            raise SystemExit("a worker failed")
        results = [json.loads((Path(tmp) / f"out{r}.json").read_text()) for r in range(2)]

        import numpy as np

        model, settings = model_and_settings(args)
        alone = model.encode_audio([*clips(0, args.clips, args.short, args.long),
                                    *clips(1, args.clips, args.short, args.long)], settings=settings)
    got = [np.asarray(c, np.int32) for r in results for c in r["codes"]]
    same = all(np.array_equal(a, b) for a, b in zip(got, alone, strict=True))
    print(f"buckets: {settings.bucket_seconds}, batch {settings.batch_size}")
    print("| process | clips | steps | audio s | computed s | computed / audio |")
    print("|---|---|---|---|---|---|")
    for rank, r in enumerate(results):
        lengths = args.short if rank == 0 else args.long
        print(f"| {rank} ({lengths[0]:g}-{lengths[1]:g} s) | {args.clips} | {r['steps']} | {r['audio']:.1f} | "
              f"{r['computed']:.1f} | {r['computed'] / r['audio']:.3f} |")
    audio, computed = sum(r["audio"] for r in results), sum(r["computed"] for r in results)
    print(f"| both | {2 * args.clips} | {sum(r['steps'] for r in results)} | {audio:.1f} | {computed:.1f} | "
          f"**{computed / audio:.3f}** |")
    print(f"codes equal to one process encoding every clip: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
