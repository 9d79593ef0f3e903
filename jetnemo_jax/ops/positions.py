"""Each token's position within its packed document (RoPE restarts there; conv taps stop there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def positions_in_documents(doc_ids):
    """Position of each token within its document (RoPE restarts at every packed document)."""
    T = doc_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T), doc_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(doc_ids[:, :1], bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
