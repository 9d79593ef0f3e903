"""Grouped-query softmax attention with q/k/v biases and RoPE; full causal or sliding window.

Sliding window W: query i sees key j iff i - W < j <= i. Packed documents (segment ids) never see
each other.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jetnemo_jax.layers.params import EMBED, KV_HEADS, Q_HEADS, linear
from jetnemo_jax.layers.rope import apply_rope, rope_cos_sin
from jetnemo_jax.ops import attention as ops_attention
from jetnemo_jax.sharding import gather_length, length_shards


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


ATTENTION_IMPLS = ("xla", "cudnn", "blocked", "splash")
BLOCK = 512  # query tokens per step of the "blocked" path


def _blocked(q, k, v, doc_ids, window: int | None, scale: float, shards: int):
    """attention_mask's attention without a [T, T] mask or [T, T] scores: a scan over blocks of BLOCK
    queries, each against every key with its mask made from positions, rematerialised in the backward pass
    (memory: one [BLOCK, T] block of scores per head). Queries are blocked inside each of `shards` contiguous
    shards (the context axis), so that every device scans its own blocks."""
    B, T, H, hd = q.shape
    kv = k.shape[2]
    per = T // shards
    C = min(BLOCK, per)
    while per % C:
        C -= 1
    nb = per // C
    docs = jnp.zeros((B, T), jnp.int32) if doc_ids is None else doc_ids
    # [nb, B, shards, C, ...]: the scan runs over nb, the shards stay on their devices
    qb = jnp.moveaxis(q.reshape(B, shards, nb, C, kv, H // kv, hd), 2, 0)
    qpos = jnp.moveaxis(jnp.arange(T).reshape(shards, nb, C), 1, 0)
    qdoc = jnp.moveaxis(docs.reshape(B, shards, nb, C), 2, 0)
    kpos = jnp.arange(T)

    @jax.checkpoint
    def block(_, xs):
        qi, pos, doc = xs  # [B, S, C, kv, g, hd], [S, C], [B, S, C]
        s = jnp.einsum("bscngd,btnd->bsngct", qi, k, preferred_element_type=jnp.float32) * scale
        allowed = kpos[None, :] <= pos[..., None]  # [S, C, T]
        if window is not None:
            allowed = allowed & (pos[..., None] - kpos[None, :] < window)
        allowed = allowed[None] & (doc[..., None] == docs[:, None, None, :])  # [B, S, C, T]
        s = jnp.where(allowed[:, :, None, None], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return None, jnp.einsum("bsngct,btnd->bscngd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)

    _, out = jax.lax.scan(block, None, (qb, qpos, qdoc))  # [nb, B, S, C, kv, g, hd]
    return jnp.moveaxis(out, 0, 2).reshape(B, T, H, hd)


def _flash_args(doc_ids, window: int | None) -> dict:
    """attention_mask's rule as jax.nn.dot_product_attention's own causal and window arguments, plus the
    same-document mask where rows hold packed documents (a kernel that skips masked blocks needs no [T, T]
    mask for causality or the window)."""
    same_doc = None if doc_ids is None else (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    return {"mask": same_doc, "is_causal": True, "local_window_size": None if window is None else (window - 1, 0)}


# Jitted whole, as the ops' XLA paths: one compile when called eagerly, inlined inside a jit.
@functools.partial(jax.jit, static_argnames=("window", "scale", "impl", "shards"))
def attention_core(q, k, v, doc_ids, window: int | None, scale: float, impl: str = "xla", shards: int = 1):
    """Causal (sliding-window) attention of q [B,T,H,hd] over k, v [B,T,kv,hd] inside each document.
    impl "xla": XLA with a materialised [T, T] mask (any backend; the reference). "cudnn": cuDNN flash
    attention on NVIDIA GPUs (bf16/fp16, head_dim <= 128; rounds differently, so opt-in). "blocked": XLA in
    blocks of queries, no [T, T] mask or scores (long sequences; `shards`: the context-parallel split).
    "splash": the TPU flash-attention kernel (`ops.attention`; T a multiple of 128, no context split)."""
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(doc_ids, window, q.shape[1]), scale=scale,
                                            implementation="xla")
    if impl == "blocked":
        return _blocked(q, k, v, doc_ids, window, scale, shards)
    if impl == "splash":
        return ops_attention.splash_attention(q, k, v, doc_ids, window, scale, shards=shards)
    if impl != "cudnn":
        raise ValueError(f"attention impl={impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn", **_flash_args(doc_ids, window))


class KVCache(NamedTuple):
    """Keys (after RoPE) and values in S slots; token at position p lives in slot p % S. A sliding-window
    layer needs only S = W slots (the slot of position p - W is overwritten by p); `pos` is the position
    each slot holds (-1 when empty). Head-major, so that attention over the cache is a batched matmul over
    (batch, kv head) in the layout the cache already has: [B, S, kv, hd] made XLA transpose a copy of every
    layer's cache at every decode step (3x the bytes of reading it)."""
    k: jax.Array  # [B, kv_heads, S, head_dim]
    v: jax.Array
    pos: jax.Array  # [B, S] int32


