"""bfloat16 mode against float32: speed and code match rate, same weights, same speech (full size).

    python benchmarks/bf16.py                     # 8 clips x 6 s, xcodec2-jax only
    python benchmarks/bf16.py --torch             # also Transformers bf16 vs fp32 (the issue quotes ~85%)

bf16 runs matmuls and convolutions in bfloat16; norms, FSQ, the anti-aliased activations and the ISTFT
stay float32. Exact agreement is not expected: FSQ rounds, and random weights put many values near a
rounding boundary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax.numpy as jnp
import numpy as np

from convert.kaldi_reference import reference_feature_extractor
from convert.speech import speech_clip
from convert.torch_reference import TorchXcodec2Model, full_size_checkpoint
from xcodec2_jax import Xcodec2Model
from xcodec2_jax.engine import EngineSettings


def timed_encode(model: Xcodec2Model, clips: list[np.ndarray], settings: EngineSettings) -> tuple[list, float]:
    model.encode_audio(clips, settings=settings)  # compile + warm-up
    begin = time.perf_counter()
    codes = model.encode_audio(clips, settings=settings)
    return codes, time.perf_counter() - begin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--torch", action="store_true", help="also measure Transformers bf16 vs fp32")
    args = parser.parse_args(argv)

    checkpoint = full_size_checkpoint()
    clips = [speech_clip(args.seconds, seed=i) for i in range(args.clips)]
    settings = EngineSettings(batch_size=args.clips, bucket_seconds=(args.seconds + 1,))
    results = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        results[name] = timed_encode(Xcodec2Model.from_pretrained(checkpoint, dtype=dtype), clips, settings)
        print(f"xcodec2-jax {name}: encode {args.clips} x {args.seconds:g} s in {results[name][1]:.2f} s", flush=True)
    f32, bf16 = (np.concatenate(results[k][0]) for k in ("float32", "bfloat16"))
    print(f"xcodec2-jax bf16 vs fp32: code match {np.mean(f32 == bf16):.2%}, "
          f"speed-up {results['float32'][1] / results['bfloat16'][1]:.2f}x")

    if args.torch:
        import torch

        features = dict(reference_feature_extractor()(clips, sampling_rate=16000, return_tensors="pt"))
        codes = {}
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model = TorchXcodec2Model.from_pretrained(checkpoint, dtype=dtype).eval()
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in features.items()}
            begin = time.perf_counter()
            with torch.inference_mode():
                codes[name] = model.encode(**inputs).audio_codes.numpy().ravel()
            print(f"Transformers {name}: encode in {time.perf_counter() - begin:.2f} s", flush=True)
        print(f"Transformers bf16 vs fp32: code match {np.mean(codes['float32'] == codes['bfloat16']):.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
