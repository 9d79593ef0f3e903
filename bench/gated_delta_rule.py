"""Gated delta rule on one GPU: the Pallas-Triton kernels (impl="auto" -> "triton") against the
pure-XLA chunked op (impl="xla", labelled "chunked"), fla's `chunk_gated_delta_rule` (torch + Triton), fla's
same kernels launched from JAX through jax-triton (impl="fla", labelled "fla_jax", autotuned over fla's configs
as fla does) and jax-linear-attention's Mosaic GPU kernel, each when importable (else skipped with the reason).

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/gated_delta_rule.py --out gdr.json
    python bench/gated_delta_rule.py --check      # first run the GPU correctness tests (pytest)

Shapes (B, T, H, dk, dv): the 2B JetBlock (8, 4096, 12, 96, 256), the 4B one (4, 8192, 16, 128, 256), a long
single sequence (1, 32768, 12, 96, 256) and a JetBlock of the 2B train step at B=2 ("2b_step"). fla's PyTorch
row runs in a child process (torch and JAX in one process share the CUDA context). bf16 q, k, v, beta; fp32 g;
the L2 norm of q and k inside every implementation (fla: use_qk_l2norm_in_kernel); no initial state. Forward
and forward+backward (the gradient of sum(o * do)) are timed after a warm-up as the median of --reps runs
(block_until_ready / torch.cuda.synchronize). Roofline: the fewest bytes (every input read once, every output
written once) over the measured device-to-device copy bandwidth, and FLOPs from the spec's cost model.

fla 0.6.0 refuses its gated backward on Hopper with Triton 3.4-3.7.0 (a miscompile, fla issue #640); the
bench lifts that check (`chunk_o.TRITON_ABOVE_3_7_1 = True`) to time it, so fla's backward numbers are
timings of a kernel its authors flag as possibly wrong on this stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from timing import synced_times

from jetnemo_jax import ops
from pallas_kernels.gated_delta_rule import triton as triton_gdr

SHAPES = {"2b": (8, 4096, 12, 96, 256), "4b": (4, 8192, 16, 128, 256), "long": (1, 32768, 12, 96, 256),
          "2b_step": (2, 4096, 12, 96, 256),  # a JetBlock of the 2B stage-1 train step (B=2)
          "2b_step_b4": (4, 4096, 12, 96, 256)}  # the same at B=4 (remat none, the headline step)
C = 64


def parse_block_v(text: str) -> int | tuple[int, int]:
    """argparse type of a dv-block choice of the Triton kernels: W (every kernel) or S/P (the serial passes at
    S, the chunk-parallel kernels at P), each a power of two >= 16."""
    parts = text.split("/")
    if len(parts) > 2 or not all(p.isdigit() and int(p) >= 16 and int(p) & (int(p) - 1) == 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected W or S/P, powers of two >= 16, got {text!r}")
    widths = tuple(int(p) for p in parts)
    return widths if len(widths) == 2 else widths[0]


def cost(B, T, H, dk, dv):
    """FLOPs (spec: forward 6 dk dv + 3 C dk + 4 C dv per token and head, backward ~2x) and the fewest
    bytes: bf16 q, k, v, beta, o (and do, dq, dk, dv, dbeta), fp32 g (and dg)."""
    n = B * T * H
    fwd_flops = n * (6 * dk * dv + 3 * C * dk + 4 * C * dv)
    fwd_bytes = n * (2 * (2 * dk + dv) + 4 + 2 + 2 * dv)
    bwd_bytes = n * (2 * (2 * dk + dv) + 4 + 2 + 2 * dv + 2 * (2 * dk + dv) + 4 + 2)
    return dict(fwd_flops=fwd_flops, fwdbwd_flops=3 * fwd_flops, fwd_bytes=fwd_bytes,
                fwdbwd_bytes=fwd_bytes + bwd_bytes)


def median_ms(fn, sync, reps):
    return 1e3 * statistics.median(synced_times(fn, reps=reps, sync=sync))


def copy_bandwidth():
    x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda x: x * 1.0001)
    ms = median_ms(lambda: f(x), jax.block_until_ready, 10)
    return 2 * x.nbytes / (ms * 1e-3)


def jax_inputs(B, T, H, dk, dv, seed=0):
    r = np.random.default_rng(seed)
    bf = lambda *s: jnp.asarray(r.standard_normal(s, np.float32), jnp.bfloat16)
    return dict(q=bf(B, T, H, dk), k=bf(B, T, H, dk), v=bf(B, T, H, dv),
                g=jnp.asarray(np.log(r.uniform(0.8, 1.0, (B, T, H))), jnp.float32),
                beta=jnp.asarray(r.uniform(0.05, 1.0, (B, T, H)), jnp.bfloat16)), bf(B, T, H, dv)


def jax_runners(fn, x, do):
    """Forward and forward+backward of o = fn(q, k, v, g, beta) as jitted thunks."""
    fwd = jax.jit(lambda x: fn(**x))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(**x).astype(jnp.float32) * do.astype(jnp.float32))))
    return (lambda: fwd(x)), (lambda: grad(x))


def ours(block_v=None):
    if block_v is None:
        return lambda **x: ops.gated_delta_rule(**x, impl="triton")[0]
    return lambda q, k, v, g, beta: triton_gdr.gated_delta_rule(
        q, k, v, g, beta, q.shape[-1] ** -0.5, jnp.zeros((*q.shape[:1], q.shape[2], q.shape[3], v.shape[3]),
                                                          jnp.float32),
        jnp.zeros(q.shape[:2], bool), l2norm=True, interpret=False, block_v=block_v)[0]


def jla_fn():
    from jla.ops.mosaic_gpu.gated_delta_rule import gated_delta_rule, supports_gated_delta_rule

    def fn(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)[0]
    return fn, supports_gated_delta_rule


def fla_runners(B, T, H, dk, dv, reps):
    import fla.ops.common.chunk_o as chunk_o
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    chunk_o.TRITON_ABOVE_3_7_1 = True  # see the module docstring
    dev = "cuda"
    mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16)
    q, k, v = mk(B, T, H, dk), mk(B, T, H, dk), mk(B, T, H, dv)
    g = torch.log(torch.empty(B, T, H, device=dev).uniform_(0.8, 1.0))
    beta = torch.empty(B, T, H, device=dev).uniform_(0.05, 1.0).to(torch.bfloat16)
    do = mk(B, T, H, dv)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]
    run = lambda: chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

    def fwd():
        with torch.no_grad():
            return run()

    def fwdbwd():
        for x in leaves:
            x.grad = None
        run().backward(do)
        return q.grad

    sync = lambda _: torch.cuda.synchronize()
    return median_ms(fwd, sync, reps), median_ms(fwdbwd, sync, reps)


def fla_in_child(name, reps):
    """fla's PyTorch row in a process of its own: beside JAX in one process, torch and JAX share the CUDA
    context (an illegal address in fla's call on this stack then failed every later JAX row: 2026-12-07)."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if env.get("TRITON_CACHE_DIR") == "":  # set so by jax-triton (impl="fla"); Triton's own launcher refuses it
        del env["TRITON_CACHE_DIR"]
    r = subprocess.run([sys.executable, __file__, "--fla-torch", name, "--reps", str(reps)], capture_output=True,
                       text=True, env=env)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode != 0 or not last.startswith("{"):
        raise RuntimeError(f"exit {r.returncode}: " + " | ".join(r.stderr.strip().splitlines()[-3:]))
    return json.loads(last)


def profile_kernels(name, reps, warps, block_vs, only, stages=(None,)):
    """Each kernel of the op alone (bf16; those named in `only`, or all) at num_warps in `warps`, pipeline
    stages in `stages` (None: the kernels' default) and the default dv block, then at the other dv blocks in
    `block_vs`: where time goes."""
    from pallas_kernels.gated_delta_rule import triton_backward as kern_bwd
    from pallas_kernels.gated_delta_rule import triton_forward as kern

    B, T, H, dk, dv = SHAPES[name]
    x, do = jax_inputs(B, T, H, dk, dv, seed=1)
    q, k, v, g, beta = x.values()
    starts = jnp.zeros((B, T), jnp.float32)
    h0 = jnp.zeros((B, H, dk, dv), jnp.float32)
    bv0 = triton_gdr.default_block_v(B * H, dk, dv)  # (serial passes, chunk-parallel kernels)
    scale, fd = dk ** -0.5, jnp.bfloat16
    t, w, u, kd, e = kern.prepare(k, v, g, beta, starts, l2norm=True, fast_dtype=fd, block_v=bv0[1])
    st, vn, fin = kern.chunk_states(w, u, kd, e, h0, block_v=bv0[0])
    eq, dvl = kern_bwd.prepare_backward(q, k, g, starts, do, scale=scale, l2norm=True, fast_dtype=fd,
                                        block_v=bv0[1])
    dst, dvn, _ = kern_bwd.state_grads(w, kd, e, eq, dvl, do, fin, block_v=bv0[0])

    def runs(nw, bv, ns):
        widths = (bv, bv) if bv else bv0
        serial, flags = (dict(block_v=b, num_warps=nw, num_stages=ns) for b in widths)
        return {
            "prepare": lambda: kern.prepare(k, v, g, beta, starts, l2norm=True, fast_dtype=fd, **flags),
            "prepare_backward": lambda: kern_bwd.prepare_backward(q, k, g, starts, do, scale=scale, l2norm=True,
                                                                  fast_dtype=fd, **flags),
            "chunk_states": lambda: kern.chunk_states(w, u, kd, e, h0, **serial),
            "output": lambda: kern.output(q, k, v, g, starts, vn, st, scale=scale, l2norm=True, **flags),
            "state_grads": lambda: kern_bwd.state_grads(w, kd, e, eq, dvl, do, fin, **serial),
            "input_grads": lambda: kern_bwd.input_grads(q, k, v, g, beta, starts, t, vn, dvn, st, do, dst,
                                                        scale=scale, l2norm=True, **flags),
        }

    out = {}
    plan = [(bv, nw, ns) for bv in [None, *block_vs] for nw in warps for ns in stages]  # None: the defaults
    for bv, nw, ns in plan:
        for kname, fn in runs(nw, bv, ns).items():
            if only and kname not in only:
                continue
            key = f"{kname}_w{nw}_bv{bv or 'default'}" + (f"_s{ns}" if ns else "")
            try:
                out[key] = median_ms(fn, jax.block_until_ready, reps)
            except Exception as e:  # noqa: BLE001
                out[key] = f"{type(e).__name__}: {e}"[:200]
            print(name, key, out[key], flush=True)
    return out


def rel(a, b):
    a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_shape(name, reps, block_vs, wanted):
    B, T, H, dk, dv = SHAPES[name]
    row = dict(shape=dict(B=B, T=T, H=H, dk=dk, dv=dv), **cost(B, T, H, dk, dv), ms={}, skipped={})
    x, do = jax_inputs(B, T, H, dk, dv)
    sync = jax.block_until_ready
    impls = {"ours": ours(), **{f"ours_bv{bv if isinstance(bv, int) else '/'.join(map(str, bv))}": ours(bv)
                                for bv in block_vs}}
    if "chunked" in wanted:
        impls["chunked"] = lambda **x: ops.gated_delta_rule(**x, impl="xla")[0]
    if "fla_jax" in wanted:
        impls["fla_jax"] = lambda **x: ops.gated_delta_rule(**x, impl="fla")[0]
    try:
        if "jla" not in wanted:
            raise RuntimeError("not asked for (--impls)")
        fn, supports = jla_fn()
        if supports(*x.values()):
            impls["jla"] = fn
        else:
            row["skipped"]["jla"] = "supports_gated_delta_rule() is False (head dims K, V not in its list)"
    except Exception as e:  # noqa: BLE001 - any import failure just skips the baseline
        row["skipped"]["jla"] = f"{type(e).__name__}: {e}"[:300]
    for impl, fn in impls.items():
        try:
            f, fb = jax_runners(fn, x, do)
            row["ms"][impl] = dict(fwd=median_ms(f, sync, reps), fwdbwd=median_ms(fb, sync, reps))
        except Exception as e:  # noqa: BLE001
            row["skipped"][impl] = f"{type(e).__name__}: {e}"[:300]
        print(name, impl, row["ms"].get(impl, row["skipped"].get(impl)), flush=True)
    try:
        if "fla" not in wanted:
            raise RuntimeError("not asked for (--impls)")
        row["ms"]["fla"] = fla_in_child(name, reps)
    except Exception as e:  # noqa: BLE001
        row["skipped"]["fla"] = f"{type(e).__name__}: {e}"[:300]
    print(name, "fla", row["ms"].get("fla", row["skipped"].get("fla")), flush=True)
    for impl in ("ours", "fla_jax"):  # the kernels against the XLA op on this shape's inputs, o and gradients
        if "chunked" in row["ms"] and impl in row["ms"]:
            o1, o2 = jax.jit(impls[impl])(**x), jax.jit(impls["chunked"])(**x)
            g1, g2 = (jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(**x).astype(jnp.float32) * do.astype(jnp.float32))))(x)
                      for f in (impls[impl], impls["chunked"]))
            key = "rel_err_vs_chunked" if impl == "ours" else f"{impl}_rel_err_vs_chunked"
            row[key] = {"o": rel(o1, o2), **{f"d{n}": rel(g1[n], g2[n]) for n in g1}}
    return row


