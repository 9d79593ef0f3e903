"""What scanning runs of identical layers (model.scan_layers) does to the program: the real train step
(train/program.py) lowered from abstract shapes (no weights allocated), unrolled and scanned.

    JAX_PLATFORMS=cpu python bench/scan_lowering.py --preset jet_nemotron_2b [--no-distill] [--compile]
    python bench/scan_lowering.py ... --topology v5p:2x2x1   # also compile ahead of time for a TPU (libtpu)

Per form: build and lowering seconds, the StableHLO module's op count and size, and with --compile (this
machine's backend) or --topology (a TPU, ahead of time) the compile seconds and XLA's memory analysis.
Stage 1 of the preset: MLPs, embeddings and norms frozen (bf16), fp32 trainable weights, remat full, and the
distillation teacher unless --no-distill. Prints one JSON line per form (--out: a JSON list).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jax

from jetnemo_jax import sharding
from jetnemo_jax.train.config import default_config, model_section
from jetnemo_jax.train.program import build
from jetnemo_jax.train.recipes import STAGE1_FROZEN

_OP = re.compile(r"^\s*(?:%\S+(?:, %\S+)* = )?\"?([a-z_]+\.[a-z_0-9.]+)")


def stablehlo_ops(text: str) -> dict[str, int]:
    """{op name: count} over every function of a StableHLO module's text."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        m = _OP.match(line)
        if m and not m.group(1).startswith(("func.func", "module")):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def make_config(args, scan: bool):
    c = default_config()
    c.model = model_section(args.preset, scan_layers=scan)
    c.train.frozen = STAGE1_FROZEN
    c.distill.enabled = not args.no_distill
    c.data.seq_len = args.seq
    c.data.global_batch = args.batch
    c.train.remat = args.remat
    c.train.loss_chunk = args.loss_chunk
    c.train.steps = 1000
    return c


def measure(args, scan: bool, devices) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    c = make_config(args, scan)
    program = build(c, sharding.make_mesh({"data": 1, "fsdp": len(devices), "tensor": 1}, devices))
    t1 = time.perf_counter()
    lowered = program.step_fn.lower(program.abstract_state, program.abstract_frozen, program.abstract_teacher,
                                    program.abstract_batch(c.data.global_batch, c.data.seq_len))
    t2, c2 = time.perf_counter(), time.process_time()
    text = lowered.as_text()
    ops = stablehlo_ops(text)
    row = {"preset": args.preset, "scan_layers": scan, "distill": not args.no_distill, "remat": args.remat,
           "batch": args.batch, "seq": args.seq, "build_s": round(t1 - t0, 2), "lower_s": round(t2 - t1, 2),
           "build_and_lower_cpu_s": round(c2 - c0, 2),
           "stablehlo_ops": sum(ops.values()), "stablehlo_bytes": len(text),
           "while_loops": ops.get("stablehlo.while", 0), "dot_generals": ops.get("stablehlo.dot_general", 0)}
    if args.compile or args.topology:
        t3, c3 = time.perf_counter(), time.process_time()
        compiled = lowered.compile()
        row["compile_s"] = round(time.perf_counter() - t3, 2)
        row["compile_cpu_s"] = round(time.process_time() - c3, 2)  # all threads: a loaded machine's fairer clock
        row["compile_backend"] = args.topology or jax.default_backend()
        mem = compiled.memory_analysis()
        if mem is not None:
            for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
                row[k.replace("_in_bytes", "_gib")] = round(getattr(mem, k, 0) / 2**30, 3)
        row["hlo_instructions"] = sum(1 for line in compiled.as_text().splitlines() if " = " in line)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="jet_nemotron_2b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--remat", default="full")
    p.add_argument("--loss-chunk", type=int, default=0)
    p.add_argument("--no-distill", action="store_true")
    p.add_argument("--forms", default="unrolled,scanned")
    p.add_argument("--compile", action="store_true", help="also compile for this machine's backend")
    p.add_argument("--topology", default="", help="compile ahead of time for a TPU topology, e.g. v5p:2x2x1")
    p.add_argument("--out", default="")
    args = p.parse_args()
    devices = jax.devices()[:1]
    if args.topology:
        from jetnemo_jax.train.compile_only import topology_devices

        devices = topology_devices(args.topology)
    rows = []
    for form in args.forms.split(","):
        rows.append(measure(args, {"unrolled": False, "scanned": True}[form], devices))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
