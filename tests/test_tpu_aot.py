"""The engine's encode/decode steps compile for a TPU topology without a TPU (``benchmarks/tpu_aot.py``).

libtpu lives in a separate interpreter (importing it beside the CPU jax slows every import): set
``XCODEC2_TPU_PYTHON`` to a Python that has ``pip install -e ".[tpu-aot]"``; ``.ci/run`` makes one.
Each test compiles in a subprocess and bounds the bytes accessed per second of audio per chip, a
regression guard set from the measurement (benchmarks/RESULTS.md, issue 10) with some headroom.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU_PYTHON = os.environ.get("XCODEC2_TPU_PYTHON")
pytestmark = pytest.mark.skipif(not TPU_PYTHON, reason="XCODEC2_TPU_PYTHON is not set (a Python with .[tpu-aot])")


def compile_for_tpu(tmp_path: Path, *args: str, timeout: float) -> dict[tuple[str, str], dict]:
    """Run tpu_aot.py with ``args``; its rows by (step/part name, dtype)."""
    out = tmp_path / "tpu_aot.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": ""}
    subprocess.run([TPU_PYTHON, str(ROOT / "benchmarks" / "tpu_aot.py"), *args, "--json", str(out)], check=True,
                   env=env, timeout=timeout, capture_output=True, text=True)
    return {(row["what"], row["dtype"]): row for row in json.loads(out.read_text())["rows"]}


# GB accessed per second of audio per chip: measured (tiny, v5e, float32, 1 x 0.2 s) x ~1.5.
TINY_BOUNDS = {"encode": 0.45, "decode": 0.15}


def test_tiny_steps_compile_for_tpu(tmp_path):
    """float32 at "highest" and bfloat16 with its float32 parts at "high" (bf16x3 written out in the kernels:
    Mosaic rejects a "high" dot)."""
    rows = compile_for_tpu(tmp_path, "--config", "tiny", "--topology", "v5e:2x2", "--dtype", "float32", "bfloat16",
                           "--batch", "1", "--seconds", "0.2", "--what", "encode", "decode", timeout=900)
    assert set(rows) == {(name, dtype) for name in TINY_BOUNDS for dtype in ("float32", "bfloat16")}
    assert {row["precision"] for row in rows.values() if row["dtype"] == "bfloat16"} == {"high"}
    for (name, _), row in rows.items():
        bound = TINY_BOUNDS[name]
        assert row["gflop"] > 0 and row["fits_hbm"]
        assert row["float32_matmul_gflop"] > 0  # float32 in both: the bf16 policy's acoustic encoder, FSQ input
        assert row["gathers"] == 0, f"{name}: {row['gathers']} gather/scatter/dynamic-slice ops on the hot path"
        assert row["gb_per_audio_s"] <= bound, f"{name}: {row['gb_per_audio_s']:.3f} GB per audio second > {bound}"


# Full size, batch 8 x 6 s per chip on v5e: measured x ~1.2-1.3 (session 8: encode 26.98 / 22.01 GB, decode
# 10.07 / 5.45 GB for float32 / bfloat16), except bf16 encode: 25 GB per 48 s, issue 10's acceptance line.
FULL_BOUNDS = {("encode", "float32"): 0.67, ("encode", "bfloat16"): 25 / 48, ("decode", "float32"): 0.25,
               ("decode", "bfloat16"): 0.15}


@pytest.mark.slow
def test_full_size_steps_compile_for_tpu(tmp_path):
    for dtype in ("float32", "bfloat16"):
        rows = compile_for_tpu(tmp_path, "--config", "full", "--topology", "v5e:2x2", "--dtype", dtype,
                               "--batch", "8", "--seconds", "6", "--what", "encode", "decode", timeout=3600)
        for name in ("encode", "decode"):
            row, bound = rows[name, dtype], FULL_BOUNDS[name, dtype]
            assert row["gathers"] == 0 and row["fits_hbm"]
            assert row["gb_per_audio_s"] <= bound, f"{name} {dtype}: {row['gb_per_audio_s']:.3f} GB/audio s > {bound}"
