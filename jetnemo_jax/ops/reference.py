"""Readable definitions: the gated delta rule token by token (`lax.scan`) and the generated causal conv.

Inputs here are already validated by the public entry points in `jetnemo_jax.ops`; document ids are
monotone (`doc_ids`, a new id exactly where a new document starts). Everything is computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def delta_rule_step(state, q, k, v, g, beta, scale):
    """One token of S_t = exp(g)(I - beta k k^T) S + beta k v^T, o = scale S_t^T q.

    state [..., dk, dv] fp32; q, k [..., dk]; v [..., dv]; g, beta [...]. Returns (o, new_state).
    """
    state = state * jnp.exp(g)[..., None, None]
    err = v - jnp.einsum("...k,...kv->...v", k, state, precision=_HIGHEST)
    state = state + k[..., :, None] * (beta[..., None] * err)[..., None, :]
    o = scale * jnp.einsum("...k,...kv->...v", q, state, precision=_HIGHEST)
    return o, state


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, doc_ids):
    """Token recurrence. q, k [B,T,H,dk]; v [B,T,H,dv]; g, beta [B,T,H]; state [B,H,dk,dv]; doc_ids [B,T]."""
    starts = jnp.concatenate(
        [jnp.zeros_like(doc_ids[:, :1], bool), doc_ids[:, 1:] != doc_ids[:, :-1]], axis=1)

    def step(state, xs):
        q_t, k_t, v_t, g_t, b_t, start_t = xs
        state = jnp.where(start_t[:, None, None, None], 0.0, state)
        o_t, state = delta_rule_step(state, q_t, k_t, v_t, g_t, b_t, scale)
        return state, o_t

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, starts)]
    final_state, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), final_state


def dynamic_conv(x, kernels, cache, doc_ids):
    """Depthwise causal conv with per-token kernels, then SiLU.

    x [B,T,D]; kernels [B,T,D,W] (tap W-1 is the current token); cache [B,W-1,D], the inputs just before
    x (zeros at a sequence start), which belong to x's first document; doc_ids [B,T].
    Returns (silu(conv) [B,T,D] fp32, new cache [B,W-1,D]: the last W-1 inputs of x's last document).
    """
    B, T, D, W = kernels.shape
    xp = jnp.concatenate([cache.astype(jnp.float32), x.astype(jnp.float32)], axis=1)  # [B, T+W-1, D]
    docs = jnp.concatenate([jnp.broadcast_to(doc_ids[:, :1], (B, W - 1)), doc_ids], axis=1)
    kernels = kernels.astype(jnp.float32)
    acc = jnp.zeros((B, T, D), jnp.float32)
    for w in range(W):  # tap w reads x_{t-W+1+w}
        same_doc = (docs[:, w:w + T] == doc_ids)[..., None]
        acc = acc + jnp.where(same_doc, kernels[..., w] * xp[:, w:w + T], 0.0)
    last_doc = (docs[:, -(W - 1):] == doc_ids[:, -1:])[..., None] if W > 1 else None
    new_cache = jnp.where(last_doc, xp[:, -(W - 1):], 0.0) if W > 1 else cache
    return jax.nn.silu(acc), new_cache


def dynamic_conv_step(x, kernel, cache):
    """One token: x [B,D], kernel [B,D,W], cache [B,W-1,D] -> (silu(conv) [B,D] fp32, new cache)."""
    window = jnp.concatenate([cache.astype(jnp.float32), x.astype(jnp.float32)[:, None]], axis=1)  # [B,W,D]
    y = jnp.einsum("bwd,bdw->bd", window, kernel.astype(jnp.float32), precision=_HIGHEST)
    return jax.nn.silu(y), window[:, 1:]
