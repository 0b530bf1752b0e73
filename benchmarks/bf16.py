"""bfloat16 policies against float32: code agreement and CPU speed, same weights, same speech (full size).

    python benchmarks/bf16.py                     # 8 clips x 6 s, every policy below
    python benchmarks/bf16.py --torch             # also Transformers bf16 vs fp32

A policy is the set of parts kept in float32 when the model computes in bfloat16
(``Xcodec2Model.from_pretrained(..., dtype=jnp.bfloat16, float32_parts=...)``; parameters are stored in
float32 either way; norms, FSQ, the anti-aliased activations and the ISTFT head always run in float32).
Exact agreement is not expected: FSQ rounds, and random weights put many values near a rounding boundary.
Each policy's TPU cost comes from ``tpu_aot.py``'s per-part table (benchmarks/RESULTS.md).
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

POLICIES = {
    "all bf16 (before issue 10)": (),
    "fc_encoder + project_in f32": ("quantizer_input",),
    "+ semantic adapter f32": ("quantizer_input", "semantic_adapter"),
    "+ acoustic encoder f32 (default)": ("quantizer_input", "acoustic_encoder"),
    "+ semantic encoder f32": ("quantizer_input", "semantic_encoder"),
    "+ semantic encoder and adapter f32": ("quantizer_input", "semantic_encoder", "semantic_adapter"),
}


def timed_encode(model: Xcodec2Model, clips: list[np.ndarray], settings: EngineSettings) -> tuple[np.ndarray, float]:
    model.encode_audio(clips, settings=settings)  # compile + warm-up
    begin = time.perf_counter()
    codes = model.encode_audio(clips, settings=settings)
    return np.concatenate(codes), time.perf_counter() - begin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--torch", action="store_true", help="also measure Transformers bf16 vs fp32")
    args = parser.parse_args(argv)

    checkpoint = full_size_checkpoint()
    clips = [speech_clip(args.seconds, seed=i) for i in range(args.clips)]
    settings = EngineSettings(batch_size=args.clips, bucket_seconds=(args.seconds + 1,))
    reference, f32_seconds = timed_encode(Xcodec2Model.from_pretrained(checkpoint), clips, settings)
    print(f"float32: encode {args.clips} x {args.seconds:g} s in {f32_seconds:.2f} s", flush=True)
    rows = []
    for name in args.policies:
        model = Xcodec2Model.from_pretrained(checkpoint, dtype=jnp.bfloat16, float32_parts=POLICIES[name])
        codes, seconds = timed_encode(model, clips, settings)
        rows.append((name, np.mean(codes == reference), seconds))
        print(f"{name}: code match {rows[-1][1]:.2%}, encode {seconds:.2f} s", flush=True)
        del model
    print("\n| bf16 policy | float32 parts | codes equal to float32 | CPU encode (s) |\n|---|---|---|---|")
    print(f"| float32 | all | 100% | {f32_seconds:.1f} |")
    for name, match, seconds in rows:
        print(f"| {name} | {', '.join(POLICIES[name]) or '-'} | {match:.2%} | {seconds:.1f} |")

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
