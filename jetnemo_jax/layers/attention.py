"""Grouped-query softmax attention with q/k/v biases and RoPE; full causal or sliding window.

Sliding window W: query i sees key j iff i - W < j <= i. Packed documents (segment ids) never see
each other.
"""

from __future__ import annotations

from typing import NamedTuple

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


class KVCache(NamedTuple):
    """Keys (after RoPE) and values in S slots; token at position p lives in slot p % S. A sliding-window
    layer needs only S = W slots (the slot of position p - W is overwritten by p); `pos` is the position
    each slot holds (-1 when empty)."""
    k: jax.Array  # [B, S, kv_heads, head_dim]
    v: jax.Array
    pos: jax.Array  # [B, S] int32


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

    def _qkv(self, x, positions):
        *lead, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).reshape(*lead, self.num_heads, hd)
        k = self.k_proj(x).reshape(*lead, self.num_kv_heads, hd)
        v = self.v_proj(x).reshape(*lead, self.num_kv_heads, hd)
        cos, sin = rope_cos_sin(positions, hd, self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x, *, positions, doc_ids):
        B, T, _ = x.shape
        q, k, v = self._qkv(x, positions)
        o = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(doc_ids, self.window, T),
                                         scale=self.head_dim ** -0.5, implementation="xla")
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def init_cache(self, batch: int, max_len: int, dtype) -> KVCache:
        slots = min(max_len, self.window) if self.window else max_len
        shape = (batch, slots, self.num_kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, slots), -1, jnp.int32))

    def prefill(self, x, *, positions, cache: KVCache):
        """Causal attention over the prompt x [B,T,hidden] (positions [B,T]); its keys and values enter `cache`."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, positions)
        o = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(None, self.window, T),
                                         scale=self.head_dim ** -0.5, implementation="xla")
        S = cache.pos.shape[1]
        keep = min(T, S)  # older tokens would only be overwritten in a rolling window
        pos = positions[:, T - keep:]
        rows = jnp.arange(B)[:, None]
        cache = KVCache(cache.k.at[rows, pos % S].set(k[:, T - keep:].astype(cache.k.dtype)),
                        cache.v.at[rows, pos % S].set(v[:, T - keep:].astype(cache.v.dtype)),
                        cache.pos.at[rows, pos % S].set(pos.astype(jnp.int32)))
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim)), cache

    def step(self, x, *, position, cache: KVCache):
        """One token x [B,hidden] at `position` [B] -> (y [B,hidden], new cache)."""
        B = x.shape[0]
        q, k, v = self._qkv(x[:, None], position[:, None])
        S = cache.pos.shape[1]
        here = jnp.arange(S)[None] == (position % S)[:, None]  # [B, S]
        cache = KVCache(jnp.where(here[..., None, None], k.astype(cache.k.dtype), cache.k),
                        jnp.where(here[..., None, None], v.astype(cache.v.dtype), cache.v),
                        jnp.where(here, position[:, None].astype(jnp.int32), cache.pos))
        seen = (cache.pos >= 0) & (cache.pos <= position[:, None])
        o = jax.nn.dot_product_attention(q, cache.k, cache.v, mask=seen[:, None, None, :],
                                         scale=self.head_dim ** -0.5, implementation="xla")
        return self.o_proj(o.reshape(B, self.num_heads * self.head_dim)), cache
