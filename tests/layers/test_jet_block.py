"""JetBlock (NNX) against the PyTorch reference written from the spec, with the official names."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jetnemo_jax import config
from jetnemo_jax.checkpoint.state_dict import load_state_dict
from jetnemo_jax.layers.jet_block import JetBlock
from tests.oracles import rel_err
from tests.torch_reference import JetBlockRef


def load_from_torch(module, ref):
    tensors = {n: t.detach().to(torch.float64).numpy() for n, t in ref.state_dict().items()}
    load_state_dict(module, tensors.__getitem__, {n: (t.shape, str(t.dtype)) for n, t in tensors.items()})


def block_pair(rng, jet, hidden, dtype):
    cfg = config.tiny(hidden_size=hidden, jet=jet, dtype=dtype)
    ref = JetBlockRef(hidden, jet.num_heads, jet.head_dim, jet.expand_v, jet.conv_size, jet.generator_reduction,
                      jet.norm_eps).double()
    ref.reset_parameters_randomly(torch.Generator().manual_seed(int(rng.integers(1 << 30))), std=0.1)
    block = nnx.eval_shape(lambda: JetBlock(cfg, rngs=nnx.Rngs(0)))
    load_from_torch(block, ref)
    return block, ref


JETS = {
    "2b_heads": config.JetBlockConfig(num_heads=2, head_dim=96, head_v_dim=256),
    "square": config.JetBlockConfig(num_heads=3, head_dim=32, head_v_dim=32, generator_reduction=4),
    "wide_conv": config.JetBlockConfig(num_heads=2, head_dim=64, head_v_dim=128, conv_size=3),
}


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("jet", sorted(JETS))
def test_block_matches_reference(rng, jet, dtype, tol):
    block, ref = block_pair(rng, JETS[jet], 80, dtype)
    B, T = 2, 70
    x = rng.standard_normal((B, T, 80))
    seg = np.zeros((B, T), np.int64)
    seg[1, 23:] = 1
    seg[1, 64:] = 2
    with torch.no_grad():
        expect = ref(torch.tensor(x), segment_ids=torch.tensor(seg)).numpy()
    out = block(jnp.asarray(x, dtype), segment_ids=jnp.asarray(seg))
    assert out.dtype == jnp.dtype(dtype)
    assert rel_err(out, expect) <= tol


def test_initialisation(rng):
    cfg = config.tiny()
    block = JetBlock(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    gen = block.dynamic_conv1d.kernel_generator
    assert float(jnp.abs(gen.w2.kernel[...]).max()) == 0.0  # a static convolution at step 0 ...
    assert 0.015 < float(np.asarray(gen.w1.kernel[...]).std()) < 0.025  # ... that is not a dead saddle
    b2 = np.asarray(gen.w2.bias[...])
    assert 0.015 < b2.std() < 0.025  # N(0, initializer_range)

    # The generator learns: its weights get gradients at initialisation (w1 = w2 = 0 would give none).
    x = jnp.asarray(rng.standard_normal((2, 9, cfg.hidden_size)), jnp.float32)
    grads = nnx.jit(nnx.grad(lambda b: jnp.sum(b(x) ** 2)))(block).dynamic_conv1d.kernel_generator
    assert float(jnp.abs(grads.w2.kernel[...]).max()) > 0
    A = np.exp(np.asarray(block.A_log[...]))
    assert block.A_log[...].dtype == jnp.float32 and block.dt_bias[...].dtype == jnp.float32
    assert ((A > 0) & (A < 16)).all()
    dt = np.log1p(np.exp(np.asarray(block.dt_bias[...])))  # softplus
    assert ((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)).all()


@pytest.mark.parametrize("prefill_len", [0, 2, 37])
def test_prefill_then_decode_steps_match_full_sequence(rng, prefill_len):
    """Prefill (including prompts shorter than the conv width) then one token at a time, through the caches."""
    block, _ = block_pair(rng, JETS["wide_conv"], 80, "float32")
    B, T = 2, 70
    x = jnp.asarray(rng.standard_normal((B, T, 80)), jnp.float32)
    full = block(x)
    if prefill_len:
        y0, cache = block(x[:, :prefill_len], return_cache=True)
        assert rel_err(y0, full[:, :prefill_len]) <= 1e-5
    else:
        cache = block.init_cache(B, jnp.float32)
    step = nnx.jit(lambda blk, x_t, c: blk.step(x_t, c))
    outs = []
    for t in range(prefill_len, T):
        y_t, cache = step(block, x[:, t], cache)
        outs.append(y_t)
    assert rel_err(jnp.stack(outs, 1), full[:, prefill_len:]) <= 1e-5
    # Prefill in two pieces through the cache gives the same as one piece.
    _, c1 = block(x[:, :30], return_cache=True)
    y2 = block(x[:, 30:], cache=c1)
    assert rel_err(y2, full[:, 30:]) <= 1e-5
