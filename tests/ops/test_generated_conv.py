"""ops.generated_dynamic_conv: the fused Pallas kernels (GPU Triton and TPU Mosaic, interpreted on CPU)
against a float64 torch oracle, forward and the gradients of every input, packed documents, caches, T < W.

Tolerances: float32 inputs 1e-5 relative (interpret mode computes the kernels' float32 arithmetic exactly;
measured ~5e-7); 16-bit inputs 2e-2 on the output, 3e-2 on gradients (bf16 rounding of v and of the
regenerated taps in the backward, as the XLA path rounds its kernels).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetnemo_jax import ops
from jetnemo_jax.ops import dispatch, pallas_conv, pallas_gdr
from tests.oracles import doc_starts, rel_err

TOL = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 3e-2)}


def oracle(u, h, w2, b2, seg, cache, dy):
    """float64 torch: y = silu(conv(u, h @ w2 + b2)) and the gradients of sum(y * dy)."""
    import torch

    t64 = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)
    u_, h_, w2_, b2_ = map(t64, (u, h, w2, b2))
    B, T, D = u_.shape
    W = w2_.shape[1] // D
    c_ = t64(np.zeros((B, W - 1, D)) if cache is None else cache)
    k = (h_ @ w2_ + b2_).reshape(B, T, D, W)
    up = torch.cat([c_, u_], 1)
    starts = doc_starts(seg, B, T)
    rows = []
    for b in range(B):
        doc_start, out = -(W - 1), []
        for t in range(T):
            doc_start = t if starts[b, t] else doc_start
            taps = [k[b, t, :, w] * up[b, t + w] for w in range(W) if t - W + 1 + w >= doc_start]
            out.append(sum(taps))
        rows.append(torch.stack(out))
    y = torch.nn.functional.silu(torch.stack(rows))
    (y * torch.tensor(np.asarray(dy, np.float64))).sum().backward()
    grads = [x.grad.numpy() for x in (u_, h_, w2_, b2_)] + ([c_.grad.numpy()] if cache is not None else [])
    return y.detach().numpy(), grads


def inputs(rng, B, T, G, D, W, dtype, packed, with_cache):
    f = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, dtype)
    seg = None
    if packed:  # a one-token document, a boundary at t = 1, documents of random length
        seg = np.cumsum(rng.random((B, T)) < 0.15, axis=1).astype(np.int32)
        seg[0, : min(T, 3)] = [0, 1, 1][: min(T, 3)]
    cache = f(B, W - 1, D) if with_cache else None
    return f(B, T, D), f(B, T, G), f(G, D * W, scale=G ** -0.5), f(D * W, scale=0.5), seg, cache


def run(backend, u, h, w2, b2, seg, cache):
    """y and the vjp through pallas_conv directly, so either backend's kernels run (interpreted)."""
    B, T, _ = u.shape
    doc_ids = dispatch.doc_ids_from_segments(None if seg is None else jnp.asarray(seg), (B, T))
    f = lambda u, h, w2, b2, cache: pallas_conv.generated_conv(u, h, w2, b2, doc_ids, cache, backend=backend,
                                                               interpret=True)
    if cache is None:
        return jax.vjp(lambda u, h, w2, b2: f(u, h, w2, b2, None), u, h, w2, b2)
    return jax.vjp(f, u, h, w2, b2, cache)


# backend "cpu" runs the GPU (Triton) kernels interpreted, "tpu" the Mosaic TPU ones, "hopper" the Mosaic GPU
# ones (16-bit only; unclustered: the interpreter has no cluster barriers).
@pytest.mark.parametrize("backend,dtype,B,T,G,D,W,packed,with_cache", [
    ("cpu", "float32", 2, 37, 24, 40, 4, True, False),
    ("cpu", "bfloat16", 1, 70, 40, 136, 4, True, True),
    ("cpu", "float32", 2, 2, 16, 8, 4, False, True),
    ("cpu", "float32", 1, 5, 8, 16, 3, True, False),  # W = 3: the wide matmul pads the taps to 4
    ("tpu", "float32", 2, 45, 24, 40, 4, True, True),
    ("tpu", "bfloat16", 1, 130, 130, 24, 4, True, False),
    ("tpu", "float32", 1, 3, 8, 16, 3, True, False),
    ("hopper", "bfloat16", 1, 70, 40, 136, 4, True, True),
    ("hopper", "bfloat16", 2, 150, 130, 64, 3, True, False),
])
def test_matches_float64(rng, backend, dtype, B, T, G, D, W, packed, with_cache):
    u, h, w2, b2, seg, cache = inputs(rng, B, T, G, D, W, dtype, packed, with_cache)
    y, vjp = run(backend, u, h, w2, b2, seg, cache)
    dy = jnp.asarray(rng.standard_normal(y.shape), dtype)
    grads = vjp(dy)
    y_ref, grads_ref = oracle(u, h, w2, b2, seg, cache, dy)
    tol_y, tol_g = TOL[dtype]
    assert y.dtype == jnp.dtype(dtype) and rel_err(y, y_ref) <= tol_y
    for name, g, g_ref in zip(("du", "dh", "dw2", "db2", "dcache"), grads, grads_ref):
        assert g.dtype == jnp.dtype(dtype), name
        assert rel_err(g, g_ref) <= tol_g, name


