"""AdamW with linear warmup and cosine decay, global-norm clipping, and no decay on norms/biases/gates."""

from __future__ import annotations

import re

import optax


def schedule(cfg, total_steps: int):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg, total_steps: int, trainable_names, nonfinite: str = "stop"):
    """`cfg`: the optim section. With nonfinite="skip", updates from NaN/inf gradients are dropped."""
    no_decay = re.compile(cfg.no_decay) if cfg.no_decay else None
    decay_mask = {n: not (no_decay and no_decay.search(n)) for n in trainable_names}
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask))
    if nonfinite == "skip":
        tx = optax.apply_if_finite(tx, max_consecutive_errors=10)
    elif nonfinite != "stop":
        raise ValueError(f"train.nonfinite={nonfinite!r}: expected 'stop' or 'skip'")
    return tx
