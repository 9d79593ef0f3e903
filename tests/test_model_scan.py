"""ModelConfig.scan_layers: runs of identical layers as one lax.scan each, on the same per-layer parameters.
The loss and every gradient equal the unrolled model's (float32), remat inside the scanned body included;
decoding a scanned model's parameters is unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jetnemo_jax import config as model_config
from jetnemo_jax.generate import generate
from jetnemo_jax.model import JetNemotronForCausalLM, layer_runs
from tests.oracles import rel_err

TINY = model_config.tiny()  # jet, jet, attn, jet, swa, jet
# Runs of 3, 1, 2, 1 and 2, kinds in both orders, windows short enough to matter on 40 tokens.
MIXED = model_config.tiny(layer_types=("jet", "jet", "jet", "attn", "swa", "swa", "jet", "attn", "attn"),
                          sliding_window=7)


def _layer_scans(jaxpr) -> list[tuple[int, bool]]:
    """(length, whether its body is rematerialised) of each scan over a run of layers (named scope
    scan_layers_{first}_{last}; the ops' own scans, such as the gated delta rule's, are other scans)."""
    return [(e.params["length"], any(b.primitive.name in ("checkpoint", "remat", "remat2")
                                     for b in e.params["jaxpr"].jaxpr.eqns))
            for e in jaxpr.eqns if e.primitive.name == "scan" and "scan_layers_" in str(e.source_info.name_stack)]


def test_layer_runs():
    def runs(cfg, keep=()):
        model = nnx.eval_shape(lambda: JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(0)))
        return layer_runs(model.model.layers, keep)

    assert runs(TINY) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert runs(MIXED) == [(0, 3), (3, 4), (4, 6), (6, 7), (7, 9)]
    assert runs(MIXED, keep=(1, 4, 8)) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 9)]
    # Jet-Nemotron-2B: 14 JetBlocks, attn, 4 JetBlocks, attn, 2 swa, 6 JetBlocks; the teacher is one run.
    assert runs(model_config.jet_nemotron_2b()) == [(0, 14), (14, 15), (15, 19), (19, 20), (20, 22), (22, 28)]
    assert runs(model_config.qwen2_5_1_5b()) == [(0, 28)]


def test_weights_of_other_dtypes_end_a_run():
    """A run scans one stack per weight: layers whose weights differ in dtype (train.frozen_dtype holds frozen
    ones in bf16; a frozen regex may pick single layers) are not stacked together."""
    model = JetNemotronForCausalLM(model_config.tiny(layer_types=("jet",) * 4), rngs=nnx.Rngs(0))
    w = model.model.layers[2].mlp.up_proj.kernel
    w.set_value(w[...].astype(jnp.bfloat16))
    assert layer_runs(model.model.layers) == [(0, 2), (2, 3), (3, 4)]


def _loss_and_grads(model, tokens, seg, scan, remat, keep=()):
    graphdef, params = nnx.split(model)

    def loss(params):
        m = nnx.merge(graphdef, params)
        hidden, kept = m.hidden_states(tokens, segment_ids=seg, remat=remat, keep_layers=keep, scan=scan)
        return jnp.sum(jnp.sin(m.logits(hidden))) + sum(jnp.sum(jnp.cos(x)) for x in kept.values())

    return jax.jit(jax.value_and_grad(loss))(params), jax.make_jaxpr(loss)(params).jaxpr


@pytest.mark.parametrize("cfg,keep,remat", [(TINY, (), "full"), (MIXED, (1, 5), "none"),
                                            (MIXED, (), "jet:dots,attn:full,swa:none")],
                         ids=["tiny-full", "mixed-none-kept_layers", "mixed-per_kind"])
def test_scanned_loss_and_gradients_equal_unrolled(rng, cfg, keep, remat):
    model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    T = 40
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, T)), jnp.int32)
    seg = jnp.asarray(np.cumsum(rng.random((2, T)) < 0.1, axis=1) + 1, jnp.int32)  # packed documents
    (l0, g0), jaxpr0 = _loss_and_grads(model, tokens, seg, False, remat, keep)
    (l1, g1), jaxpr1 = _loss_and_grads(model, tokens, seg, True, remat, keep)
    assert abs(float(l1) - float(l0)) <= 1e-5 * abs(float(l0))
    assert jax.tree.structure(g1) == jax.tree.structure(g0)  # the same per-layer parameters
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-30), jax.tree_util.keystr(path)
    assert _layer_scans(jaxpr0) == []
    kinds = {"jet": "dots", "attn": "full", "swa": "none"} if ":" in remat else dict.fromkeys(("jet", "attn", "swa"),
                                                                                              remat)
    runs = [(start, stop) for start, stop in layer_runs(model.model.layers, keep) if stop - start > 1]
    assert runs
    assert _layer_scans(jaxpr1) == [(stop - start, kinds[cfg.layer_types[start]] != "none") for start, stop in runs]


def test_a_scanned_model_decodes_as_it_scores(rng):
    """Decoding runs the layers unrolled on the same parameters: prefill and token-by-token decoding of a
    scan_layers model reproduce its scanned forward pass, and generate() works on it."""
    cfg = MIXED.replace(scan_layers=True)
    model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    T, prompt_len = 24, 9
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, T)), jnp.int32)
    full = model(ids)
    assert rel_err(full, model.logits(model.hidden_states(ids, scan=False)[0])) <= 1e-5
    caches = model.init_cache(2, T)
    logits, caches = model.prefill(ids[:, :prompt_len], caches)
    assert rel_err(logits, full[:, :prompt_len]) <= 1e-5
    outs = []
    for t in range(prompt_len, T):
        out, caches = model.decode_step(ids[:, t], jnp.full((2,), t), caches)
        outs.append(out)
    assert rel_err(jnp.stack(outs, 1), full[:, prompt_len:]) <= 1e-5
    out = generate(model, [[1, 2, 3]], max_new_tokens=4)
    assert out.tokens.shape[0] == 1


def test_scan_layers_is_validated_and_no_part_of_the_hf_config():
    with pytest.raises(model_config.ConfigError, match="scan_layers"):
        TINY.replace(scan_layers="yes")
    cfg = TINY.replace(scan_layers=True)
    assert cfg.to_hf_dict() == TINY.to_hf_dict()
    assert "scan_layers" in model_config.NUMERICS_FIELDS  # the run's choice, never the checkpoint's
