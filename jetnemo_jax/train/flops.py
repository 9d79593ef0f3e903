"""FLOPs per token of a training step, for MFU: plain 6N and frozen-aware (../shared/spec/anchors.md).

Frozen-aware: forward 2N + activation gradients 2N + weight gradients 2N_trainable, where N counts every
matmul weight (the tied lm_head included), plus attention and gated-delta-rule FLOPs (x3: forward, and
twice that backward). Plain: 6N. Multiply-add = 2 FLOPs.
"""

from __future__ import annotations

from jetnemo_jax.config import ModelConfig

# Dense bf16 peak per chip (FLOP/s), by jax Device.device_kind.
PEAK_BF16 = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    if device_kind in PEAK_BF16:
        return PEAK_BF16[device_kind]
    for kind, peak in PEAK_BF16.items():  # e.g. "NVIDIA H100 80GB HBM3" variants
        if device_kind.startswith(kind):
            return peak
    return None


def matmul_params(abstract: dict[str, object], cfg: ModelConfig) -> int:
    """Weights used as matmul operands (Linear kernels; the embedding when it is the tied lm_head)."""
    n = sum(v.size for name, v in abstract.items() if name.endswith("/kernel"))
    if cfg.tie_word_embeddings and any(name.endswith("embed_tokens/embedding") for name in abstract):
        n += cfg.vocab_size * cfg.hidden_size
    return n


def mixer_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of attention scores/values and of the gated delta rule (no projections)."""
    total = 0.0
    for t in cfg.layer_types:
        if t == "jet":
            j, C = cfg.jet, 64
            total += j.num_heads * (6 * j.head_dim * j.head_v_dim + 3 * C * j.head_dim + 4 * C * j.head_v_dim)
            total += 2 * j.conv_size * j.value_dim  # the generated convolution
        else:
            # causal: a query sees (T+1)/2 keys on average; a window of W sees at most W
            ctx = (seq_len + 1) / 2 if t == "attn" else min(cfg.sliding_window, (seq_len + 1) / 2)
            total += 2 * 2 * ctx * cfg.num_attention_heads * cfg.head_dim
    return total


def flops_per_token(abstract_trainable: dict, abstract_frozen: dict, cfg: ModelConfig, seq_len: int,
                    teacher: tuple[dict, ModelConfig] | None = None) -> dict:
    """The student's 6N and frozen-aware FLOPs per token; with `teacher` (its own weights, its config), also
    "teacher_forward": the distillation teacher's forward, counted apart (it shares the frozen weights)."""
    n_all = matmul_params({**abstract_trainable, **abstract_frozen}, cfg)
    n_trainable = matmul_params(abstract_trainable, cfg)
    mixer = mixer_flops_per_token(cfg, seq_len)
    teacher_forward = 0.0
    if teacher is not None:
        own, tcfg = teacher
        teacher_forward = 2.0 * matmul_params({**own, **abstract_frozen}, tcfg) + mixer_flops_per_token(tcfg, seq_len)
    return {"6N": 6.0 * n_all, "frozen_aware": 4.0 * n_all + 2.0 * n_trainable + 3.0 * mixer,
            "n_matmul": n_all, "n_matmul_trainable": n_trainable, "teacher_forward": teacher_forward}

