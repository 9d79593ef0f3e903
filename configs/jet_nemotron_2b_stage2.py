"""Jet-Nemotron-2B, stage 2: full fine-tuning from the stage-1 result (its `final/` directory), next-token
loss only. The paper trains 350B tokens with more math and code.

    python train.py --config configs/jet_nemotron_2b_stage2.py \
        --config.init.path=runs/jet_nemotron_2b_stage1/final --config.data.tokenizer=/ckpt/Qwen2.5-1.5B \
        --config.data.source='/data/*.jsonl'

Every model field comes from init.path's config.json (no model flags needed); a model flag that contradicts
it is refused, naming the field.
"""

from jetnemo_jax.train.recipes import stage2


def get_config():
    return stage2("jet_nemotron_2b")
