"""jetnemo_jax.ops.conv: dynamic_conv against the float64 definition (packed documents, caches, decode steps), and
generated_dynamic_conv through the public op: its backends agree, "auto" reads the table, kernels run per shard.
The fused kernels against the float64 oracle: tests/pallas_kernels/dynamic_conv/."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetnemo_jax import ops
from jetnemo_jax.ops import backends, conv
from jetnemo_jax.ops import mesh as kernel_mesh
from tests.oracles import dynamic_conv_numpy, rel_err
from tests.xla_flags import with_host_devices


def make(rng, B, T, D, W=4, dtype="float32"):
    x = jnp.asarray(rng.standard_normal((B, T, D)), dtype)
    kernels = jnp.asarray(rng.standard_normal((B, T, D, W)), dtype)
    return x, kernels


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("T", [1, 3, 37])
def test_matches_float64(rng, dtype, tol, T):
    x, kernels = make(rng, 2, T, 24, dtype=dtype)
    seg = np.zeros((2, T), np.int32)
    seg[0, T // 2:] = 1
    if T > 4:
        seg[0, T // 2 + 1:] = 2  # a one-token document
    cache = jnp.asarray(rng.standard_normal((2, 3, 24)), dtype)
    y, new_cache = ops.dynamic_conv(x, kernels, segment_ids=seg, cache=cache, output_final_cache=True)
    assert y.dtype == jnp.dtype(dtype) and new_cache.dtype == jnp.dtype(dtype)
    assert rel_err(y, dynamic_conv_numpy(x, kernels, segment_ids=seg, cache=cache)) <= tol


def test_gradients_match_float64(rng):
    """du and dkernel from autodiff equal the float64 finite-free reference gradients (computed in torch)."""
    import torch

    x, kernels = make(rng, 2, 19, 8)
    seg = np.array([[0] * 9 + [1] * 10, [3] * 19], np.int32)
    dy = rng.standard_normal((2, 19, 8))
    f = lambda x, k: jnp.sum(ops.dynamic_conv(x, k, segment_ids=seg)[0] * dy)
    dx, dk = jax.grad(f, argnums=(0, 1))(x, kernels)

    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    kt = torch.tensor(np.asarray(kernels, np.float64), requires_grad=True)
    starts = np.concatenate([np.zeros((2, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
    xp = torch.nn.functional.pad(xt, (0, 0, 3, 0))
    acc = torch.zeros_like(xt)
    for t in range(19):
        doc_start = max((s for s in range(t + 1) if starts[0, s]), default=-3)
        for w in range(4):
            src = t - 3 + w
            mask = torch.tensor([src >= doc_start, True], dtype=torch.float64)[:, None]
            acc[:, t] = acc[:, t] + mask * kt[:, t, :, w] * xp[:, src + 3]
    (torch.nn.functional.silu(acc) * torch.tensor(dy)).sum().backward()
    assert rel_err(dx, xt.grad.numpy()) <= 1e-5
    assert rel_err(dk, kt.grad.numpy()) <= 1e-5
    # No gradient crosses the document boundary in either direction.
    only_second = jax.grad(lambda x: jnp.sum(ops.dynamic_conv(x, kernels, segment_ids=seg)[0][0, 9:]))(x)
    assert float(jnp.abs(only_second[0, :9]).max()) == 0.0


def test_decode_steps_reproduce_the_sequence(rng):
    x, kernels = make(rng, 2, 11, 16)
    y_full, cache_full = ops.dynamic_conv(x, kernels, output_final_cache=True)
    cache = jnp.zeros((2, 3, 16))
    outs = []
    for t in range(11):
        y_t, cache = ops.dynamic_conv_step(x[:, t], kernels[:, t], cache)
        outs.append(y_t)
    assert rel_err(jnp.stack(outs, 1), y_full) <= 1e-6
    np.testing.assert_array_equal(cache, cache_full)


def test_prefill_cache_continues(rng):
    x, kernels = make(rng, 1, 20, 8)
    y_full, _ = ops.dynamic_conv(x, kernels)
    _, cache = ops.dynamic_conv(x[:, :2], kernels[:, :2], output_final_cache=True)  # T < W - 1
    y_rest, _ = ops.dynamic_conv(x[:, 2:], kernels[:, 2:], cache=cache)
    assert rel_err(y_rest, y_full[:, 2:]) <= 1e-6


def test_bad_shapes(rng):
    x, kernels = make(rng, 1, 5, 8)
    with pytest.raises(ValueError, match="kernels"):
        ops.dynamic_conv(x, kernels[:, :4])
    with pytest.raises(ValueError, match="cache has shape"):
        ops.dynamic_conv(x, kernels, cache=jnp.zeros((1, 4, 8)))


def inputs(rng, B, T, G, D, W, dtype, packed, with_cache):
    f = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, dtype)
    seg = None
    if packed:  # a one-token document, a boundary at t = 1, documents of random length
        seg = np.cumsum(rng.random((B, T)) < 0.15, axis=1).astype(np.int32)
        seg[0, : min(T, 3)] = [0, 1, 1][: min(T, 3)]
    cache = f(B, W - 1, D) if with_cache else None
    return f(B, T, D), f(B, T, G), f(G, D * W, scale=G ** -0.5), f(D * W, scale=0.5), seg, cache


def test_public_op_prefill_cache_and_decode(rng):
    """impl="triton" (interpreted) through ops: prefill in two pieces (the first shorter than W-1) equals one
    pass, its cache continues with the XLA decode step, and impl="reference" agrees."""
    u, h, w2, b2, _, _ = inputs(rng, 2, 12, 16, 24, 4, "float32", False, False)
    piece = lambda a, b, **kw: ops.generated_dynamic_conv(u[:, a:b], h[:, a:b], w2, b2, impl="triton", **kw)
    y_full, _ = piece(0, 11)
    _, cache = piece(0, 2, output_final_cache=True)
    y_rest, cache = piece(2, 11, cache=cache, output_final_cache=True)
    assert rel_err(y_rest, y_full[:, 2:]) <= 1e-5
    k_last = (h[:, 11] @ w2 + b2).reshape(2, 24, 4)
    y_step, _ = ops.dynamic_conv_step(u[:, 11], k_last, cache)
    y_all, _ = ops.generated_dynamic_conv(u, h, w2, b2, impl="reference")
    assert rel_err(y_step, y_all[:, 11]) <= 1e-5
    assert rel_err(y_full, y_all[:, :11]) <= 1e-5


def test_auto_is_xla_on_cpu_and_the_kernels_on_gpu_and_tpu(rng, monkeypatch):
    monkeypatch.setattr(kernel_mesh, "platform", lambda mesh: "cpu")  # also when the tests run on a GPU
    cpu = SimpleNamespace(platform="cpu")
    u, h, w2, b2, _, _ = inputs(rng, 1, 5, 16, 8, 4, "float32", False, False)
    jaxpr = lambda impl: str(jax.make_jaxpr(lambda *a: ops.generated_dynamic_conv(*a, impl=impl))(u, h, w2, b2))
    assert "pallas_call" not in jaxpr("auto") and "pallas_call" in jaxpr("triton")
    auto = lambda dtype: backends.select("generated_dynamic_conv", conv.GENERATED_BACKENDS, "auto",
                                        conv.Call(dtype, cpu), None)[0].name
    assert auto(jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="16-bit"):  # float32 inputs: no Mosaic GPU kernels, also interpreted
        ops.generated_dynamic_conv(u, h, w2, b2, impl="mosaic_gpu")
    monkeypatch.setattr(kernel_mesh, "platform", lambda mesh: "gpu")
    assert "pallas_call" in jaxpr("auto")
    assert auto(jnp.bfloat16) == "triton"  # the Mosaic GPU kernels only when asked for, also on an sm_90 GPU
    assert backends.select("generated_dynamic_conv", conv.GENERATED_BACKENDS, "auto",
                           conv.Call(jnp.bfloat16, SimpleNamespace(platform="gpu", compute_capability="9.0")),
                           None)[0].name == "triton"
    monkeypatch.setattr(kernel_mesh, "platform", lambda mesh: "tpu")
    assert auto(jnp.bfloat16) == "tpu"
    with pytest.raises(ValueError, match="expected"):
        ops.generated_dynamic_conv(u, h, w2[:, :-1], b2, impl="triton")


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jetnemo_jax import ops
from tests.oracles import rel_err
from tests.ops.test_conv import inputs

rng = np.random.default_rng({seed})
u, h, w2, b2, seg, cache = inputs(rng, 4, 29, 16, 48, 4, "float32", True, True)
seg = jnp.asarray(seg)

def loss(u, h, w2, b2, cache, mesh):
    y, c = ops.generated_dynamic_conv(u, h, w2, b2, segment_ids=seg, cache=cache, output_final_cache=True,
                                      impl="triton", mesh=mesh)
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
    env = dict(os.environ, XLA_FLAGS=with_host_devices(4), JAX_PLATFORMS="cpu",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _SHARDED.format(seed=int(rng.integers(2**31)))], cwd=root,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
