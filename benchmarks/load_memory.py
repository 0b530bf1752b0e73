"""Peak host memory of ``Xcodec2Model.from_pretrained`` on the full-size checkpoint: this tree vs another.

Each load runs in a fresh process and reports its own high-water mark (``VmHWM`` in ``/proc/self/status``,
which counts touched pages of memory-mapped files too) after importing, and after loading. Runs alternate
between the two code trees, so both see the same machine load.

    flock /tmp/xcodec2-heavy.lock python benchmarks/load_memory.py --baseline-tree /path/to/old/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convert.torch_reference import full_size_checkpoint

PROBE = """
import json, sys, time
import jax.numpy as jnp
from xcodec2_jax import Xcodec2Model

def hwm_gib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20

imported = hwm_gib()
begin = time.perf_counter()
model = Xcodec2Model.from_pretrained(sys.argv[1], dtype=getattr(jnp, sys.argv[2]))
seconds = time.perf_counter() - begin
print(json.dumps({"imported_gib": imported, "peak_gib": hwm_gib(), "seconds": seconds}))
"""


def probe(tree: Path, checkpoint: Path, dtype: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(checkpoint), dtype], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-tree", type=Path, required=True, help="checkout of the code to compare with")
    parser.add_argument("--checkpoint", type=Path, help="default: the seeded random full-size checkpoint")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    checkpoint = args.checkpoint or full_size_checkpoint()
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 2**30
    here = Path(__file__).resolve().parent.parent
    print(f"checkpoint {checkpoint} ({size:.2f} GiB of safetensors)")
    print("| dtype | code | peak RSS after import (GiB) | peak RSS after load (GiB) | load increase (GiB) | load s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in args.dtypes:
        for label, tree in (("baseline", args.baseline_tree), ("this tree", here)):
            r = probe(tree, checkpoint, dtype)
            print(f"| {dtype} | {label} | {r['imported_gib']:.2f} | {r['peak_gib']:.2f} | "
                  f"{r['peak_gib'] - r['imported_gib']:.2f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
