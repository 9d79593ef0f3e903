"""Training-step throughput, MFU and multi-GPU scaling of the real train step (train/program.py) with random
weights and synthetic tokens.

    python bench/train_scaling.py --preset jet_nemotron_2b --batch 2 --seq 4096 [--distill] [--remat full]
    python bench/train_scaling.py --preset qwen2_5_1_5b ...      # the Qwen2.5-1.5B shape through the same code
    python bench/train_scaling.py ... --devices 1,2,4,8 [--tensor 2]  # scaling, per-device batch held fixed
    python bench/train_scaling.py ... --profile DIR   # also trace 2 steps: per-component table (step_profile.py)
    python bench/train_scaling.py ... --loss-chunk 1024 --attn-impl cudnn --remat jet:none,attn:full,swa:full

Stage-1 freezing (MLPs, embeddings, norms) unless --full-finetune. MFU uses train/flops.py (frozen-aware
and plain 6N) against the device's bf16 peak. Prints a table and writes JSON (--out).

Start-up, per row (--compile-profile N: where it goes, by cProfile): lower_s (tracing and lowering the step
in Python), compile_s_cold (lowering + compiling the step; compile_cold_from_cache says whether JAX's
persistent compilation cache already held it),
compile_s_warm (--warm-compile: the same program again after jax.clear_caches(), which the persistent cache
serves; None when not measured) and time_to_first_step_s (from the process's start for the first device
count, from its own start for the others, to the end of its first step).
The cache: --compilation-cache DIR|off (default $JAX_COMPILATION_CACHE_DIR, else ~/.cache/jetnemo_jax/...).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gzip
import io
import json
import os
import pstats
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx
from gated_delta_rule import parse_block_v

from jetnemo_jax import compilation_cache, sharding
from jetnemo_jax.model import JetNemotronForCausalLM
from jetnemo_jax.train import flops
from jetnemo_jax.train.config import default_config, model_section
from jetnemo_jax.train.program import build
from jetnemo_jax.train.recipes import STAGE1_FROZEN
from jetnemo_jax.train.startup import process_start


def make_config(args, n_devices):
    c = default_config()  # stage 1 (train/recipes.py) with the preset's sizes and random weights
    c.model = model_section(args.preset)
    c.train.frozen = STAGE1_FROZEN
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
    if args.conv_impl:
        c.model.conv_impl = args.conv_impl
    if args.loss_chunk:
        c.train.loss_chunk = args.loss_chunk
    if args.attn_impl:
        c.model.attn_impl = args.attn_impl
    c.train.frozen_dtype = args.frozen_dtype
    c.model.scan_layers = args.scan_layers
    if n_devices % args.tensor:
        raise SystemExit(f"--tensor {args.tensor} does not divide {n_devices} devices")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, n_devices // args.tensor, args.tensor
    return c


def random_params(program, seed):
    """(trainable, frozen): the model's own random initialisation, built on the host and placed as the
    program shards it (as train/loop.py's init.mode='random')."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        model = JetNemotronForCausalLM(program.model_config, rngs=nnx.Rngs(seed))
    trainable, frozen = program.split.split(nnx.state(model, nnx.Param))
    place = lambda flat, abstract: {n: jax.device_put(np.asarray(flat[n], a.dtype), a.sharding)  # noqa: E731
                                    for n, a in abstract.items()}
    return place(trainable, program.abstract_state["params"]), place(frozen, program.abstract_frozen)


def progress(what, t0):
    print(f"[{time.perf_counter() - t0:7.1f} s] {what}", file=sys.stderr, flush=True)


def bench(args, n_devices, since: float):
    """One row; `since`: the time.time() its time to first step counts from."""
    start = time.perf_counter()
    c = make_config(args, n_devices)
    devices = jax.devices()[:n_devices]
    program = build(c, sharding.make_mesh(dict(c.mesh), devices))
    progress("built", start)
    trainable, frozen = random_params(program, c.seed)
    progress("random weights placed", start)
    key = jax.random.key(1)  # random weights for the teacher's own attention (no Qwen checkpoint needed)
    teacher = {n: jax.device_put(0.02 * jax.random.normal(key, a.shape, a.dtype), a.sharding)
               for n, a in program.abstract_teacher.items()}
    state = program.init_state(trainable)
    rng = np.random.default_rng(0)
    B, T = c.data.global_batch, c.data.seq_len
    batch = {"tokens": jax.device_put(rng.integers(0, program.model_config.vocab_size, (B, T)).astype(np.int32),
                                      program.batch_sharding),
             "segment_ids": jax.device_put(np.ones((B, T), np.int32), program.batch_sharding)}
    t0 = time.perf_counter()
    before = compilation_cache.counters()
    with python_profile(args.compile_profile, "cold lower"):
        lowered = program.step_fn.lower(state, frozen, teacher, batch)
    lower_s = time.perf_counter() - t0  # tracing and lowering in Python: never served by the persistent cache
    with python_profile(args.compile_profile, "cold compile"):
        compiled = lowered.compile()
    cold = compilation_cache.since(before)
    compile_s_cold = time.perf_counter() - t0
    state, m = compiled(state, frozen, teacher, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    time_to_first_step_s = time.time() - since
    progress(f"compiled and ran one step ({compile_s:.0f} s; lower {lower_s:.1f} s, compile {compile_s_cold:.1f} s, "
             f"{'from the persistent cache' if cold['requests'] and not cold['misses'] else 'compiled'})", start)
    compile_s_warm = lower_s_warm = None
    if args.warm_compile:  # the same program again, JAX's in-memory caches cleared: the persistent cache's turn
        jax.clear_caches()
        before, t0 = compilation_cache.counters(), time.perf_counter()
        with python_profile(args.compile_profile, "warm lower"):
            lowered = program.step_fn.lower(state, frozen, teacher, batch)
        lower_s_warm = time.perf_counter() - t0
        with python_profile(args.compile_profile, "warm compile"):
            lowered.compile()
        compile_s_warm, warm = time.perf_counter() - t0, compilation_cache.since(before)
        progress(f"warm compile {compile_s_warm:.1f} s (lower {lower_s_warm:.1f} s; {warm['hits']} of "
                 f"{warm['requests']} programs from the persistent cache)", start)
    if args.compile_only:  # e.g. to fill JAX's persistent compilation cache ahead of the timed runs
        return None
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, frozen, teacher, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    breakdown = None
    if args.profile:
        state, breakdown = profile(args.profile, compiled, state, frozen, teacher, batch, 1e3 * step_s)
    kind = devices[0].device_kind
    peak = flops.peak_flops(kind)
    fpt = program.flops_per_token
    tps = B * T / step_s
    mem = [d.memory_stats() or {} for d in devices]
    row = {"preset": args.preset, "devices": n_devices, "tensor": args.tensor, "device_kind": kind, "batch": B,
           "seq": T,
           "distill": args.distill, "remat": args.remat, "loss_chunk": args.loss_chunk,
           "attn_impl": args.attn_impl or "xla", "conv_impl": c.model.conv_impl, "gdr_impl": c.model.gdr_impl,
           "gdr_block_v": args.gdr_block_v or "default", "conv_taps": args.conv_taps,
           "scan_layers": args.scan_layers, "frozen": c.train.frozen,
           "step_ms": 1e3 * step_s,
           "tokens_per_s": tps, "tokens_per_s_per_device": tps / n_devices, "compile_s": compile_s,
           "lower_s": lower_s, "compile_s_cold": compile_s_cold,
           "compile_cold_from_cache": bool(cold["requests"] and not cold["misses"]),
           "compile_s_warm": compile_s_warm, "lower_s_warm": lower_s_warm,
           "time_to_first_step_s": time_to_first_step_s,
           "loss": float(m["loss"]), "flops_per_token": fpt,
           "mfu_frozen_aware": tps / n_devices * fpt["frozen_aware"] / peak if peak else None,
           "mfu_6n": tps / n_devices * fpt["6N"] / peak if peak else None,
           # the distillation teacher's forward on top of the frozen-aware count (0 without --distill)
           "mfu_with_teacher": (tps / n_devices * (fpt["frozen_aware"] + fpt["teacher_forward"]) / peak
                                if peak else None),
           "peak_memory_gib": max(x.get("peak_bytes_in_use", 0) for x in mem) / 2**30}
    if breakdown is not None:
        row["breakdown"] = breakdown
    return row


PROFILE_STEPS = 2


@contextlib.contextmanager
def python_profile(top: int, what: str):
    """With top > 0, cProfile the block and print its `top` functions by cumulative and by own time (where start-up
    time goes: Python tracing and lowering, or the backend's compile and load)."""
    if not top:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        out = io.StringIO()
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=out).sort_stats(key).print_stats(top)
        print(f"== {what}: cProfile, top {top} by cumulative and own time\n{out.getvalue()}", file=sys.stderr,
              flush=True)


def profile(out_dir, compiled, state, frozen, teacher, batch, step_ms):
    """Trace PROFILE_STEPS steps; keep the trace and the module's text (gzipped) beside the breakdown."""
    import step_profile

    os.makedirs(out_dir, exist_ok=True)
    trace_dir = os.path.join(out_dir, "trace")
    with jax.profiler.trace(trace_dir):
        for _ in range(PROFILE_STEPS):
            state, m = compiled(state, frozen, teacher, batch)
            jax.block_until_ready(m)
    xplanes = [os.path.join(d, f) for d, _, fs in os.walk(trace_dir) for f in fs if f.endswith(".xplane.pb")]
    if not xplanes:
        raise SystemExit(f"no .xplane.pb under {trace_dir}: the profiler wrote no trace")
    hlo = compiled.as_text()
    with open(xplanes[0], "rb") as f, gzip.open(os.path.join(out_dir, "step.xplane.pb.gz"), "wb") as g:
        g.write(f.read())
    with gzip.open(os.path.join(out_dir, "step.hlo.txt.gz"), "wt") as g:
        g.write(hlo)
    result = step_profile.breakdown(step_profile.load_xspace(xplanes[0]), hlo, PROFILE_STEPS)
    print(step_profile.format_table(result, step_ms), flush=True)
    return state, result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="jet_nemotron_2b")
    p.add_argument("--batch", type=int, default=2, help="rows per data-parallel (FSDP) group")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--remat", default="full", help="a policy, or per layer kind: jet:none,attn:full,swa:full")
    p.add_argument("--loss-chunk", type=int, default=0, help="fused LM head + loss, tokens per row per chunk")
    p.add_argument("--attn-impl", default="", help="xla (default), cudnn (GPU), splash (TPU) or blocked")
    p.add_argument("--distill", action="store_true")
    p.add_argument("--full-finetune", action="store_true")
    p.add_argument("--frozen-dtype", default="compute", help="compute (bf16 frozen weights) or param (fp32)")
    p.add_argument("--scan-layers", action="store_true", help="one lax.scan per run of identical layers")
    p.add_argument("--gdr-impl", default="", help="auto (default), triton, fla (fla-core's kernels; [fla] extra), xla")
    p.add_argument("--conv-impl", default="")
    p.add_argument("--gdr-block-v", default=None, type=parse_block_v, metavar="W|S/P",
                   help="the Triton GDR kernels' dv blocks (bench only: replaces default_block_v): W for every "
                        "kernel, S/P serial passes / chunk-parallel ones")
    p.add_argument("--conv-taps", choices=("store", "regenerate"), default="store",
                   help="the Triton conv's grad_u: the forward's taps stored, or regenerated (bench only: sets "
                        "pallas_kernels.dynamic_conv.triton.STORE_TAPS)")
    p.add_argument("--compile-profile", type=int, default=0, metavar="N",
                   help="cProfile the lowering and compiles: print the top N functions of each")
    p.add_argument("--devices", default="", help="comma-separated device counts (default: all)")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (FSDP x tensor)")
    p.add_argument("--profile", default="", help="directory: trace 2 steps and print the per-component table")
    p.add_argument("--compile-only", action="store_true", help="compile and run one step, time nothing")
    p.add_argument("--warm-compile", action="store_true",
                   help="compile the step a second time after jax.clear_caches(): the persistent cache's compile")
    p.add_argument("--compilation-cache", default="", metavar="DIR|off",
                   help="JAX's persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR, else "
                        "~/.cache/jetnemo_jax/jax_compilation_cache)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.gdr_block_v:
        from pallas_kernels.gated_delta_rule import triton as triton_gdr
        triton_gdr.default_block_v = lambda *_: args.gdr_block_v
    if args.conv_taps == "regenerate":
        from pallas_kernels.dynamic_conv import triton as triton_conv
        triton_conv.STORE_TAPS = False
    compilation_cache.setup(args.compilation_cache)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    counts = [int(x) for x in args.devices.split(",")] if args.devices else [jax.device_count()]
    rows = [bench(args, n, process_start() if i == 0 else time.time()) for i, n in enumerate(counts)]
    if args.compile_only:
        return
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
