"""Jet-Nemotron-4B, stage 1: from Qwen2.5-3B, MLPs, embeddings and norms frozen, distillation (KL on
logits) from the original Qwen2.5-3B, which shares the frozen weights. The paper trains 50B tokens.

    python train.py --config configs/jet_nemotron_4b_stage1.py --config.init.path=/ckpt/Qwen2.5-3B \
        --config.data.tokenizer=/ckpt/Qwen2.5-3B --config.data.source='/data/*.jsonl'

Any Qwen2.5-architecture model works as init.path: the sizes come from its config.json, the JetBlock from
the rule of jetnemo_jax.config.jet_layout, the placement is the 4B's for a 36-layer model; other depths
need --config.model.layer_types=jet,jet,attn,... (one of attn, swa, jet per layer).
"""

from jetnemo_jax.train.recipes import stage1


def get_config():
    return stage1("jet_nemotron_4b")
