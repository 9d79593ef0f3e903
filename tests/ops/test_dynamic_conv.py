"""jetnemo_jax.ops.dynamic_conv against the float64 definition: packed documents, caches, decode steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetnemo_jax import ops
from tests.oracles import dynamic_conv_numpy, rel_err


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
