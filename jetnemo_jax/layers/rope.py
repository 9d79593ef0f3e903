"""Rotary position embedding, HF "rotate_half" layout, computed in float32."""

from __future__ import annotations

import jax.numpy as jnp


def rope_cos_sin(positions, head_dim: int, theta: float):
    """positions [B, T] int -> cos, sin [B, T, head_dim] float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, T, N, head_dim]; cos, sin [B, T, head_dim]."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    y = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return y.astype(x.dtype)
