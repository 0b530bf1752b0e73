"""Lower-precision policies against float32: code agreement and encode time, same weights, same speech.

    python benchmarks/bf16.py                     # CPU: 8 clips x 6 s, every bf16 policy, vs our float32
    python benchmarks/bf16.py --torch             # also Transformers bf16 vs fp32
    python benchmarks/bf16.py --reference transformers --policies ALL --json out.json   # on a GPU / TPU
    python benchmarks/bf16.py --emulate tpu --policies ALL   # CPU: TPU's precisions emulated (see below)

A policy is a compute dtype, a matmul/conv precision for float32 operands, and the parts kept in float32
when the dtype is bfloat16 (``Xcodec2Model.from_pretrained(..., dtype=..., precision=..., float32_parts=...)``;
parameters are stored in float32 either way; norms, FSQ, the anti-aliased activations and the ISTFT head
always run in float32). On XLA:CPU every precision computes float32 exactly, so the precision rows only
differ on an accelerator (TPU: 6 / 3 / 1 bf16 passes; GPU: fp32 / TF32). ``--emulate tpu`` (or ``gpu``) makes
them differ on the CPU too: every float32 matmul and convolution is computed as those passes would
(``emulated_precision.py``), so the agreement of a precision policy on that accelerator is measured here;
the encode times are then the emulation's, not a speed.

The reference codes are our float32 "highest" on this device (``--reference jax``, the default; equal to
Transformers' on CPU, which the parity tests check), or Transformers' float32 computed on the CPU
(``--reference transformers``): the ground truth, for accelerators, where our float32 "highest" is itself a
row of the table. Exact agreement is not expected: FSQ rounds, and random weights put many values near a
rounding boundary. The encode time is ``encode_audio`` on the clips after a warm-up call (compile time apart).
Each policy's TPU cost comes from ``tpu_aot.py``'s per-part table (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.emulated_precision import PLATFORMS, emulated_precision
from convert.kaldi_reference import reference_feature_extractor
from convert.speech import speech_clip
from convert.torch_reference import TorchXcodec2Model, full_size_checkpoint
from xcodec2_jax import Xcodec2Model
from xcodec2_jax.engine import EngineSettings
from xcodec2_jax.lengths import valid_samples, whole_frames
from xcodec2_jax.nn.codec import DEFAULT_FLOAT32_PARTS

F32, BF16 = jnp.float32, jnp.bfloat16
# name -> (compute dtype, precision for float32 operands, parts kept in float32 when the dtype is bf16)
POLICIES = {
    "float32, precision high": (F32, "high", DEFAULT_FLOAT32_PARTS),
    "float32, precision default": (F32, "default", DEFAULT_FLOAT32_PARTS),
    "all bf16 (before issue 10)": (BF16, "highest", ()),
    "fc_encoder + project_in f32": (BF16, "highest", ("quantizer_input",)),
    "+ semantic adapter f32": (BF16, "highest", ("quantizer_input", "semantic_adapter")),
    "+ acoustic encoder f32": (BF16, "highest", DEFAULT_FLOAT32_PARTS),
    "+ semantic encoder f32": (BF16, "highest", ("quantizer_input", "semantic_encoder")),
    "+ semantic encoder and adapter f32": (BF16, "highest", ("quantizer_input", "semantic_encoder",
                                                             "semantic_adapter")),
    "bf16 default, f32 parts at precision high": (BF16, "high", DEFAULT_FLOAT32_PARTS),  # the library's default
    "bf16 default, f32 parts at precision default": (BF16, "default", DEFAULT_FLOAT32_PARTS),
}
FLOAT32_HIGHEST = "float32, precision highest"
BF16_ONLY = [name for name, (dtype, precision, _) in POLICIES.items() if dtype == BF16 and precision == "highest"]


def timed_encode(model: Xcodec2Model, clips: list[np.ndarray], settings: EngineSettings
                 ) -> tuple[np.ndarray, float, float]:
    """Codes of ``clips`` (concatenated), seconds of the first (compiling) call and of a second one."""
    begin = time.perf_counter()
    model.encode_audio(clips, settings=settings)
    first = time.perf_counter() - begin
    begin = time.perf_counter()
    codes = model.encode_audio(clips, settings=settings)
    return np.concatenate(codes), first, time.perf_counter() - begin


def transformers_codes(checkpoint: Path, clips: list[np.ndarray], dtype_name: str) -> tuple[np.ndarray, float]:
    """Transformers' codes of ``clips`` on the CPU in float32 or bfloat16, and the seconds they took."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    features = dict(reference_feature_extractor()(clips, sampling_rate=16000, return_tensors="pt"))
    model = TorchXcodec2Model.from_pretrained(checkpoint, dtype=dtype).eval()
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in features.items()}
    begin = time.perf_counter()
    with torch.inference_mode():
        codes = model.encode(**inputs).audio_codes.numpy()[:, 0]
    frames = [whole_frames(valid_samples(len(clip)), 320) for clip in clips]
    return np.concatenate([row[:n] for row, n in zip(codes, frames, strict=True)]), time.perf_counter() - begin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--policies", nargs="+", default=BF16_ONLY, choices=[*POLICIES, "ALL"],
                        help="default: the bf16 policies at precision highest; ALL: every policy")
    parser.add_argument("--reference", choices=("jax", "transformers"), default="jax")
    parser.add_argument("--torch", action="store_true", help="also measure Transformers bf16 vs fp32")
    parser.add_argument("--checkpoint", type=Path, help="default: the seeded random full-size checkpoint")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--emulate", choices=PLATFORMS, help="on the CPU, compute float32 matmuls and "
                        "convolutions as this accelerator does at each policy's precision")
    args = parser.parse_args(argv)
    with emulated_precision(args.emulate) if args.emulate else contextlib.nullcontext():
        return run(args)


