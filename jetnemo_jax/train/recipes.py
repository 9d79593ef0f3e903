"""The two Jet-Nemotron training stages (paper section 4; batch, learning rate and loss form are our choices)."""

from __future__ import annotations

import ml_collections

from jetnemo_jax.train.config import default_config
from jetnemo_jax.train.model_source import unset_section

# Frozen in stage 1 (regex on parameter paths): MLPs, embeddings (= tied lm_head) and every RMSNorm.
STAGE1_FROZEN = r"/mlp/|embed_tokens|layernorm|^model/norm/"


def _full_size(preset: str, stage: str, init_mode: str) -> ml_collections.ConfigDict:
    """What both stages share: sequence 4096, data and tokenizer named by the user, and a model section that
    leaves every size unset: the run reads them from init.path (train/model_source.py); `preset` is the
    layout recipe (placement and sliding window) of stage 1."""
    c = default_config()
    c.workdir = f"runs/{preset}_{stage}"
    c.model = unset_section(preset)
    c.init.mode = init_mode
    c.data.source = ""  # required
    c.data.tokenizer = ""  # required: the Qwen2.5 tokenizer directory
    c.data.seq_len = 4096
    c.data.worker_count = 4
    c.train.remat = "full"
    c.train.log_every = 20
    c.train.sample_prompt = "The capital of France is"
    return c


def stage1(preset: str) -> ml_collections.ConfigDict:
    """From a Qwen2.5-architecture model (init.path), any size: the hybrid of `jet_layout`; MLPs, embeddings
    and norms frozen; KL distillation from the original."""
    c = _full_size(preset, "stage1", "qwen2")
    c.data.global_batch = 64  # 256K tokens per step; 50B tokens = 190K steps
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 1000
    c.train.steps = 190_000
    c.train.frozen = STAGE1_FROZEN
    c.distill.enabled = True
    c.distill.temperature = 1.0
    c.distill.kl_weight = 1.0
    c.checkpoint.every = 1000
    return c


def stage2(preset: str) -> ml_collections.ConfigDict:
    """Full fine-tuning from the stage-1 result (init.path = its final/ directory, whose config.json gives
    every model field), next-token loss."""
    c = _full_size(preset, "stage2", "params")
    c.data.global_batch = 128  # 512K tokens per step; 350B tokens = 670K steps
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 2000
    c.train.steps = 670_000
    c.checkpoint.every = 2000
    return c
