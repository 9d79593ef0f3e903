"""JetBlock's value path (generator + generated causal conv + SiLU): the fused Pallas kernels vs pure XLA.

    python bench/dynamic_conv.py [--out results.json] [--check-only] [--profile] [--trace] [--shape 2b]
                                 [--rows 2b,4b] [--tokens 32768]

For the 2B and 4B shapes (B*T tokens, bf16, packed documents) times the forward and the forward+backward
of  v = dynamic_conv(u, kernels = silu(x W1) W2 + b2)  with the fused kernels ("pallas": impl="auto" on a GPU,
which takes "mosaic_gpu" for 16-bit inputs on sm_90, else "triton") and impl="reference", checks
that they agree, and reports the activation memory the forward keeps for the backward (the vjp residuals),
and each time as a fraction of the HBM and bf16 matmul rooflines. Bytes that must move (the kernels never
materialised): forward reads x, u, writes and reads h, writes v; forward+backward adds reading x, h, u, dv,
writing dx, du, and dh (written and read). Matmul FLOPs: forward 2N(H G + G Dv W), backward twice that
(the Pallas backward regenerates the kernels: one more G Dv W matmul, counted in its own column).
Times: the median of single calls, each synced (what one step sees, host latency included), and of calls
queued back to back (the device's time per call under sustained load; the profile's sweeps rank by it): the
median of 4 rounds of 40, pallas and reference alternating, since under sustained load an H100 running these
kernels reaches its power cap and lowers its clock, so the one timed second would see a different clock.
--profile times each piece at --shape (2B by default) and sweeps the kernels' block sizes (see `profile`);
--trace lists the GPU kernels of one forward+backward step at --shape with their times (see `kernel_times`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import synced_times

from jetnemo_jax import ops

SHAPES = {"2b": {"hidden": 1536, "gen": 384, "dv": 3072}, "4b": {"hidden": 2048, "gen": 512, "dv": 4096}}
W = 4
HBM_BYTES_S, BF16_FLOPS_S = 3.35e12, 989e12  # H100 SXM peaks


def make(rng, tokens, hidden, gen, dv, dtype, seq=4096):
    B, T = max(1, tokens // seq), min(seq, tokens)
    f = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, dtype)
    seg = np.cumsum(rng.random((B, T)) < 1 / 700, axis=1).astype(np.int32)  # ~700-token documents
    return {"x": f(B, T, hidden), "u": f(B, T, dv), "w1": f(hidden, gen, scale=hidden ** -0.5),
                "w2": f(gen, dv * W, scale=gen ** -0.5), "b2": f(dv * W, scale=0.1)}, jnp.asarray(seg)


def value_path(impl, seg):
    impl = "auto" if impl == "pallas" else impl  # the fused kernels, on a GPU

    def f(x, u, w1, w2, b2):
        h = jax.nn.silu(x @ w1)
        return ops.generated_dynamic_conv(u, h, w2, b2, segment_ids=seg, impl=impl)[0]
    return f


def fwd_bwd(impl, seg):
    f = value_path(impl, seg)

    def step(args, dy):
        y, vjp = jax.vjp(f, *args)
        return y, vjp(dy)
    return step


def timeit(fn, *args, iters=10):
    ts = synced_times(fn, *args, reps=iters)
    return statistics.median(ts), (max(ts) - min(ts))


def throughput(fn, *args, iters=20):
    """Seconds per call with `iters` calls queued back to back (one sync at the end): the device's time per
    call, without the host's dispatch and sync latency that a single synced call carries."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters


