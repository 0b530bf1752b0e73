"""Ahead-of-time TPU compile of the engine's encode/decode steps, without a TPU: cost, memory, roofline.

    pip install -e ".[tpu-aot]"      # jax[tpu] (libtpu) in a SEPARATE venv: libtpu slows every CPU import
    python benchmarks/tpu_aot.py                                  # full size, v5e + v6e, f32 + bf16, 8 x 6 s
    python benchmarks/tpu_aot.py --batch 32 --seconds 30 --what encode decode
    python benchmarks/tpu_aot.py --config tiny --topology v5e:2x2 --batch 1 --seconds 0.2 --json out.json

libtpu compiles for a TPU topology on a CPU-only host (``jax.experimental.topologies``). The steps are the
engine's own (:func:`xcodec2_jax.engine.step_functions` on a mesh over the topology's chips, inputs from
:func:`~xcodec2_jax.engine.step_inputs`), with an abstract replicated state: nothing is allocated. The
parts (semantic encoder, adapter, acoustic encoder, fc + FSQ, decoder, and one anti-aliased activation at
the first acoustic block's shape) are the codec's own modules, jitted with the same shardings. For each:
XLA's ``cost_analysis`` (flops, bytes accessed, transcendentals; per chip, the program being
SPMD-partitioned), ``memory_analysis`` (argument, output and temporary bytes per chip), compile time, the
count of gather/scatter/dynamic-slice ops left in the optimised program, and a roofline per chip:
``max(flops x passes / peak bf16 flops, bytes / HBM bandwidth)``, as x real time (audio seconds per second
per chip). ``passes`` is 6 for float32 at precision "highest" (3 for "high", 1 for "default"); it applies to
the float32 matmul and convolution flops, counted from the program's jaxpr (a bf16 model's float32 parts
included); every other flop counts once. Pallas kernels report the bytes they move (their blocks, halos
included) through their cost estimates.

Results are cached in the JSON file (``--json``) under a key that includes a hash of the package's
source, so an unchanged case is not compiled twice. libtpu prints warnings about the missing TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # before libtpu loads: a host type it accepts
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xcodec2_jax.config import Xcodec2Config
from xcodec2_jax.engine import DATA_AXIS, step_functions, step_inputs
from xcodec2_jax.nn.codec import DEFAULT_FLOAT32_PARTS, Xcodec2Codec
from xcodec2_jax.nn.codec import PARTS as PARTS_OF_CODEC
from xcodec2_jax.nn.layers import PRECISIONS, Numerics, default_precision, weights_in_compute_dtype

PACKAGE = Path(__file__).resolve().parent.parent / "xcodec2_jax"


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip peaks (Google Cloud TPU documentation, "TPU v5e" / "TPU v6e" pages)."""

    name: str
    bf16_tflops: float
    hbm_gbps: float
    hbm_gib: float


# device_kind as libtpu reports it -> peaks. One table; every roofline below comes from it.
CHIPS = {
    "TPU v5 lite": Chip("v5e", bf16_tflops=197.0, hbm_gbps=819.0, hbm_gib=16.0),
    "TPU v6 lite": Chip("v6e", bf16_tflops=918.0, hbm_gbps=1640.0, hbm_gib=32.0),
}
PASSES = {"highest": 6, "high": 3, "default": 1}  # bf16 MXU passes per float32 matmul

# The tiny configuration of the tests (tests/conftest.py): every code path, compiles in seconds.
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 16, "encoder_hidden_size": 8, "quantization_dim": 96,
    "semantic_model_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                              "intermediate_size": 64},
}
STEPS = ("encode", "decode")
PARTS = ("semantic_encoder", "semantic_adapter", "acoustic_encoder", "fc_fsq", "decoder", "activation")
HLO_GATHERS = re.compile(r"= [^=]*? (gather|scatter|dynamic-slice|dynamic-update-slice)\(")


def load_config(name: str) -> Xcodec2Config:
    if name == "full":
        return Xcodec2Config()
    if name == "tiny":
        return Xcodec2Config.from_dict(TINY)
    return Xcodec2Config.from_json_file(name)


