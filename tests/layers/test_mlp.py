"""The SwiGLU MLP's stacked gate/up matmul against the two Linears it replaces (forward and every gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jetnemo_jax import config
from jetnemo_jax.layers import mlp
from tests.oracles import rel_err


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_stacked_gate_up_matches_two_linears(rng, monkeypatch, dtype, tol):
    cfg = config.tiny(hidden_size=48, intermediate_size=80, dtype=dtype)
    model = mlp.MLP(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.standard_normal((2, 7, 48)), dtype)
    dy = jnp.asarray(rng.standard_normal((2, 7, 48)), jnp.float32)

    def run(stacked):
        monkeypatch.setattr(mlp, "STACK_GATE_UP", stacked)
        graph, params = nnx.split(model)

        def loss(params, x):
            return jnp.sum(nnx.merge(graph, params)(x).astype(jnp.float32) * dy)

        y = nnx.merge(graph, params)(x)
        grads = jax.grad(loss, argnums=(0, 1))(params, x)
        return [y, *jax.tree.leaves(grads)]

    stacked, separate = run(True), run(False)
    assert len(stacked) == 5  # y, dx and the three kernels' gradients
    for a, b in zip(stacked, separate):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = rel_err(np.asarray(a, np.float64), np.asarray(b, np.float64))
        assert err <= tol