def alternating_queued(fns, args, rounds=4, iters=40):
    """{name: median seconds per call}: each fn's `throughput`, the fns taking turns for `rounds` rounds."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(throughput(fn, *args, iters=iters))
    return {name: statistics.median(t) for name, t in times.items()}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def residual_bytes(impl, seg, args):
    """Bytes the forward keeps for the backward, beyond the inputs themselves."""
    _, vjp = jax.vjp(value_path(impl, seg), *args)
    ids = {id(a) for a in args}
    leaves = [x for x in jax.tree.leaves(vjp) if hasattr(x, "nbytes") and id(x) not in ids]
    return sum(int(x.nbytes) for x in leaves)


def check(rng, dtype, tol):
    """pallas vs reference on a small odd shape, packed documents: outputs and every gradient."""
    args, seg = make(rng, 2 * 300, 96, 40, 200, dtype, seq=300)
    dy = jnp.asarray(rng.standard_normal((2, 300, 200)), dtype)
    out = {}
    ya, ga = jax.jit(fwd_bwd("pallas", seg))(tuple(args.values()), dy)
    yb, gb = jax.jit(fwd_bwd("reference", seg))(tuple(args.values()), dy)
    out["y"] = rel(ya, yb)
    for name, a, b in zip(args, ga, gb):
        out["d" + name] = rel(a, b)
    ok = all(v <= tol for v in out.values())
    return ok, out


def bench(rng, name, tokens):
    s = SHAPES[name]
    args, seg = make(rng, tokens, s["hidden"], s["gen"], s["dv"], jnp.bfloat16)
    a = tuple(args.values())
    N, H, G, Dv = tokens, s["hidden"], s["gen"], s["dv"]
    dy = jnp.asarray(rng.standard_normal(args["u"].shape), jnp.bfloat16)
    fwd_bytes = 2 * N * (H + 2 * G + 2 * Dv)
    bwd_bytes = 2 * N * (2 * H + 3 * G + 3 * Dv)
    mm = 2 * N * (H * G + G * Dv * W)
    row = {"shape": name, "tokens": N, "fwd_bytes": fwd_bytes, "fwd_bwd_bytes": fwd_bytes + bwd_bytes,
               "fwd_flops": mm, "fwd_bwd_flops": 3 * mm, "kernel_tensor_bytes": 2 * N * Dv * W}
    res, fns = {}, {}
    for impl in ("pallas", "reference"):
        fwd = jax.jit(value_path(impl, seg))
        step = jax.jit(fwd_bwd(impl, seg))
        tf, sf = timeit(fwd, *a)
        tb, sb = timeit(step, a, dy)
        fns[impl] = fwd, step
        res[impl] = {"fwd_ms": tf * 1e3, "fwd_spread_ms": sf * 1e3, "fwd_bwd_ms": tb * 1e3,
                     "fwd_bwd_spread_ms": sb * 1e3, "residual_bytes": residual_bytes(impl, seg, a),
                     "temp_bytes": step.lower(a, dy).compile().memory_analysis().temp_size_in_bytes}
        flops_b = 3 * mm + (2 * N * G * Dv * W if impl == "pallas" else 0)
        r = res[impl]
        r["fwd_hbm_frac"] = fwd_bytes / HBM_BYTES_S / tf
        r["fwd_bwd_hbm_frac"] = (fwd_bytes + bwd_bytes) / HBM_BYTES_S / tb
        r["fwd_mxu_frac"] = mm / BF16_FLOPS_S / tf
        r["fwd_bwd_mxu_frac"] = flops_b / BF16_FLOPS_S / tb
    for impl, t in alternating_queued({impl: fns[impl][0] for impl in fns}, a).items():
        res[impl]["fwd_queued_ms"] = t * 1e3
    for impl, t in alternating_queued({impl: fns[impl][1] for impl in fns}, (a, dy)).items():
        res[impl]["fwd_bwd_queued_ms"] = t * 1e3
    y1, g1 = jax.jit(fwd_bwd("pallas", seg))(a, dy)
    y2, g2 = jax.jit(fwd_bwd("reference", seg))(a, dy)
    row["bf16_rel_err"] = {"y": rel(y1, y2), **{"d" + k: rel(p, q) for k, p, q in zip(args, g1, g2)}}
    row.update(res)
    row["speedup_fwd"] = res["reference"]["fwd_ms"] / res["pallas"]["fwd_ms"]
    row["speedup_fwd_bwd"] = res["reference"]["fwd_bwd_ms"] / res["pallas"]["fwd_bwd_ms"]
    row["speedup_fwd_bwd_queued"] = res["reference"]["fwd_bwd_queued_ms"] / res["pallas"]["fwd_bwd_queued_ms"]
    return row


def _cfg_name(kind, cfg):
    return kind + " " + " ".join(f"{k}={v}" for k, v in cfg.items())


def _best(out, kind, time_one, configs, iters=5):
    """Times each config of one kernel (a failed compile is recorded, not fatal); returns the fastest."""
    best = None
    for cfg in configs:
        try:
            t = time_one(cfg, iters) * 1e3
        except Exception as e:  # noqa: BLE001 -- a config Triton cannot compile (registers, shared memory)
            out[_cfg_name(kind, cfg)] = repr(e)[:300]
            continue
        out[_cfg_name(kind, cfg)] = t
        print(f"{_cfg_name(kind, cfg)}: {t:.3f} ms", flush=True)
        if best is None or t < best[0]:
            best = (t, cfg)
    return best


_TAP_CONFIG = ("bt", "bd", "bg", "num_warps", "num_stages")
FWD_CONFIGS = [dict(zip(_TAP_CONFIG, c)) for c in ((128, 32, 64, 8, 3), (128, 64, 64, 8, 3), (64, 32, 64, 4, 3))]
GRAD_U_CONFIGS = [dict(zip(_TAP_CONFIG, c)) for c in ((128, 64, 64, 8, 3), (64, 32, 64, 4, 3), (128, 64, 32, 8, 4))]
GRAD_U_STORED_CONFIGS = [dict(bt=bt, bd=bd, num_warps=nw, num_stages=ns) for bt, bd, nw, ns in (
    (128, 64, 8, 3), (128, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 3))]
GRAD_H_CONFIGS = [dict(bt=bt, bg=bg, bk=bk, gtiles=gt, num_warps=nw, num_stages=ns) for bt, bg, bk, gt, nw, ns in (
    (64, 128, 64, 3, 4, 3), (64, 64, 64, 6, 4, 3), (64, 128, 64, 3, 4, 4), (128, 128, 64, 3, 8, 3))]
HOPPER_FWD_CONFIGS = [dict(bk=64, stages=3), dict(bk=32, stages=5), dict(bk=32, stages=6)]
HOPPER_GRAD_U_CONFIGS = [dict(bk=64, stages=3), dict(bk=32, stages=5), dict(bk=32, stages=6)]
HOPPER_GRAD_H_CONFIGS = [dict(bk=32, stages=5), dict(bk=64, stages=2), dict(bk=32, stages=5, cluster=1)]
HOPPER_GRAD_W2_CONFIGS = [dict(splits=None), dict(splits=1), dict(splits=2), dict(splits=None, cluster=1)]
GRAD_W2_CONFIGS = [dict(bn=bn, bg=bg, bd=bd, gtiles=gt, splits=sp, num_warps=nw, num_stages=ns)
                   for bn, bg, bd, gt, sp, nw, ns in ((64, 128, 64, 3, 4, 8, 3), (64, 128, 64, 3, 8, 8, 3),
                                                      (64, 128, 64, 3, 2, 8, 3), (64, 128, 64, 3, 4, 8, 4))]


def profile(rng, tokens, shape="2b", pieces=None):
    """Each piece of the value path at one shape, with a block-size sweep of every kernel: XLA's
    h @ W2 alone (the tap matmul at cuBLAS speed) and XLA's dh / dw2 over a materialised tap gradient (what
    the kernels replace), the forward and the three backward kernels (Triton, and on sm_90 also the Mosaic GPU
    ones). Leaves the fastest blocks of each kernel in `triton`'s and `mosaic_gpu`'s tables for
    the runs that follow. One matmul "unit" is 2 N G Dv W FLOPs (309 GFLOP at 2B): the forward does one, the
    Pallas backward three (two with the forward's taps stored). `pieces`: time only these (default all)."""
    from pallas_kernels.dynamic_conv import mosaic_gpu, triton
    s = SHAPES[shape]
    N, G, D, P = tokens, s["gen"], s["dv"], triton.PAD
    f = lambda *dims: jnp.asarray(rng.standard_normal(dims) * 0.1, jnp.bfloat16)
    h, w2t, u, dy, dc = f(N, G), f(W, G, D), f(N, D), f(N, D), f(N, D)
    b2t = jnp.zeros((W, D), jnp.float32)
    pos = jnp.asarray(np.arange(N + 2 * P) % 700, jnp.int32)
    unit = 2 * N * G * D * W
    out = {"unit_gflop": unit / 1e9}
    jt = lambda fn, *a: throughput(jax.jit(fn), *a) * 1e3
    out["xla_h_at_w2_ms"] = jt(lambda h, w: jnp.einsum("ng,wgd->wnd", h, w), h, w2t)
    dk = jnp.einsum("ng,wgd->wnd", h, w2t)
    out["xla_dh_from_dk_ms"] = jt(lambda dk, w: jnp.einsum("wnd,wgd->ng", dk, w, preferred_element_type=jnp.float32)
                                  .astype(jnp.bfloat16), dk, w2t)
    out["xla_dw2_from_dk_ms"] = jt(lambda h, dk: jnp.einsum("ng,wnd->wgd", h, dk, preferred_element_type=jnp.float32),
                                   h, dk)
    del dk
    print(out, flush=True)
    taps = jnp.concatenate([jnp.moveaxis(jnp.einsum("ng,wgd->wnd", h, w2t), 0, 1).reshape(N, W * D),
                            jnp.zeros((P, W * D), h.dtype)])
    piece_args = {"fwd": (h, w2t, b2t, u, pos), "grad_u": (h, w2t, b2t, dy, u, pos), "grad_h": (dc, u, w2t, pos),
                  "grad_w2": (h, dc, u, pos), "fwd_taps": (h, w2t, b2t, u, pos), "grad_u_stored": (taps, dy, u, pos)}
    # piece: (kernel function, its tile table, the extra arguments); fwd_taps is the forward storing its taps
    kernels = {"fwd": ("forward", "FWD", {}), "grad_u": ("grad_u", "GRAD_U", {}), "grad_h": ("grad_h", "GRAD_H", {}),
               "grad_w2": ("grad_w2", "GRAD_W2", {"width": W}), "fwd_taps": ("forward", "FWD", {"store_taps": True}),
               "grad_u_stored": ("grad_u_stored", "GRAD_U_STORED", {})}
    sweeps = [(triton, "", (FWD_CONFIGS, GRAD_U_CONFIGS, GRAD_H_CONFIGS, GRAD_W2_CONFIGS, FWD_CONFIGS,
                            GRAD_U_STORED_CONFIGS))]
    if mosaic_gpu.supported(jax.devices()[0], jnp.bfloat16) and pieces is None:
        sweeps.append((mosaic_gpu, "_hopper", (HOPPER_FWD_CONFIGS, HOPPER_GRAD_U_CONFIGS, HOPPER_GRAD_H_CONFIGS,
                                               HOPPER_GRAD_W2_CONFIGS)))
    runs = {}  # name: (module, its tile table's name, configs, make_fn)
    for module, suffix, configs in sweeps:
        for piece, piece_configs in zip(piece_args, configs):  # Mosaic GPU: the first four
            if pieces is not None and piece not in pieces:
                continue
            fname, table, extra = kernels[piece]
            runs[piece + suffix] = (module, table, piece_configs, lambda cfg, fn=getattr(module, fname), extra=extra,
                                    piece=piece: (lambda *a: fn(*a, **extra, **cfg), piece_args[piece]))
    for name, (module, table, configs, make_fn) in runs.items():
        def time_one(cfg, iters, make_fn=make_fn):
            fn, args = make_fn(cfg)
            return throughput(jax.jit(fn), *args, iters=4 * iters)
        best = _best(out, name, time_one, configs)
        if best is not None:
            setattr(module, table, dataclasses.replace(getattr(module, table), **best[1]))
            out[f"best {name}"] = {"ms": best[0], "cfg": best[1], "mxu_frac": unit / BF16_FLOPS_S / (best[0] * 1e-3)}
    return out


def kernel_times(rng, name, tokens, iters=3):
    """{impl: [(GPU kernel, ms per fwd+bwd step)]}: where the whole op's time goes, from a JAX profiler trace
    (perfetto JSON) of `iters` steps at one shape, each kernel's device time summed and averaged per step."""
    import collections
    import glob
    import gzip
    import tempfile
    s = SHAPES[name]
    args, seg = make(rng, tokens, s["hidden"], s["gen"], s["dv"], jnp.bfloat16)
    a = tuple(args.values())
    dy = jnp.asarray(rng.standard_normal(args["u"].shape), jnp.bfloat16)
    out = {}
    for impl in ("pallas", "reference"):
        step = jax.jit(fwd_bwd(impl, seg))
        jax.block_until_ready(step(a, dy))
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                for _ in range(iters):
                    jax.block_until_ready(step(a, dy))
            with gzip.open(glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[0]) as f:
                events = json.load(f)["traceEvents"]
        gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                    and "GPU" in str(e.get("args", {}).get("name", ""))}
        totals = collections.Counter()
        for e in events:
            if e.get("ph") == "X" and e.get("pid") in gpu_pids:
                totals[e["name"]] += e["dur"] / 1e3 / iters  # us -> ms per step
        out[impl] = totals.most_common()
    return out


