"""Training-step throughput, MFU and multi-GPU scaling of the real train step (train/program.py) with random
weights and synthetic tokens.

    python bench/train_scaling.py --preset jet_nemotron_2b --batch 2 --seq 4096 [--distill] [--remat full]
    python bench/train_scaling.py --preset qwen2_5_1_5b ...      # the Qwen2.5-1.5B shape through the same code
    python bench/train_scaling.py ... --devices 1,2,4,8 [--tensor 2]  # scaling, per-device batch held fixed

Stage-1 freezing (MLPs, embeddings, norms) unless --full-finetune. MFU uses train/flops.py (frozen-aware
and plain 6N) against the device's bf16 peak. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from jetnemo_jax import sharding
from jetnemo_jax.train import flops
from jetnemo_jax.train.loop import initial_params
from jetnemo_jax.train.program import build
from jetnemo_jax.train.recipes import stage1


def make_config(args, n_devices):
    c = stage1(args.preset)
    c.init.mode = "random"
    c.distill.enabled = args.distill
    c.data.seq_len = args.seq
    c.data.global_batch = args.batch * (n_devices // args.tensor)
    c.train.remat = args.remat
    c.train.steps = 1000
    if args.full_finetune:
        c.train.frozen = ""
    if args.gdr_impl:
        c.model.gdr_impl = args.gdr_impl
    if n_devices % args.tensor:
        raise SystemExit(f"--tensor {args.tensor} does not divide {n_devices} devices")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, n_devices // args.tensor, args.tensor
    return c


def bench(args, n_devices):
    c = make_config(args, n_devices)
    devices = jax.devices()[:n_devices]
    program = build(c, sharding.make_mesh(dict(c.mesh), devices))
    if args.distill:  # random weights for the teacher's own attention (no Qwen checkpoint needed)
        c.init.mode = "random"
        c.distill.enabled = False
        trainable, frozen, _ = initial_params(c, program)
        c.distill.enabled = True
        key = jax.random.key(1)
        teacher = {n: jax.device_put(0.02 * jax.random.normal(key, a.shape, a.dtype), a.sharding)
                   for n, a in program.abstract_teacher.items()}
    else:
        trainable, frozen, teacher = initial_params(c, program)
    state = program.init_state(trainable)
    rng = np.random.default_rng(0)
    B, T = c.data.global_batch, c.data.seq_len
    batch = {"tokens": jax.device_put(rng.integers(0, program.model_config.vocab_size, (B, T)).astype(np.int32),
                                      program.batch_sharding),
             "segment_ids": jax.device_put(np.ones((B, T), np.int32), program.batch_sharding)}
    t0 = time.perf_counter()
    state, m = program.step_fn(state, frozen, teacher, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = program.step_fn(state, frozen, teacher, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    kind = devices[0].device_kind
    peak = flops.peak_flops(kind)
    fpt = program.flops_per_token
    tps = B * T / step_s
    mem = [d.memory_stats() or {} for d in devices]
    row = {"preset": args.preset, "devices": n_devices, "tensor": args.tensor, "device_kind": kind, "batch": B, "seq": T,
           "distill": args.distill, "remat": args.remat, "frozen": c.train.frozen, "step_ms": 1e3 * step_s,
           "tokens_per_s": tps, "tokens_per_s_per_device": tps / n_devices, "compile_s": compile_s,
           "loss": float(m["loss"]), "flops_per_token": fpt,
           "mfu_frozen_aware": tps / n_devices * fpt["frozen_aware"] / peak if peak else None,
           "mfu_6n": tps / n_devices * fpt["6N"] / peak if peak else None,
           "peak_memory_gib": max(x.get("peak_bytes_in_use", 0) for x in mem) / 2**30}
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="jet_nemotron_2b")
    p.add_argument("--batch", type=int, default=2, help="rows per data-parallel (FSDP) group")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--remat", default="full")
    p.add_argument("--distill", action="store_true")
    p.add_argument("--full-finetune", action="store_true")
    p.add_argument("--gdr-impl", default="")
    p.add_argument("--devices", default="", help="comma-separated device counts (default: all)")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (FSDP x tensor)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    counts = [int(x) for x in args.devices.split(",")] if args.devices else [jax.device_count()]
    rows = [bench(args, n) for n in counts]
    base = rows[0]["tokens_per_s_per_device"]
    print(f"{'preset':<18}{'dev':>4}{'batch':>6}{'seq':>6}{'step ms':>9}{'tok/s':>10}{'tok/s/dev':>10}"
          f"{'MFU fa':>8}{'MFU 6N':>8}{'scaling':>8}{'peak GiB':>9}  {rows[0]['device_kind']}")
    for r in rows:
        r["scaling_efficiency"] = r["tokens_per_s_per_device"] / base
        fmt = lambda x: f"{x:.1%}" if x is not None else "-"  # noqa: E731
        print(f"{r['preset']:<18}{r['devices']:>4}{r['batch']:>6}{r['seq']:>6}{r['step_ms']:>9.1f}"
              f"{r['tokens_per_s']:>10,.0f}{r['tokens_per_s_per_device']:>10,.0f}{fmt(r['mfu_frozen_aware']):>8}"
              f"{fmt(r['mfu_6n']):>8}{r['scaling_efficiency']:>8.2f}{r['peak_memory_gib']:>9.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
