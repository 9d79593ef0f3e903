"""Jet-Nemotron-4B, stage 2: as configs/jet_nemotron_2b_stage2.py (full fine-tuning from stage 1's `final/`,
next-token loss only, every model field from init.path's config.json) with the 4B preset:

    python train.py --config configs/jet_nemotron_4b_stage2.py --config.init.path=runs/jet_nemotron_4b_stage1/final \
        --config.data.tokenizer=/ckpt/Qwen2.5-3B --config.data.source='/data/*.jsonl'
"""

from jetnemo_jax.train.recipes import stage2


def get_config():
    return stage2("jet_nemotron_4b")
