"""model.remat_by_kind: one remat policy for every layer, or one per layer kind; gradients never change."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jetnemo_jax import config as model_config
from jetnemo_jax.model import JetNemotronForCausalLM, remat_by_kind

CFG = model_config.tiny(layer_types=("jet", "attn", "swa", "jet"))  # every kind, one of them twice


def _checkpoints(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in ("checkpoint", "remat", "remat2")
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _checkpoints(sub)
    return n


def _loss(graphdef, tokens, remat):
    def loss(params):
        m = nnx.merge(graphdef, params)
        hidden, _ = m.hidden_states(tokens, remat=remat)
        return jnp.sum(jnp.sin(m.logits(hidden)) ** 2)  # positive terms: no cancellation
    return loss


def _loss_and_grads(model, tokens, remat):
    graphdef, params = nnx.split(model)
    loss = _loss(graphdef, tokens, remat)
    return jax.jit(jax.value_and_grad(loss))(params), jax.make_jaxpr(loss)(params)


def test_per_kind_remat_applies_to_the_named_kinds_and_keeps_the_gradients(rng):
    model = JetNemotronForCausalLM(CFG, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 16)), jnp.int32)
    (l0, g0), jaxpr0 = _loss_and_grads(model, tokens, "none")
    for spec, remat_layers in (("full", 4), ("jet:none,attn:dots,swa:none", 1)):
        (l1, g1), jaxpr1 = _loss_and_grads(model, tokens, spec)
        assert _checkpoints(jaxpr1.jaxpr) == remat_layers, spec
        np.testing.assert_allclose(l1, l0, rtol=1e-5)  # remat changes XLA's fusions: float32 rounding only
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
            assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-30)
    assert _checkpoints(jaxpr0.jaxpr) == 0


def test_remat_spec_parsing():
    assert remat_by_kind("dots") == {"jet": "dots", "attn": "dots", "swa": "dots"}
    assert remat_by_kind("jet:none, swa:dots") == {"jet": "none", "attn": "full", "swa": "dots"}
    for bad in ("all", "jet:sometimes", "mlp:none", ""):
        with pytest.raises(ValueError, match="kind:policy"):
            remat_by_kind(bad)


@pytest.mark.slow
def test_kernels_policy_keeps_the_kernels_work(rng):
    # remat="kernels" saves the Triton gated-delta-rule forward's outputs and residuals and the conv forward's
    # stored taps (pallas_kernels' KERNEL_RESIDUALS), so their forward kernels are not run again in the recompute
    # (the recompute's copies are dead code that XLA removes).
    # Interpreted on CPU, each kernel lowers to while loops over its grid: the compiled "kernels" program has as
    # many loops as no remat, full remat more.
    cfg = model_config.tiny(gdr_impl="triton", conv_impl="triton", layer_types=("jet", "attn"))
    model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 40)), jnp.int32)
    graphdef, params = nnx.split(model)

    def compiled(remat):  # each program compiled once: counted, then run (interpreted kernels compile slowly)
        return jax.jit(jax.value_and_grad(_loss(graphdef, tokens, remat))).lower(params).compile()

    none, kernels = compiled("none"), compiled("kernels")
    loops = lambda program: program.as_text().count(" while(")  # noqa: E731
    assert loops(kernels) == loops(none) < loops(compiled("full"))
    (l0, g0), (l1, g1) = none(params), kernels(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-30)
