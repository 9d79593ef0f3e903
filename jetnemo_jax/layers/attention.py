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

    def prefill(self, x, *, positions, cache: KVCache, valid=None):
        """Causal attention of the chunk x [B,T,hidden] (positions [B,T]) over the cached tokens and itself;
        the chunk's keys and values enter `cache`. Call again on the next chunk to continue the sequence.
        valid [B,T] bool (default all): False marks left padding, which is neither attended nor cached.
        Full attention needs every position < the cache's slot count (`init_cache(max_len)`)."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, positions)
        valid = jnp.ones((B, T), bool) if valid is None else valid
        S = cache.pos.shape[1]
        if self.window is None:
            # Every position has its own slot: write first, then the chunk attends over the whole cache.
            cache = _write(cache, k, v, positions, valid)
            keys, values, key_pos = cache.k, cache.v, cache.pos
        else:
            # Rolling buffer: the chunk may overwrite slots its own early queries still need, so attend
            # over [cache; chunk] and keep only the last S tokens.
            keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], 1)
            values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], 1)
            key_pos = jnp.concatenate([cache.pos, jnp.where(valid, positions, -1).astype(jnp.int32)], 1)
            keep = min(T, S)
            cache = _write(cache, k[:, T - keep:], v[:, T - keep:], positions[:, T - keep:], valid[:, T - keep:])
        qp, kp = positions[:, :, None], key_pos[:, None, :]
        mask = (kp >= 0) & (kp <= qp)
        if self.window is not None:
            mask = mask & (qp - kp < self.window)
        o = jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None],
                                         scale=self.head_dim ** -0.5, implementation="xla")
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim)), cache

    def step(self, x, *, position, cache: KVCache):
        """One token x [B,hidden] at `position` [B] -> (y [B,hidden], new cache)."""
        B = x.shape[0]
        q, k, v = self._qkv(x[:, None], position[:, None])
        cache = _write(cache, k, v, position[:, None], jnp.ones((B, 1), bool))
        seen = (cache.pos >= 0) & (cache.pos <= position[:, None])
        o = jax.nn.dot_product_attention(q, cache.k, cache.v, mask=seen[:, None, None, :],
                                         scale=self.head_dim ** -0.5, implementation="xla")
        return self.o_proj(o.reshape(B, self.num_heads * self.head_dim)), cache


def _write(cache: KVCache, k, v, positions, valid) -> KVCache:
    """Scatter k, v [B,T,kv,hd] into slot position % S (in place under donation); invalid tokens are dropped.
    Positions in one call must fall in distinct slots."""
    S = cache.pos.shape[1]
    slots = jnp.where(valid, positions % S, S)  # slot S is out of bounds: mode="drop" skips it
    rows = jnp.arange(k.shape[0])[:, None]
    return KVCache(cache.k.at[rows, slots].set(k.astype(cache.k.dtype), mode="drop"),
                   cache.v.at[rows, slots].set(v.astype(cache.v.dtype), mode="drop"),
                   cache.pos.at[rows, slots].set(positions.astype(jnp.int32), mode="drop"))