def table(rows, bw):
    lines = [f"{'shape':6} {'impl':10} {'fwd ms':>8} {'f+b ms':>8} {'fwd %HBM':>9} {'f+b %HBM':>9}"]
    for name, r in rows.items():
        if name == "kernels":
            continue
        for impl, t in r["ms"].items():
            lines.append(f"{name:6} {impl:10} {t['fwd']:8.3f} {t['fwdbwd']:8.3f} "
                         f"{100 * r['fwd_bytes'] / (t['fwd'] * 1e-3) / bw:8.1f}% "
                         f"{100 * r['fwdbwd_bytes'] / (t['fwdbwd'] * 1e-3) / bw:8.1f}%")
        ms = r["ms"]
        for base in ("fla", "fla_jax", "jla", "chunked"):
            if "ours" in ms and base in ms:
                lines.append(f"{name:6} ours/{base}: fwd {ms['ours']['fwd'] / ms[base]['fwd']:.2f}, "
                             f"f+b {ms['ours']['fwdbwd'] / ms[base]['fwdbwd']:.2f}")
        for impl, why in r["skipped"].items():
            lines.append(f"{name:6} {impl} skipped: {why}")
        for key in ("rel_err_vs_chunked", "fla_jax_rel_err_vs_chunked"):
            if key in r:
                lines.append(f"{name:6} {key.replace('_', ' ')}: " + ", ".join(f"{k} {v:.1e}" for k, v in
                                                                              r[key].items()))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2b,4b,long")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--impls", default="fla,fla_jax,jla,chunked", help="baselines to time beside the kernels")
    p.add_argument("--block-v", default="32,128", help="other dv-block sizes of the kernels to time; "
                   "S/P: the serial passes at S, the chunk-parallel kernels at P",
                   type=lambda text: [parse_block_v(b) for b in text.split(",") if b])
    p.add_argument("--check", action="store_true", help="run the GPU correctness tests first")
    p.add_argument("--profile-warps", default="", help="first time each kernel alone at these num_warps "
                   "(on the first shape; and at each --block-v)")
    p.add_argument("--profile-kernels", default="", help="profile only these kernels (comma-separated names)")
    p.add_argument("--profile-stages", default="", help="profile at these num_stages (default: the kernels')")
    p.add_argument("--out", default="gdr_bench.json")
    p.add_argument("--fla-torch", default="", help=argparse.SUPPRESS)  # the child of fla_in_child
    args = p.parse_args()
    if args.fla_torch:
        print(json.dumps(dict(zip(("fwd", "fwdbwd"), fla_runners(*SHAPES[args.fla_torch], args.reps)))))
        return
    logging.basicConfig(level=logging.INFO)  # ops.backends logs the row impl="auto" picked
    if args.check:
        folder = "tests/pallas_kernels/gated_delta_rule"
        tests = [f"{folder}/test_triton.py", f"{folder}/test_fla.py", "-k", "not shard_map and not lowers"]
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests])
        print("GPU correctness tests:", "passed" if rc == 0 else f"FAILED (exit {rc})", flush=True)
    device = jax.devices()[0]
    bw = copy_bandwidth()
    print(f"device {device.device_kind}, jax {jax.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    block_vs = args.block_v
    rows = {}
    if args.profile_warps:
        warps = [int(w) for w in args.profile_warps.split(",")]
        first = args.shapes.split(",")[0]
        only = [k for k in args.profile_kernels.split(",") if k]
        stages = [int(n) for n in args.profile_stages.split(",") if n] or [None]
        widths = [b for b in block_vs if isinstance(b, int)]  # one kernel at a time: no serial/parallel split
        rows["kernels"] = {first: profile_kernels(first, args.reps, warps, widths, only, stages)}
    for name in args.shapes.split(","):
        rows[name] = bench_shape(name, args.reps, block_vs, args.impls.split(","))
        with open(args.out, "w") as f:
            json.dump(dict(device=device.device_kind, jax=jax.__version__, copy_bandwidth=bw, rows=rows), f,
                      indent=1)
    print(table(rows, bw))


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
