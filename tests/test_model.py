"""The hybrid causal LM against the PyTorch reference; packing; parameter counts of the presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jetnemo_jax import config
from jetnemo_jax.checkpoint.state_dict import load_state_dict
from jetnemo_jax.model import JetNemotronForCausalLM
from tests.oracles import rel_err
from tests.torch_reference import JetNemotronRef

HYBRID = config.tiny(vocab_size=211, hidden_size=72, intermediate_size=100, num_attention_heads=6,
                     num_key_value_heads=2, layer_types=("jet", "swa", "attn", "jet"), sliding_window=9,
                     jet=config.JetBlockConfig(num_heads=2, head_dim=48, head_v_dim=128), rope_theta=1e4)


def model_pair(rng, cfg):
    ref = JetNemotronRef(cfg.to_hf_dict()).double()
    ref.reset_parameters_randomly(torch.Generator().manual_seed(int(rng.integers(1 << 30))), std=0.04)
    model = nnx.eval_shape(lambda: JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(0)))
    tensors = {n: t.numpy() for n, t in ref.state_dict().items()}
    load_state_dict(model, tensors.__getitem__, {n: (t.shape, str(t.dtype)) for n, t in tensors.items()})
    return model, ref


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_hybrid_matches_reference(rng, tied, dtype, tol):
    cfg = HYBRID.replace(tie_word_embeddings=tied, dtype=dtype)
    model, ref = model_pair(rng, cfg)
    ids = rng.integers(0, cfg.vocab_size, (2, 67))
    seg = np.zeros((2, 67), np.int64)
    seg[0, 30:] = 1
    for segments in (None, seg):
        with torch.no_grad():
            expect = ref(torch.tensor(ids), segment_ids=None if segments is None else torch.tensor(segments))
        out = model(jnp.asarray(ids), segment_ids=None if segments is None else jnp.asarray(segments))
        assert out.dtype == jnp.float32
        assert rel_err(out, expect.numpy()) <= tol


def test_packed_documents_do_not_interact(rng):
    model = JetNemotronForCausalLM(HYBRID, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    ids = rng.integers(0, HYBRID.vocab_size, (1, 50))
    seg = np.array([[4] * 20 + [9] * 30])
    packed = model(jnp.asarray(ids), segment_ids=jnp.asarray(seg))
    alone = model(jnp.asarray(ids[:, 20:]))
    assert rel_err(packed[:, 20:], alone) <= 1e-5
    changed = ids.copy()
    changed[0, :20] = rng.integers(0, HYBRID.vocab_size, 20)
    packed2 = model(jnp.asarray(changed), segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(packed2[:, 20:], packed[:, 20:], rtol=0, atol=1e-5)


def count_params(cfg):
    abstract = nnx.eval_shape(lambda: JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name,expected", [("jet_nemotron_2b", 1.965e9), ("jet_nemotron_4b", 3.960e9)])
def test_parameter_counts(name, expected):
    n = count_params(config.preset(name))
    print(f"{name}: {n:,} parameters ({n / 1e9:.4f}B; paper {expected / 1e9:.3f}B)")
    assert abs(n - expected) / expected <= 0.005


def test_qwen_presets_parameter_counts():
    # Qwen2.5-1.5B: 1.54B parameters (tied); Qwen2.5-3B: 3.09B (tied).
    for name, expected in (("qwen2_5_1_5b", 1.544e9), ("qwen2_5_3b", 3.086e9)):
        n = count_params(config.preset(name))
        print(f"{name}: {n:,} parameters")
        assert abs(n - expected) / expected <= 0.005


def test_every_parameter_has_logical_axes():
    abstract = nnx.eval_shape(lambda: JetNemotronForCausalLM(HYBRID.replace(tie_word_embeddings=False),
                                                             rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), path


@pytest.mark.parametrize("prompt_len", [2, 13])
def test_decoding_token_by_token_reproduces_the_forward_pass(rng, prompt_len):
    """Hybrid with attn, swa (window 9) and jet layers; prompts shorter than the conv width and longer than
    the window; 30 tokens so the sliding-window cache wraps around."""
    model, _ = model_pair(rng, HYBRID.replace(dtype="float32"))
    T = 30
    ids = jnp.asarray(rng.integers(0, HYBRID.vocab_size, (2, T)))
    full = model(ids)
    caches = model.init_cache(2, T)
    logits, caches = model.prefill(ids[:, :prompt_len], caches)
    assert rel_err(logits, full[:, :prompt_len]) <= 1e-5
    step = nnx.jit(lambda m, tok, pos, c: m.decode_step(tok, pos, c))
    outs = []
    for t in range(prompt_len, T):
        out, caches = step(model, ids[:, t], jnp.full((2,), t), caches)
        outs.append(out)
    assert rel_err(jnp.stack(outs, 1), full[:, prompt_len:]) <= 1e-5
