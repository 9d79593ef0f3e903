"""Jet-Nemotron-2B, stage 1: from Qwen2.5-1.5B, MLPs, embeddings and norms frozen, distillation (KL on
logits) from the original Qwen2.5-1.5B, which shares the frozen weights. The paper trains 50B tokens.

    python train.py --config configs/jet_nemotron_2b_stage1.py --config.init.path=/ckpt/Qwen2.5-1.5B \
        --config.data.tokenizer=/ckpt/Qwen2.5-1.5B --config.data.source='/data/*.jsonl'

Any Qwen2.5-architecture model works as init.path: the sizes come from its config.json, the JetBlock from
the rule of jetnemo_jax.config.jet_layout, the placement is the 2B's for a 28-layer model (Qwen2.5-7B too);
other depths need --config.model.layer_types=jet,jet,attn,... (one of attn, swa, jet per layer).
"""

from jetnemo_jax.train.recipes import stage1


def get_config():
    return stage1("jet_nemotron_2b")
