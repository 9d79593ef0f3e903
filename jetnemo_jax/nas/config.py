"""PostNAS configuration (ml_collections): the tiny CPU demo's values; configs/postnas_*.py change them."""

from __future__ import annotations

import ml_collections

from jetnemo_jax.config import JetBlockConfig
from jetnemo_jax.nas.blocks import BLOCKS
from jetnemo_jax.train.config import compilation_cache_section, model_section
from jetnemo_jax.train.config import default_config as train_defaults


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/postnas_tiny"
    c.seeds = (0, 1, 2)  # each: supernet, search, then searched vs uniform training
    # The original (all-attention) model's dimensions, and the JetBlock shape of the linear paths.
    c.model = model_section("tiny", vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, layer_types=("attn",) * 6, sliding_window=None,
                            jet=JetBlockConfig(num_heads=4, head_dim=16, head_v_dim=32), dtype="float32")
    # "train": a tiny teacher trained here on the data mixture; "hf": an HF Qwen2 directory (path).
    c.teacher = ml_collections.ConfigDict(dict(mode="train", path="", steps=400))
    c.data = ml_collections.ConfigDict(dict(
        source="pydoc_data", text_key="text", tokenizer="", eos_token="", held_out=0.1,
        seq_len=64, text_rows=4,  # packed text rows per batch
        # Synthetic retrieval rows per batch (0: text only): "mqar" (multi-query associative recall with
        # mqar_pairs pairs) or "copy" (distinct random tokens, then the same again: an induction lookup,
        # which a tiny teacher learns in a few hundred steps where it barely starts on MQAR). Its tokens
        # come from [1, recall_vocab).
        recall="copy", recall_rows=12, recall_vocab=64, mqar_pairs=6))
    c.optim = train_defaults().optim
    c.optim.lr, c.optim.weight_decay = 5e-3, 0.0
    c.supernet = ml_collections.ConfigDict(dict(
        block="jet", steps=200,
        min_attn=0, max_attn=-1,  # full-attention layers per sampled placement; -1: the search budget
        mse_layers=(),  # layer outputs matched to the teacher's (feature distillation); (): every layer
        mse_weight=1.0, kl_weight=0.0, ce_weight=0.0))
    c.search = ml_collections.ConfigDict(dict(
        budget=2, beam_width=2,
        exhaustive_max=100,  # also score every placement when there are at most this many (a check)
        # Weights on the task scores; every task is listed so that a misspelt one fails check_keys.
        objective=ml_collections.ConfigDict({"lm": 0.0, "mc": 0.0, "retrieval": 1.0})))
    c.eval = ml_collections.ConfigDict(dict(
        lm_rows=32, retrieval_rows=64,
        rows_per_call=64,  # rows per evaluation forward (the logits of rows x seq_len x vocab live at once)
        mc_jsonl="",  # {"context", "choices", "answer"} lines; "" builds cloze items from held-out text
        mc_items=64, mc_context=24, mc_answer=8, mc_choices=4))
    # Every fixed-placement training from fresh linear blocks (searched vs uniform, each block, each grid
    # point): one step count, so a network shape compiles its step once.
    c.fixed = ml_collections.ConfigDict(dict(steps=100))
    c.blocks = ml_collections.ConfigDict(dict(kinds=BLOCKS, decode_batch=8, decode_steps=64))
    c.hardware = ml_collections.ConfigDict(dict(
        state_size=0,  # 0: nh * dk * dv of model.jet
        heads=(2, 4, 8), head_dims=(16,), value_dims=(16, 32, 64),
        decode_batch=8, decode_context=256, decode_steps=64,
        proxy_metric="retrieval_accuracy",
        apply=True))  # hand the best Pareto point's shape to train.py (else keep model.jet)
    c.handoff = ml_collections.ConfigDict(dict(
        preset="",  # a recipes.stage1 preset for full size; "" writes the model section itself
        overrides=ml_collections.ConfigDict(dict(  # train config values, by section
            data=dict(seq_len=64), train=dict(steps=300)))))
    c.compilation_cache = compilation_cache_section()  # enabled, dir: as train.py's
    return c