def source_hash() -> str:
    """Hash of the package's Python source: a cached result is reused only for the same code."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def part_functions(graphdef: nnx.GraphDef, config: Xcodec2Config, dtype: jnp.dtype, mesh: Mesh, batch: int,
                   frames: int) -> dict:
    """name -> (jitted function of (state, *inputs), abstract inputs) for each part of the codec."""
    batched = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=batched)
    codec = lambda state: nnx.merge(graphdef, state)
    hop, semantic, acoustic = config.hop_length, config.semantic.hidden_size, config.hidden_size
    frame_mask = spec((batch, frames), jnp.bool_)
    parts = {
        "semantic_encoder": (lambda s, f, m: codec(s).semantic_encoder(f.astype(dtype), m),
                             [spec((batch, frames, config.semantic.feature_projection_input_dim)), frame_mask]),
        "semantic_adapter": (lambda s, h, m: codec(s).semantic_adapter(h, m),
                             [spec((batch, frames, semantic), dtype), frame_mask]),
        "acoustic_encoder": (lambda s, w, n: codec(s).acoustic_encoder(w.astype(dtype), n),
                             [spec((batch, 1, frames * hop)), spec((batch,), jnp.int32)]),
        "fc_fsq": (lambda s, a, b: codec(s).quantize(a, b)[0],
                   [spec((batch, frames, semantic), dtype), spec((batch, frames, acoustic), dtype)]),
        "decoder": (lambda s, z, n: codec(s).decode(z, n),
                    [spec((batch, frames, config.quantization_dim), dtype), spec((batch,), jnp.int32)]),
        # One anti-aliased activation at the shape of the first block's (the acoustic encoder's bulk).
        "activation": (lambda s, x, n: codec(s).acoustic_encoder.block[0].res_unit1.snake1(x, n),
                       [spec((batch, config.encoder_hidden_size, frames * hop), dtype), spec((batch,), jnp.int32)]),
    }
    replicated = NamedSharding(mesh, PartitionSpec())
    return {name: (jax.jit(fn, in_shardings=(replicated, *[batched] * len(args)), out_shardings=batched), args)
            for name, (fn, args) in parts.items()}


def compile_case(config: Xcodec2Config, config_name: str, topology: str, dtype: str, precision: str | None,
                 batch: int, seconds: float, what: list[str], cache: dict, code: str,
                 float32_parts: tuple[str, ...] = DEFAULT_FLOAT32_PARTS) -> list[dict]:
    """Compile every step/part of one case (or take it from ``cache``); one result row each."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    chip = CHIPS[devices[0].device_kind]
    mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
    global_batch, frames = batch * len(devices), round(seconds * config.frame_rate)
    numerics = Numerics.create(jnp.dtype(dtype), precision or default_precision(dtype, "tpu"))
    precision = numerics.precision_name
    abstract = nnx.eval_shape(lambda: Xcodec2Codec(config, numerics=numerics, float32_parts=float32_parts,
                                                   rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state = jax.eval_shape(functools.partial(weights_in_compute_dtype, graphdef), state)  # as DeviceModel places it
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)

    jobs = {}
    steps = step_functions(graphdef, mesh)
    for name in STEPS:
        jobs[name] = (steps[name], step_inputs(config, name, global_batch, frames, mesh))
    jobs.update(part_functions(graphdef, config, numerics.dtype, mesh, global_batch, frames))
    rows = []
    for name in [w for w in (*STEPS, *PARTS) if w in what]:
        parts = "" if float32_parts == DEFAULT_FLOAT32_PARTS else f"|f32:{','.join(float32_parts)}"
        key = f"{code}|{config_name}|{topology}|{dtype}|{precision}|{batch}|{seconds:g}|{name}{parts}"
        fn, args = jobs[name]
        if key not in cache:
            begin = time.perf_counter()
            compiled = fn.lower(state, *args).compile()
            elapsed = time.perf_counter() - begin
            cache[key] = measure(compiled, elapsed)
            print(f"  compiled {name} for {topology} {dtype} {batch} x {seconds:g} s in {elapsed:.1f} s", flush=True)
        if "float32_matmul_gflop" not in cache[key]:  # a trace, not a compile: also for older cache entries
            float32_flops = float32_matmul_flops(jax.make_jaxpr(fn)(state, *args).jaxpr)
            cache[key]["float32_matmul_gflop"] = float32_flops / len(devices) / 1e9  # per chip, as XLA's
        row = {"config": config_name, "topology": topology, "chip": chip.name, "dtype": dtype, "precision": precision,
               "batch_per_chip": batch, "seconds": seconds, "what": name, **cache[key]}
        rows.append(with_roofline(row, chip, audio_seconds=batch * seconds))
    return rows


def float32_matmul_flops(jaxpr: jax.extend.core.Jaxpr) -> float:
    """Flops of the float32 dot_general / conv_general_dilated ops of ``jaxpr`` (the whole batch): the ones a
    TPU computes in ``passes`` bf16 passes. Of a ``cond``'s branches (a Pallas kernel or its XLA form) the
    larger counts; Pallas kernel bodies are not entered: their XLA twins hold the same math, except the
    relative-key term, which the XLA form computes as a one-hot matmul the kernel does not make (< 1% of a
    float32 encode). Loop bodies count once and ``shard_map`` bodies per shard; the model's steps have
    neither outside the kernels' branches."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "pallas_call":
            continue
        if name in ("dot_general", "conv_general_dilated") and all(v.aval.dtype == jnp.float32 for v in eqn.invars):
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            if name == "dot_general":
                (contracting, _), _ = eqn.params["dimension_numbers"]
                reduced = math.prod(lhs[d] for d in contracting)
            else:  # (out, in / groups, *window) of the kernel
                spec = eqn.params["dimension_numbers"].rhs_spec
                reduced = math.prod(rhs[d] for d in spec[1:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * reduced
        nested = [float32_matmul_flops(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
        total += (max(nested) if name == "cond" else sum(nested)) if nested else 0.0
    return total


def measure(compiled, elapsed: float) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    return {
        "gflop": cost.get("flops", 0.0) / 1e9,
        "gb_accessed": cost.get("bytes accessed", 0.0) / 1e9,
        "transcendentals_g": cost.get("transcendentals", 0.0) / 1e9,
        "argument_gib": memory.argument_size_in_bytes / 2**30,
        "output_gib": memory.output_size_in_bytes / 2**30,
        "temp_gib": memory.temp_size_in_bytes / 2**30,
        "alias_gib": memory.alias_size_in_bytes / 2**30,
        "gathers": len(HLO_GATHERS.findall(text)),
        "compile_s": elapsed,
    }


def with_roofline(row: dict, chip: Chip, audio_seconds: float) -> dict:
    """Add the roofline time per chip and what it means in x real time."""
    passes = PASSES[row["precision"]]
    compute = (row["gflop"] + row["float32_matmul_gflop"] * (passes - 1)) / (chip.bf16_tflops * 1e3)
    memory = row["gb_accessed"] / chip.hbm_gbps
    seconds = max(compute, memory)
    return {**row, "roofline_ms": seconds * 1e3, "bound": "compute" if compute >= memory else "memory",
            "x_real_time": audio_seconds / seconds if seconds else float("inf"),
            "gb_per_audio_s": row["gb_accessed"] / audio_seconds,
            # bytes accessed over the bytes of the arguments (weights included) and outputs: 1 is one pass
            "traffic_over_io": row["gb_accessed"] / ((row["argument_gib"] + row["output_gib"]) * 2**30 / 1e9),
            "fits_hbm": row["argument_gib"] + row["temp_gib"] <= chip.hbm_gib}


def table(rows: list[dict]) -> str:
    head = ("| chip | dtype | batch x s | step / part | GFLOP | f32 matmul GFLOP | GB accessed | GB / audio s "
            "| accessed / (in + out) | transc. (G) | arg GiB | temp GiB | fits HBM | gathers | compile s | roofline ms "
            "| bound | x real time |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['chip']} | {r['dtype']} | {r['batch_per_chip']} x {r['seconds']:g} | {r['what']} | {r['gflop']:.0f} "
            f"| {r['float32_matmul_gflop']:.0f} "
            f"| {r['gb_accessed']:.2f} | {r['gb_per_audio_s']:.3f} | {r['traffic_over_io']:.1f} "
            f"| {r['transcendentals_g']:.2f} "
            f"| {r['argument_gib']:.2f} | {r['temp_gib']:.2f} | {'yes' if r['fits_hbm'] else 'NO'} | {r['gathers']} "
            f"| {r['compile_s']:.0f} | {r['roofline_ms']:.2f} | {r['bound']} | {r['x_real_time']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="full", help="'full', 'tiny' or a config.json path")
    parser.add_argument("--topology", nargs="+", default=["v5e:2x2", "v6e:2x2"])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--precision", choices=tuple(PRECISIONS),
                        help="default: the library's on TPU ('highest'; 'high' for a bf16 model's float32 parts)")
    parser.add_argument("--batch", type=int, default=8, help="items per chip")
    parser.add_argument("--seconds", type=float, default=6.0, help="bucket length")
    parser.add_argument("--what", nargs="+", default=[*STEPS, *PARTS], choices=(*STEPS, *PARTS))
    parser.add_argument("--float32-parts", nargs="*", default=list(DEFAULT_FLOAT32_PARTS), choices=PARTS_OF_CODEC,
                        help="parts kept in float32 under bfloat16 (default: the library's default policy)")
    parser.add_argument("--json", type=Path, help="results file; also the cache of earlier compiles")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    cache = json.loads(args.json.read_text())["cache"] if args.json and args.json.is_file() else {}
    code, rows = source_hash(), []
    for topology in args.topology:
        for dtype in args.dtype:
            rows += compile_case(config, args.config, topology, dtype, args.precision, args.batch, args.seconds,
                                 args.what, cache, code, tuple(args.float32_parts))
            if args.json:  # after each case: a long run keeps what it compiled
                args.json.write_text(json.dumps({"rows": rows, "cache": cache}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