def test_mosaic_gpu_kernels_only_for_16_bit_on_sm90():
    from types import SimpleNamespace

    from pallas_kernels.dynamic_conv import hopper

    gpu = lambda cc: SimpleNamespace(platform="gpu", compute_capability=cc)
    assert hopper.supported(gpu("9.0"), jnp.bfloat16) and hopper.supported(gpu("9.0"), jnp.float16)
    assert not hopper.supported(gpu("9.0"), jnp.float32)
    assert not any(hopper.supported(gpu(cc), jnp.bfloat16) for cc in ("8.0", "10.0", "12.0"))
    assert pallas_conv.kernel_backend("gpu", jnp.bfloat16) == "gpu"  # this host's device is a CPU


def test_mosaic_grad_w2_splits_rows_until_the_last_wave_fills():
    from pallas_kernels.dynamic_conv import hopper

    # an H100 holds 66 CTA pairs; a split has 2 taps x D/64 channel blocks of programs (2B: 96, 4B: 128)
    assert hopper._row_splits(96, 66, 512) == 2  # one split: 1.45 of 2 waves
    assert hopper._row_splits(128, 66, 512) == 1  # 1.94 of 2
    assert hopper._row_splits(96, 66, 1) == 1  # a single row tile cannot split
    assert hopper._row_splits(3, 66, 1024) == 8  # at most 8


def test_no_gradient_crosses_documents(rng):
    u, h, w2, b2, _, _ = inputs(rng, 1, 20, 16, 8, 4, "float32", False, False)
    seg = np.array([[0] * 9 + [1] * 11], np.int32)
    _, vjp = run("cpu", u, h, w2, b2, seg, None)
    dy = jnp.zeros((1, 20, 8)).at[:, 9:].set(1.0)  # only the second document's outputs
    du, dh = vjp(dy)[:2]
    assert float(jnp.abs(du[0, :9]).max()) == 0.0 and float(jnp.abs(dh[0, :9]).max()) == 0.0
    assert float(jnp.abs(du[0, 9:]).min()) > 0.0


def test_public_op_prefill_cache_and_decode(rng):
    """impl="pallas" through ops: prefill in two pieces (the first shorter than W-1) equals one pass, its
    cache continues with the XLA decode step, and impl="reference" agrees."""
    u, h, w2, b2, _, _ = inputs(rng, 2, 12, 16, 24, 4, "float32", False, False)
    conv = lambda a, b, **kw: ops.generated_dynamic_conv(u[:, a:b], h[:, a:b], w2, b2, impl="pallas", **kw)
    y_full, _ = conv(0, 11)
    _, cache = conv(0, 2, output_final_cache=True)
    y_rest, cache = conv(2, 11, cache=cache, output_final_cache=True)
    assert rel_err(y_rest, y_full[:, 2:]) <= 1e-5
    k_last = (h[:, 11] @ w2 + b2).reshape(2, 24, 4)
    y_step, _ = ops.dynamic_conv_step(u[:, 11], k_last, cache)
    y_all, _ = ops.generated_dynamic_conv(u, h, w2, b2, impl="reference")
    assert rel_err(y_step, y_all[:, 11]) <= 1e-5
    assert rel_err(y_full, y_all[:, :11]) <= 1e-5


def test_auto_is_xla_on_cpu_and_the_kernels_on_gpu(rng, monkeypatch):
    u, h, w2, b2, _, _ = inputs(rng, 1, 5, 16, 8, 4, "float32", False, False)
    jaxpr = lambda impl: str(jax.make_jaxpr(lambda *a: ops.generated_dynamic_conv(*a, impl=impl))(u, h, w2, b2))
    assert "pallas_call" not in jaxpr("auto") and "pallas_call" in jaxpr("pallas")
    monkeypatch.setattr(pallas_gdr, "platform", lambda mesh: "gpu")
    assert "pallas_call" in jaxpr("auto")
    with pytest.raises(ValueError, match="expected"):
        ops.generated_dynamic_conv(u, h, w2[:, :-1], b2, impl="pallas")


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jetnemo_jax import ops
from tests.oracles import rel_err
from tests.ops.test_generated_conv import inputs

rng = np.random.default_rng({seed})
u, h, w2, b2, seg, cache = inputs(rng, 4, 29, 16, 48, 4, "float32", True, True)
seg = jnp.asarray(seg)

def loss(u, h, w2, b2, cache, mesh):
    y, c = ops.generated_dynamic_conv(u, h, w2, b2, segment_ids=seg, cache=cache, output_final_cache=True,
                                      impl="pallas", mesh=mesh)
    return jnp.sum(y * jnp.cos(y)) + jnp.sum(c), y

grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True), static_argnums=5)
ref = grad(u, h, w2, b2, cache, None)
mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
assert "shard_map" in str(jax.make_jaxpr(lambda *a: loss(*a, mesh))(u, h, w2, b2, cache))
put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
args = (put(u, P("data", None, "tensor")), put(h, P("data")), put(w2, P(None, "tensor")), put(b2, P("tensor")),
        put(cache, P("data", None, "tensor")))
out = grad(*args, mesh)
errs = [rel_err(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))]
print("max rel err", max(errs))
assert max(errs) <= 1e-5, errs
"""


def test_kernels_run_per_shard_on_a_mesh(rng):
    """Rows over "data", channels over "tensor" on 4 host devices: the same outputs and gradients of every
    input as one device (w2, b2 replicated over "data" and h over "tensor" get their cotangents summed)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _SHARDED.format(seed=int(rng.integers(2**31)))], cwd=root,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_gpu_kernels_with_other_blocks(rng, monkeypatch):
    """The GPU kernels' block options other than the defaults (several G blocks per program, split token
    rows, other tiles) give the same gradients: float32, G 200 (two 128-wide G blocks after padding)."""
    from pallas_kernels.dynamic_conv import gpu

    for table, cfg in ((gpu.FWD, {"bt": 64, "bd": 64, "bg": 128}), (gpu.GRAD_U, {"bt": 64, "bg": 64}),
                       (gpu.GRAD_H, {"bt": 128, "bk": 32, "gtiles": 2}),
                       (gpu.GRAD_W2, {"bn": 32, "bd": 128, "gtiles": 2, "splits": 3})):
        for k, v in cfg.items():
            monkeypatch.setitem(table, k, v)
    u, h, w2, b2, seg, cache = inputs(rng, 2, 75, 200, 72, 4, "float32", True, True)
    y, vjp = run("cpu", u, h, w2, b2, seg, cache)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    y_ref, grads_ref = oracle(u, h, w2, b2, seg, cache, dy)
    assert rel_err(y, y_ref) <= 1e-5
    for name, g, g_ref in zip(("du", "dh", "dw2", "db2", "dcache"), vjp(dy), grads_ref):
        assert rel_err(g, g_ref) <= 1e-5, name


def test_mosaic_gpu_backward_takes_triton_grad_h_beyond_g_512(monkeypatch):
    """Mosaic grad_h splits G between two warpgroups of at most one 256-wide wgmma each; a larger (padded) G
    takes the Triton grad_h."""
    from pallas_kernels.dynamic_conv import gpu, hopper

    calls = []
    monkeypatch.setattr(hopper, "grad_u", lambda *a, **k: (None, None))
    monkeypatch.setattr(hopper, "grad_w2", lambda *a, **k: (None, None))
    monkeypatch.setattr(hopper, "grad_h", lambda *a, **k: calls.append("mosaic"))
    monkeypatch.setattr(gpu, "grad_h", lambda *a, **k: calls.append("triton"))
    u = jnp.zeros((8, 64), jnp.bfloat16)
    for G in (512, 576):
        hopper.backward(None, jnp.zeros((4, G, 64), jnp.bfloat16), None, u, None, None, u)
    assert calls == ["mosaic", "triton"]


def test_mosaic_gpu_kernels_with_other_blocks(rng, monkeypatch):
    """The Mosaic GPU kernels at other K steps, pipeline depths and row splits (bf16, interpreted)."""
    from pallas_kernels.dynamic_conv import hopper

    monkeypatch.setitem(hopper.FWD, "bk", 64)
    monkeypatch.setitem(hopper.FWD, "stages", 3)
    monkeypatch.setitem(hopper.GRAD_U, "bk", 64)
    monkeypatch.setitem(hopper.GRAD_U, "stages", 2)
    monkeypatch.setitem(hopper.GRAD_H, "bk", 64)
    monkeypatch.setitem(hopper.GRAD_H, "stages", 2)
    monkeypatch.setitem(hopper.GRAD_W2, "splits", 1)
    monkeypatch.setitem(hopper.GRAD_W2, "bt", 32)
    monkeypatch.setitem(hopper.GRAD_W2, "bd", 32)
    u, h, w2, b2, seg, cache = inputs(rng, 2, 61, 96, 64, 4, "bfloat16", True, False)
    y, vjp = run("hopper", u, h, w2, b2, seg, cache)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.bfloat16)
    y_ref, grads_ref = oracle(u, h, w2, b2, seg, cache, dy)
    tol_y, tol_g = TOL["bfloat16"]
    assert rel_err(y, y_ref) <= tol_y
    for name, g, g_ref in zip(("du", "dh", "dw2", "db2"), vjp(dy), grads_ref):
        assert rel_err(g, g_ref) <= tol_g, name
