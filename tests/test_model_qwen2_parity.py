"""The all-attention model loaded from an HF Qwen2 directory equals transformers' Qwen2ForCausalLM."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jetnemo_jax.checkpoint import load_hf_model
from tests.oracles import rel_err

transformers = pytest.importorskip("transformers")

QWEN2_CASES = {
    "tied_gqa": dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "untied_odd": dict(vocab_size=131, hidden_size=60, intermediate_size=86, num_hidden_layers=3,
                       num_attention_heads=5, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=1e4,
                       rms_norm_eps=1e-5),
    "mha_head_dim": dict(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=3, head_dim=24, tie_word_embeddings=False),
}


def save_random_qwen2(tmp_path, seed, **kw):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**kw, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # HF initialises biases and norms to constants: randomise everything
            p.normal_(0.0, 0.08)
            if p.ndim == 1 and p.shape[0] == kw["hidden_size"]:
                p.add_(1.0)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("case", sorted(QWEN2_CASES))
def test_logits_match_transformers_fp32(tmp_path, rng, case):
    ref_model = save_random_qwen2(tmp_path, int(rng.integers(1 << 30)), **QWEN2_CASES[case])
    model = load_hf_model(tmp_path, dtype="float32")
    ids = rng.integers(0, QWEN2_CASES[case]["vocab_size"], (2, 45))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids)))
    assert rel_err(out, ref) <= 1e-5


def test_bf16_model_close_to_fp32_reference(tmp_path, rng):
    kw = QWEN2_CASES["tied_gqa"]
    ref_model = save_random_qwen2(tmp_path, int(rng.integers(1 << 30)), **kw)
    model = load_hf_model(tmp_path, dtype="bfloat16")
    ids = rng.integers(0, kw["vocab_size"], (2, 33))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    assert rel_err(np.asarray(model(jnp.asarray(ids))), ref) <= 2e-2
