"""pallas_kernels/dynamic_conv/triton.py: the Triton kernels (interpreted on CPU) against the float64 torch oracle,
forward and the gradients of every input, packed documents, caches, T < W; their lowering to Triton for CUDA
(jax.export, no GPU needed) and their shared memory on an H100 (sm_90 proxy: tests/pallas_kernels/triton_resources.py).
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.dynamic_conv import triton
from tests.ops.test_conv import inputs
from tests.oracles import generated_conv_torch, rel_err
from tests.pallas_kernels import triton_resources
from tests.pallas_kernels.dynamic_conv.harness import abstract_args, check_matches_float64, loss, run


@pytest.mark.parametrize("dtype,B,T,G,D,W,packed,with_cache", [
    ("float32", 2, 37, 24, 40, 4, True, False),
    ("bfloat16", 1, 70, 40, 136, 4, True, True),
    ("float32", 2, 2, 16, 8, 4, False, True),
    ("float32", 1, 5, 8, 16, 3, True, False),  # W = 3: the wide matmul pads the taps to 4
])
def test_matches_float64(rng, dtype, B, T, G, D, W, packed, with_cache):
    check_matches_float64(rng, triton, dtype, B, T, G, D, W, packed, with_cache)


@pytest.mark.parametrize("store_taps", [True, False])
def test_grad_u_with_stored_or_regenerated_taps(rng, monkeypatch, store_taps):
    """Both grad_u kernels (the forward's taps read back, or regenerated) against the float64 oracle, at
    B * T = 256 rows: grad_u's last token tile (at either kernel's default tiles) starts inside the real rows and
    runs past them."""
    monkeypatch.setattr(triton, "STORE_TAPS", store_taps)
    check_matches_float64(rng, triton, "float32", 2, 128, 24, 40, 4, True, False)


def test_no_gradient_crosses_documents(rng):
    u, h, w2, b2, _, _ = inputs(rng, 1, 20, 16, 8, 4, "float32", False, False)
    seg = np.array([[0] * 9 + [1] * 11], np.int32)
    _, vjp = run(triton, u, h, w2, b2, seg, None)
    dy = jnp.zeros((1, 20, 8)).at[:, 9:].set(1.0)  # only the second document's outputs
    du, dh = vjp(dy)[:2]
    assert float(jnp.abs(du[0, :9]).max()) == 0.0 and float(jnp.abs(dh[0, :9]).max()) == 0.0
    assert float(jnp.abs(du[0, 9:]).min()) > 0.0


def test_gpu_kernels_with_other_blocks(rng, monkeypatch):
    """The GPU kernels' block options other than the defaults (several G blocks per program, split token
    rows, other tiles) give the same gradients: float32, G 200 (two 128-wide G blocks after padding)."""
    for name, cfg in (("FWD", {"bt": 64, "bd": 64, "bg": 128}), ("GRAD_U", {"bt": 64, "bg": 64}),
                      ("GRAD_H", {"bt": 128, "bk": 32, "gtiles": 2}),
                      ("GRAD_W2", {"bn": 32, "bd": 128, "gtiles": 2, "splits": 3})):
        monkeypatch.setattr(triton, name, dataclasses.replace(getattr(triton, name), **cfg))
    u, h, w2, b2, seg, cache = inputs(rng, 2, 75, 200, 72, 4, "float32", True, True)
    y, vjp = run(triton, u, h, w2, b2, seg, cache)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    y_ref, grads_ref = generated_conv_torch(u, h, w2, b2, seg, cache, dy)
    assert rel_err(y, y_ref) <= 1e-5
    for name, g, g_ref in zip(("du", "dh", "dw2", "db2", "dcache"), vjp(dy), grads_ref):
        assert rel_err(g, g_ref) <= 1e-5, name


@pytest.mark.parametrize("dtype,G,D", [(jnp.bfloat16, 384, 3072), (jnp.float32, 40, 200)])
def test_triton_lowering_for_cuda(dtype, G, D):
    exported = export.export(jax.jit(loss(triton)), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*abstract_args(2, 100, G, D, dtype))
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") >= 4, "expected the forward and the three backward Triton kernels"


def test_default_blocks_fit_h100_shared_memory():
    """Compiled for sm_90 (the triton package, a proxy of XLA's Triton; see triton_resources.py), each kernel
    at its default blocks and launch options fits an H100's shared memory and runs its dots on HGMMA."""
    if sys.platform != "linux":
        pytest.skip("the triton package (the test extra's sm_90 compiler) ships for Linux only")
    report = triton_resources.conv_resources()
    assert all(r["shared_kib"] <= triton_resources.H100_SHARED_KIB and r["wgmma"] for r in report.values()), report
