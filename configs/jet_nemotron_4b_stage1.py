"""Jet-Nemotron-4B, stage 1: from Qwen2.5-3B, MLPs, embeddings and norms frozen, distillation (KL on
logits) from the original Qwen2.5-3B, which shares the frozen weights. The paper trains 50B tokens.

    python train.py --config configs/jet_nemotron_4b_stage1.py --config.init.path=/ckpt/Qwen2.5-3B \
        --config.data.tokenizer=/ckpt/Qwen2.5-3B --config.data.source='/data/*.jsonl'
"""

from jetnemo_jax.train.recipes import stage1


def get_config():
    return stage1("jet_nemotron_4b")