def cached_attention(q, keys, values, query_pos, key_pos, window: int | None, scale: float):
    """q [B,T,H,hd] over cached keys/values [B,kv,S,hd] -> [B,T,H,hd]. Query head h reads kv head
    h // (H / kv). Key slot s is seen iff 0 <= key_pos[s] <= query_pos (and within the window).
    Logits and softmax in fp32, probabilities in the value dtype (as jax.nn.dot_product_attention)."""
    B, T, H, hd = q.shape
    kv = keys.shape[1]
    qg = q.reshape(B, T, kv, H // kv, hd)
    s = jnp.einsum("btkgd,bksd->bkgts", qg, keys, preferred_element_type=jnp.float32) * scale
    qp, kp = query_pos[:, :, None], key_pos[:, None, :]
    seen = (kp >= 0) & (kp <= qp)
    if window is not None:
        seen = seen & (qp - kp < window)
    # A finite floor, not -inf: a left-padding query sees no key, and its (unused) row must not be NaN.
    p = jax.nn.softmax(jnp.where(seen[:, None, None], s, -0.7 * jnp.finfo(jnp.float32).max), axis=-1)
    # Head-major output, then transposed: XLA:CPU has no bf16 x bf16 -> f32 dot for the btkgd output layout
    # when B > 1 ("Unsupported element type for DotThunk"); the transpose is exact, so numerics are unchanged.
    o = jnp.einsum("bkgts,bksd->bkgtd", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd).astype(q.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg, *, window: int | None = None, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.window, self.rope_theta = window, cfg.rope_theta
        self.impl = cfg.attn_impl
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
        with jax.named_scope("attn_proj"):
            q, k, v = self._qkv(x, positions)
        with jax.named_scope("attn_core"):
            # context parallelism: queries stay in their shard, keys and values are gathered whole
            k, v = gather_length(k), gather_length(v)
            o = attention_core(q, k, v, doc_ids, self.window, self.head_dim ** -0.5, self.impl,
                               shards=length_shards(T))
        with jax.named_scope("attn_proj"):
            return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def init_cache(self, batch: int, max_len: int, dtype) -> KVCache:
        slots = min(max_len, self.window) if self.window else max_len
        shape = (batch, self.num_kv_heads, slots, self.head_dim)
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
            keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype).transpose(0, 2, 1, 3)], 2)
            values = jnp.concatenate([cache.v, v.astype(cache.v.dtype).transpose(0, 2, 1, 3)], 2)
            key_pos = jnp.concatenate([cache.pos, jnp.where(valid, positions, -1).astype(jnp.int32)], 1)
            keep = min(T, S)
            cache = _write(cache, k[:, T - keep:], v[:, T - keep:], positions[:, T - keep:], valid[:, T - keep:])
        o = cached_attention(q, keys, values, positions, key_pos, self.window, self.head_dim ** -0.5)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim)), cache

    def step(self, x, *, position, cache: KVCache):
        """One token x [B,hidden] at `position` [B] -> (y [B,hidden], new cache)."""
        B = x.shape[0]
        q, k, v = self._qkv(x[:, None], position[:, None])
        cache = _write(cache, k, v, position[:, None], jnp.ones((B, 1), bool))
        o = cached_attention(q, cache.k, cache.v, position[:, None], cache.pos, self.window, self.head_dim ** -0.5)
        return self.o_proj(o.reshape(B, self.num_heads * self.head_dim)), cache


def _write(cache: KVCache, k, v, positions, valid) -> KVCache:
    """Scatter k, v [B,T,kv,hd] into slot position % S (in place under donation); invalid tokens are dropped.
    Positions in one call must fall in distinct slots."""
    B, T, kv, _ = k.shape
    S = cache.pos.shape[1]
    slots = jnp.where(valid, positions % S, S)  # slot S is out of bounds: mode="drop" skips it
    rows = jnp.arange(B)[:, None]
    idx = (rows[:, :, None], jnp.arange(kv)[None, :, None], slots[:, None, :])  # -> [B, kv, T]
    head_major = lambda x: x.astype(cache.k.dtype).transpose(0, 2, 1, 3)  # noqa: E731
    return KVCache(cache.k.at[idx].set(head_major(k), mode="drop"),
                   cache.v.at[idx].set(head_major(v), mode="drop"),
                   cache.pos.at[rows, slots].set(positions.astype(jnp.int32), mode="drop"))