def dump(report, path):
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="dynamic_conv_bench.json")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--trace", action="store_true", help="also print each GPU kernel's time in one fwd+bwd step")
    p.add_argument("--shape", choices=sorted(SHAPES), default="2b", help="the shape --profile and --trace use")
    p.add_argument("--rows", default=",".join(SHAPES), help="the shapes timed, comma-separated")
    p.add_argument("--profile", action="store_true",
                   help="first time each piece and sweep the kernels' block sizes; the runs after use the fastest")
    p.add_argument("--pieces", default="", help="with --profile: only these kernels (fwd,grad_u,grad_u_stored,"
                   "grad_h,grad_w2; Triton only)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "checks": {}, "rows": []}
    if args.profile:
        report["profile"] = profile(rng, args.tokens, args.shape, args.pieces.split(",") if args.pieces else None)
        dump(report, args.out)
    from pallas_kernels.dynamic_conv import mosaic_gpu, triton
    report["gpu_blocks"] = {f"{name}{suffix}": dataclasses.asdict(getattr(module, name.upper()))
                            for module, suffix in ((triton, ""), (mosaic_gpu, "_hopper"))
                            for name in ("fwd", "grad_u", "grad_h", "grad_w2")}
    print("blocks", report["gpu_blocks"], flush=True)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 2e-2)):
        with jax.default_matmul_precision("float32"):  # else the XLA path's float32 matmuls use TF32 on GPU
            ok, errs = check(rng, jnp.dtype(dtype), tol)
        report["checks"][dtype] = {"ok": ok, "rel_err": errs}
        print(f"check {dtype}: {'ok' if ok else 'FAILED'} {errs}", flush=True)
    if not args.check_only:
        for name in args.rows.split(","):
            row = bench(rng, name, args.tokens)
            report["rows"].append(row)
            dump(report, args.out)
            print(json.dumps(row), flush=True)
        print(f"\n{'shape':5} {'impl':9} {'fwd ms':>8} {'f+b ms':>8} {'fwd HBM':>8} {'f+b HBM':>8} "
              f"{'f+b MXU':>8} {'resid MiB':>10}")
        for row in report["rows"]:
            for impl in ("pallas", "reference"):
                r = row[impl]
                print(f"{row['shape']:5} {impl:9} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} {r['fwd_hbm_frac']:8.1%} "
                      f"{r['fwd_bwd_hbm_frac']:8.1%} {r['fwd_bwd_mxu_frac']:8.1%} {r['residual_bytes'] / 2**20:10.1f}")
            print(f"{row['shape']:5} speedup fwd {row['speedup_fwd']:.2f}x, fwd+bwd {row['speedup_fwd_bwd']:.2f}x "
                  f"(queued back to back: {row['pallas']['fwd_bwd_queued_ms']:.3f} vs "
                  f"{row['reference']['fwd_bwd_queued_ms']:.3f} ms, {row['speedup_fwd_bwd_queued']:.2f}x)")
    if args.trace:
        report[f"kernel_times_{args.shape}"] = kernel_times(rng, args.shape, args.tokens)
        for impl, rows in report[f"kernel_times_{args.shape}"].items():
            print(f"\n{impl}: {sum(ms for _, ms in rows):.3f} ms of GPU kernels per fwd+bwd step ({args.shape})")
            for kernel, ms in rows[:25]:
                print(f"  {ms:8.3f}  {kernel[:110]}")
    dump(report, args.out)
    if not all(c["ok"] for c in report["checks"].values()):
        raise SystemExit("pallas and reference disagree")


if __name__ == "__main__":
    main()
