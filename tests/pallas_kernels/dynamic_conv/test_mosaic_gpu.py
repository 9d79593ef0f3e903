"""pallas_kernels/dynamic_conv/mosaic_gpu.py: the Mosaic GPU kernels (16-bit only; interpreted on CPU, unclustered:
the interpreter has no cluster barriers) against the float64 torch oracle, when they apply, their fallbacks and
their lowering for CUDA."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from jetnemo_jax.ops import backends, conv
from jetnemo_jax.ops import mesh as kernel_mesh
from pallas_kernels.dynamic_conv import mosaic_gpu, mosaic_gpu_backward, triton
from tests.ops.test_conv import inputs
from tests.oracles import generated_conv_torch, rel_err
from tests.pallas_kernels.dynamic_conv.harness import TOL, abstract_args, check_matches_float64, loss, run


@pytest.mark.parametrize("dtype,B,T,G,D,W,packed,with_cache", [
    ("bfloat16", 1, 70, 40, 136, 4, True, True),  # 3 taps, a G of no multiple of 8, no cache: the test below
])
def test_matches_float64(rng, dtype, B, T, G, D, W, packed, with_cache):
    check_matches_float64(rng, mosaic_gpu, dtype, B, T, G, D, W, packed, with_cache)


def test_mosaic_gpu_kernels_only_for_16_bit_on_sm90(monkeypatch):
    gpu = lambda cc: SimpleNamespace(platform="gpu", compute_capability=cc)
    cpu = SimpleNamespace(platform="cpu")
    monkeypatch.setattr(kernel_mesh, "platform", lambda mesh: "cpu")  # also when the tests run on a GPU
    assert mosaic_gpu.supported(gpu("9.0"), jnp.bfloat16) and mosaic_gpu.supported(gpu("9.0"), jnp.float16)
    assert not mosaic_gpu.supported(gpu("9.0"), jnp.float32)
    assert not any(mosaic_gpu.supported(gpu(cc), jnp.bfloat16) for cc in ("8.0", "10.0", "12.0"))
    # The op's table: on a CPU, impl="mosaic_gpu" runs only interpreted.
    row = next(r for r in conv.GENERATED_BACKENDS if r.name == "mosaic_gpu")
    assert row.supports(conv.Call(jnp.bfloat16, cpu), False) is not None
    assert row.supports(conv.Call(jnp.bfloat16, gpu("9.0")), False) is None
    assert backends.select("generated_dynamic_conv", conv.GENERATED_BACKENDS, "mosaic_gpu",
                           conv.Call(jnp.bfloat16, cpu), None) == (row, True)


def test_mosaic_grad_w2_splits_rows_until_the_last_wave_fills():
    # an H100 holds 66 CTA pairs; a split has 2 taps x D/64 channel blocks of programs (2B: 96, 4B: 128)
    assert mosaic_gpu_backward.row_splits(96, 66, 512) == 2  # one split: 1.45 of 2 waves
    assert mosaic_gpu_backward.row_splits(128, 66, 512) == 1  # 1.94 of 2
    assert mosaic_gpu_backward.row_splits(96, 66, 1) == 1  # a single row tile cannot split
    assert mosaic_gpu_backward.row_splits(3, 66, 1024) == 8  # at most 8


def test_mosaic_gpu_backward_takes_triton_grad_h_beyond_g_512(monkeypatch):
    """Mosaic grad_h splits G between two warpgroups of at most one 256-wide wgmma each; a larger (padded) G
    takes the Triton grad_h."""
    calls = []
    monkeypatch.setattr(mosaic_gpu, "grad_u", lambda *a, **k: (None, None))
    monkeypatch.setattr(mosaic_gpu, "grad_w2", lambda *a, **k: (None, None))
    monkeypatch.setattr(mosaic_gpu, "grad_h", lambda *a, **k: calls.append("mosaic"))
    monkeypatch.setattr(triton, "grad_h", lambda *a, **k: calls.append("triton"))
    u = jnp.zeros((8, 64), jnp.bfloat16)
    for G in (512, 576):
        mosaic_gpu.backward(None, jnp.zeros((4, G, 64), jnp.bfloat16), None, u, None, None, u)
    assert calls == ["mosaic", "triton"]


def test_mosaic_gpu_kernels_with_other_blocks(rng, monkeypatch):
    """The Mosaic GPU kernels at other K steps, pipeline depths and row splits (bf16, interpreted), on 3 taps and a
    generator width of no multiple of 8, without a cache."""
    for name, cfg in (("FWD", {"bk": 64, "stages": 3}), ("GRAD_U", {"bk": 64, "stages": 2}),
                      ("GRAD_H", {"bk": 64, "stages": 2}), ("GRAD_W2", {"splits": 1, "bt": 32, "bd": 32})):
        monkeypatch.setattr(mosaic_gpu, name, dataclasses.replace(getattr(mosaic_gpu, name), **cfg))
    u, h, w2, b2, seg, cache = inputs(rng, 2, 61, 130, 64, 3, "bfloat16", True, False)
    y, vjp = run(mosaic_gpu, u, h, w2, b2, seg, cache)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.bfloat16)
    y_ref, grads_ref = generated_conv_torch(u, h, w2, b2, seg, cache, dy)
    tol_y, tol_g = TOL["bfloat16"]
    assert rel_err(y, y_ref) <= tol_y
    for name, g, g_ref in zip(("du", "dh", "dw2", "db2"), vjp(dy), grads_ref):
        assert rel_err(g, g_ref) <= tol_g, name


@pytest.mark.parametrize("G,D", [(384, 3072), (512, 4096)])
def test_mosaic_gpu_lowering_for_cuda(G, D):
    """The four Mosaic GPU kernels lower for CUDA at the 2B and 4B sizes, clustered as on the GPU (the CPU tests
    interpret them unclustered): their layouts resolve and their shared memory fits an H100 (checked while
    lowering)."""
    text = jax.jit(loss(mosaic_gpu)).trace(*abstract_args(2, 100, G, D, jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 4
    for kernel in ("fwd", "grad_u", "grad_h", "grad_w2"):
        assert f"dynamic_conv_{kernel}" in text, kernel
