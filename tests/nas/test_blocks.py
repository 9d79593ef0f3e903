"""Candidate linear-attention blocks: decoding token by token continues the parallel forward exactly."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jetnemo_jax.config import JetBlockConfig, tiny
from jetnemo_jax.nas.blocks import BLOCKS, make_block, state_size
from tests.oracles import rel_err


def _cfg(dtype):
    return tiny(hidden_size=48, jet=JetBlockConfig(num_heads=2, head_dim=8, head_v_dim=16), dtype=dtype)


# bf16 for one block per op (delta rule, per-key and per-head gated linear attention) keeps the file fast.
@pytest.mark.parametrize("kind,dtype", [(k, "float32") for k in BLOCKS]
                         + [(k, "bfloat16") for k in ("gated_deltanet", "gla", "mamba2")])
def test_step_matches_parallel_forward(rng, kind, dtype):
    cfg = _cfg(dtype)
    block = make_block(kind, cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    B, T = 2, 11
    x = jnp.asarray(rng.standard_normal((B, T, cfg.hidden_size)), dtype)
    y = block(x)
    cache = block.init_cache(B, jnp.dtype(dtype))
    steps = []
    for t in range(T):
        y_t, cache = block.step(x[:, t], cache)
        steps.append(y_t)
    assert y.shape == x.shape and y.dtype == jnp.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 3e-2  # bf16: the two paths round projections differently
    assert rel_err(jnp.stack(steps, 1).astype(jnp.float32), y.astype(jnp.float32)) < tol
    assert cache.state.shape == (B, 2, 8, 16) and state_size(cfg) == 2 * 8 * 16


@pytest.mark.parametrize("kind", BLOCKS)
def test_documents_do_not_leak(rng, kind):
    """A packed row's second document gives the same output as that document alone."""
    cfg = _cfg("float32")
    block = make_block(kind, cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((1, 21, cfg.hidden_size)), jnp.float32)
    seg = np.array([[1] * 8 + [2] * 13])
    packed = block(x, segment_ids=seg)
    alone = block(x[:, 8:])
    assert rel_err(packed[:, 8:], alone) < 1e-5