def run(args: argparse.Namespace) -> int:
    policies = list(POLICIES) if "ALL" in args.policies else args.policies

    checkpoint = args.checkpoint or full_size_checkpoint()
    # One sample short of the bucket (the extractor appends one valid sample): the step bench_inference.py
    # compiles for a batch x seconds of audio, so the two share the persistent compilation cache.
    clips = [speech_clip(args.seconds, seed=i)[:-1] for i in range(args.clips)]
    settings = EngineSettings(batch_size=args.clips, bucket_seconds=(args.seconds,), full_batch_seconds=None)
    device = jax.devices()[0].device_kind + (f", {args.emulate} precision emulated" if args.emulate else "")
    print(f"JAX {jax.__version__} on {device}; {args.clips} clips x {args.seconds:g} s", flush=True)
    rows = []

    def add_row(name: str, codes: np.ndarray, compile_s: float, seconds: float) -> None:
        rows.append({"policy": name, "match": float(np.mean(codes == reference)), "compile_s": compile_s,
                     "encode_s": seconds})
        print(f"{name}: code match {rows[-1]['match']:.2%}, encode {seconds:.3f} s (first call {compile_s:.1f} s)",
              flush=True)

    ours, compile_s, seconds = timed_encode(Xcodec2Model.from_pretrained(checkpoint), clips, settings)
    reference = ours
    if args.reference == "transformers":
        reference, torch_seconds = transformers_codes(checkpoint, clips, "float32")
        print(f"reference: Transformers float32 on the CPU ({torch_seconds:.1f} s)", flush=True)
    add_row(FLOAT32_HIGHEST, ours, compile_s, seconds)
    for name in policies:
        dtype, precision, float32_parts = POLICIES[name]
        model = Xcodec2Model.from_pretrained(checkpoint, dtype=dtype, precision=precision,
                                             float32_parts=float32_parts)
        add_row(name, *timed_encode(model, clips, settings))
        del model

    print(f"\n| policy | dtype | precision | float32 parts | codes equal to {args.reference} float32 | encode (s) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        dtype, precision, parts = POLICIES.get(row["policy"], (F32, "highest", ()))
        parts = "all" if dtype == F32 else ", ".join(parts) or "-"
        print(f"| {row['policy']} | {jnp.dtype(dtype).name} | {precision} | {parts} | {row['match']:.2%} | "
              f"{row['encode_s']:.3f} |")

    if args.torch:
        codes = {name: transformers_codes(checkpoint, clips, name) for name in ("float32", "bfloat16")}
        for name, (_, seconds) in codes.items():
            print(f"Transformers {name}: encode in {seconds:.2f} s")
        match = np.mean(codes["float32"][0] == codes["bfloat16"][0])
        print(f"Transformers bf16 vs fp32: code match {match:.2%}")
        rows.append({"policy": "Transformers bfloat16 vs its float32", "match": float(match)})
    if args.json:
        args.json.write_text(json.dumps({"device": device, "reference": args.reference,
                                         "clips": args.clips, "seconds": args.seconds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
