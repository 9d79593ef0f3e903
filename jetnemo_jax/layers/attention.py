"""Grouped-query softmax attention with q/k/v biases and RoPE; full causal or sliding window.

Sliding window W: query i sees key j iff i - W < j <= i. Packed documents (segment ids) never see
each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jetnemo_jax.layers.params import EMBED, KV_HEADS, Q_HEADS, linear
from jetnemo_jax.layers.rope import apply_rope, rope_cos_sin


def attention_mask(doc_ids, window: int | None, length: int | None = None):
    """doc_ids [B, T] (or None: one document) -> bool [B or 1, 1, T, T]: causal, same document, in window."""
    T = length if doc_ids is None else doc_ids.shape[1]
    i = jnp.arange(T)[:, None]
    j = jnp.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return allowed[:, None]


class Attention(nnx.Module):
    def __init__(self, cfg, *, window: int | None = None, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.window, self.rope_theta = window, cfg.rope_theta
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = linear(d, self.num_heads * hd, (EMBED, Q_HEADS), rngs=rngs, cfg=cfg, use_bias=True)
        self.k_proj = linear(d, self.num_kv_heads * hd, (EMBED, KV_HEADS), rngs=rngs, cfg=cfg, use_bias=True)
        self.v_proj = linear(d, self.num_kv_heads * hd, (EMBED, KV_HEADS), rngs=rngs, cfg=cfg, use_bias=True)
        self.o_proj = linear(self.num_heads * hd, d, (Q_HEADS, EMBED), rngs=rngs, cfg=cfg)

    def __call__(self, x, *, positions, doc_ids):
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).reshape(B, T, self.num_heads, hd)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, hd)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, hd)
        cos, sin = rope_cos_sin(positions, hd, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(doc_ids, self.window, T),
                                         scale=hd ** -0.5, implementation="xla")
        return self.o_proj(o.reshape(B, T, self.num_heads * hd))
