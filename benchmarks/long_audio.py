"""Long audio: windowed encoding vs full context, and the memory of one long window (full-size weights).

    python benchmarks/long_audio.py                  # 2-minute input, default 30 s windows, 4 s overlap
    python benchmarks/long_audio.py --memory-seconds 60

1. Encodes a 2-minute speech input with the engine's default windows and with one window holding the whole
   input (full context), and reports the code match rate and the decode SNR of windowed vs full-context
   decoding of the same codes.
2. Encodes ``--memory-seconds`` of audio in ONE window in a fresh subprocess and reports that process's
   peak RSS (everything: weights, compiled code, activations) and XLA's buffer assignment for the step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from convert.metrics import snr_db
from convert.speech import speech_clip
from convert.torch_reference import full_size_checkpoint

MEMORY_PROBE = """
import json, sys, time
import numpy as np


def peak_rss_gib():
    # VmHWM: this process's own high-water mark. (ru_maxrss would carry the parent's peak across exec.)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20

from xcodec2_jax import Xcodec2Model
from xcodec2_jax.engine import EngineSettings
checkpoint, seconds = sys.argv[1], float(sys.argv[2])
model = Xcodec2Model.from_pretrained(checkpoint)
audio = np.load(sys.argv[3])
settings = EngineSettings(batch_size=1, bucket_seconds=(seconds,), window_seconds=seconds, overlap_seconds=0.0)
engine = model.engine(settings)
begin = time.perf_counter()
codes = engine.encode([audio])[0]
elapsed = time.perf_counter() - begin
memory = engine.compiled("encode", engine.buckets[-1]).memory_analysis()
print(json.dumps({"codes": int(codes.size), "seconds": elapsed,
                  "peak_rss_gib": peak_rss_gib(),
                  "xla_temp_gib": memory.temp_size_in_bytes / 2**30}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the long input")
    parser.add_argument("--memory-seconds", type=float, default=60.0)
    parser.add_argument("--skip-match", action="store_true")
    args = parser.parse_args(argv)

    from xcodec2_jax import Xcodec2Model
    from xcodec2_jax.engine import EngineSettings

    checkpoint = full_size_checkpoint()
    clips = [speech_clip(7.7, seed=i) for i in range(int(args.seconds // 7) + 1)]
    long = np.concatenate(clips)[: int(args.seconds * 16000)]
    if not args.skip_match:
        model = Xcodec2Model.from_pretrained(checkpoint)
        windowed = EngineSettings(batch_size=4, full_batch_seconds=None)  # the 30 s windows 4 to a step
        whole = EngineSettings(batch_size=1, bucket_seconds=(args.seconds + 1,), window_seconds=args.seconds + 1)
        begin = time.perf_counter()
        codes = model.encode_audio(long, settings=windowed)[0]
        print(f"windowed encode ({windowed.window_seconds:g} s windows, {windowed.overlap_seconds:g} s overlap): "
              f"{time.perf_counter() - begin:.1f} s incl. compile")
        full = model.encode_audio(long, settings=whole)[0]
        print(f"code match windowed vs full context on {args.seconds:g} s: {np.mean(codes == full):.4%} "
              f"({int(np.sum(codes != full))} of {codes.size} differ)")
        audio = model.decode_codes(full, settings=windowed)[0]
        reference = model.decode_codes(full, settings=whole)[0]
        print(f"decode windowed vs full context: SNR {snr_db(reference, audio):.1f} dB, "
              f"max abs err {np.abs(reference - audio).max():.3g}")

    with tempfile.TemporaryDirectory(prefix="xcodec2-long-audio-") as tmp:
        probe_audio = Path(tmp) / "memory_probe.npy"
        np.save(probe_audio, long[: int(args.memory_seconds * 16000)])
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(checkpoint), str(args.memory_seconds),
                              str(probe_audio)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.memory_seconds:g} s in one window: peak RSS {result['peak_rss_gib']:.2f} GiB (whole process), "
          f"XLA temporaries {result['xla_temp_gib']:.2f} GiB, {result['seconds']:.1f} s incl. compile")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
