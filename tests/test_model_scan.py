"""ModelConfig.scan_layers: runs of identical layers as one lax.scan each, on the same per-layer parameters.
The loss and every gradient equal the unrolled model's (float32), remat inside the scanned body included;
decoding a scanned model's parameters is unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jetnemo_jax import config as model_config
from jetnemo_jax import model as model_lib
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
    cfg = MIXED.replace(layer_types=("jet", "jet", "attn", "swa", "swa"), scan_layers=True)  # runs of 2, 1, 2
    model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    T, prompt_len = 17, 9  # 8 decode steps, past the window of 7
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


@pytest.mark.slow
def test_linear_weights_are_stacked_in_the_compute_dtype(rng, monkeypatch):
    """bf16 compute over fp32 weights: Linear kernels and biases enter the scan in bf16 (each layer casts them
    at use anyway: the gradients are bit for bit those of fp32 stacks), norm weights, A_log and dt_bias in
    fp32; the gradients stay close to the unrolled model's (bf16 rounding where XLA fuses the two
    forms differently, as it does for remat: about 0.6% here)."""
    cfg = model_config.tiny(layer_types=("jet", "jet", "attn", "attn"), dtype="bfloat16")  # a run of each
    model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    seg = jnp.ones((2, 24), jnp.int32)
    (_, g0), _ = _loss_and_grads(model, tokens, seg, False, "full")
    (_, g1), jaxpr = _loss_and_grads(model, tokens, seg, True, "full")
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan" and "scan_layers_" in str(e.source_info.name_stack)]
    dtypes = {str(v.aval.dtype) for e in scans for v in e.invars[e.params["num_consts"] + 1:]}
    assert dtypes == {"bfloat16", "float32"}
    n_f32 = sum(v.aval.dtype == jnp.float32 for v in scans[0].invars[scans[0].params["num_consts"] + 1:])
    assert n_f32 == 5  # a JetBlock run: two layer norms, o_norm, A_log, dt_bias

    stacked_weights = model_lib._stacked_weights
    monkeypatch.setattr(model_lib, "_stacked_weights", lambda layers, dtype: stacked_weights(layers, jnp.float32))
    (_, g_f32_stacks), jaxpr_f32 = _loss_and_grads(model, tokens, seg, True, "full")
    assert {str(v.aval.dtype) for e in jaxpr_f32.eqns if e.primitive.name == "scan"
            and "scan_layers_" in str(e.source_info.name_stack) for v in e.invars[e.params["num_consts"] + 1:]} == {
        "float32"}
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g_f32_stacks)):
        assert a.dtype == b.dtype and np.array_equal(a, b)

    flat = lambda g: np.concatenate([np.asarray(a, np.float32).ravel() for a in jax.tree.leaves(g)])  # noqa: E731
    assert rel_err(flat(g1), flat(g0)) <= 2e-2


def test_scan_layers_is_validated_and_no_part_of_the_hf_config():
    with pytest.raises(model_config.ConfigError, match="scan_layers"):
        TINY.replace(scan_layers="yes")
    cfg = TINY.replace(scan_layers=True)
    assert cfg.to_hf_dict() == TINY.to_hf_dict()
    assert "scan_layers" in model_config.NUMERICS_FIELDS  # the run's choice, never the checkpoint's


def test_postnas_distillation_of_a_scanned_config_equals_unrolled(rng):
    """PostNAS: a SuperNet built from a scan_layers config scans its teacher (the all-attention base, one run
    up to the MSE layer); the super-network's own layers stay unrolled. Its steps equal the unrolled ones."""
    import ml_collections

    from jetnemo_jax.nas import supernet

    cfg = model_config.tiny(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                            vocab_size=64, layer_types=("attn",) * 4,
                            jet=model_config.JetBlockConfig(num_heads=2, head_dim=8, head_v_dim=8))
    optim = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1.0,
                                           weight_decay=0.0, clip_norm=1.0, no_decay=""))
    base = nnx.state(JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30)))), nnx.Param)
    batch = {"tokens": jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32),
             "segment_ids": jnp.asarray(np.repeat([[1] * 7 + [2] * 9], 2, 0), jnp.int32)}
    placement = np.array([False, True, False, False])
    out = {}
    for scan in (False, True):
        split, params, frozen = supernet.build(cfg.replace(scan_layers=scan), "jet", base, seed=3)
        assert split.merge(params, frozen).base.layer_runs((2,)) == [(0, 3), (3, 4)]
        d = supernet.Distiller(split, optim, 2, mse_layers=(2,), mse_weight=1.0, kl_weight=0.5)
        out[scan] = d.run(params, frozen, lambda i: batch, lambda i: placement)
    (p0, h0), (p1, h1) = out[False], out[True]
    for a, b in zip(h1, h0):
        for k in b:
            assert abs(float(a[k]) - float(b[k])) <= 1e-5 * max(abs(float(b[k])), 1e-6), k
    for n in p0:
        assert rel_err(p1[n], p0[n]) <= 1e-5, n
