"""Softmax attention of the 2B model's attention layers, forward+backward: the XLA path with a materialised
[T, T] mask (layers/attention.py) against cuDNN flash attention through jax.nn.dot_product_attention.

    python bench/attention_impls.py [--batch 2 --seq 4096 --window 1152] [--out results/x.json]

Prints each variant's median time and its relative error against the XLA path (output and gradients).
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from timing import synced_times

from jetnemo_jax.layers.attention import attention_mask


def timed(fn, *args, reps=10):
    return 1e3 * statistics.median(synced_times(fn, *args, reps=reps, warmup=1))


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=1152)
    p.add_argument("--out", default="")
    a = p.parse_args()
    B, T, H, K, D = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, K, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, K, D), jnp.bfloat16)
    do = jax.random.normal(ks[3], (B, T, H, D), jnp.bfloat16)
    doc = jnp.zeros((B, T), jnp.int32)  # one document per row, as the bench and the anchor
    scale = D ** -0.5

    def variants(window):
        xla = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, mask=attention_mask(doc, window, T), scale=scale, implementation="xla")
        lw = None if window is None else (window - 1, 0)
        cudnn = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, scale=scale, is_causal=True, local_window_size=lw, implementation="cudnn")
        same_doc = (doc[:, :, None] == doc[:, None, :])[:, None]
        cudnn_doc = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, mask=same_doc, scale=scale, is_causal=True, local_window_size=lw, implementation="cudnn")
        return {"xla (mask [T,T])": xla, "cudnn causal": cudnn, "cudnn causal + doc mask": cudnn_doc}

    rows = []
    for window in (None, a.window):
        ref = None
        for name, f in variants(window).items():
            fwd = jax.jit(f)
            fb = jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](do))
            try:
                out, grads = fwd(q, k, v), fb(q, k, v)
                row = {"window": window, "impl": name, "fwd_ms": timed(fwd, q, k, v),
                       "fwd_bwd_ms": timed(fb, q, k, v)}
            except Exception as e:  # noqa: BLE001 - an unsupported variant is a result, not a failure
                rows.append({"window": window, "impl": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(rows[-1], flush=True)
                continue
            if ref is None:
                ref = (out, grads)
            row["rel_err_out"] = rel(out, ref[0])
            row["rel_err_grads"] = max(rel(g, r) for g, r in zip(grads, ref[1]))
            rows.append(row)
            print(row, flush=True)
    print(f"{'window':>7} {'impl':<26}{'fwd ms':>8}{'f+b ms':>8}{'err out':>9}{'err grad':>9}  "
          f"{jax.devices()[0].device_kind}")
    for r in rows:
        if "error" in r:
            print(f"{str(r['window']):>7} {r['impl']:<26} {r['error'][:80]}")
        else:
            print(f"{str(r['window']):>7} {r['impl']:<26}{r['fwd_ms']:>8.2f}{r['fwd_bwd_ms']:>8.2f}"
                  f"{r['rel_err_out']:>9.1e}{r['rel_err_grads']:>9.1e}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
