"""Packed documents: document ids from segment ids, each token's position in its document, document starts,
and the chunk layout (padding included) that the chunked XLA recurrences share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def doc_ids_from_segments(segment_ids, shape):
    """Monotone document index per token: +1 wherever the segment id changes."""
    B, T = shape
    if segment_ids is None:
        return jnp.zeros((B, T), jnp.int32)
    if segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids has shape {segment_ids.shape}, expected {(B, T)}")
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((B, 1), jnp.int32), jnp.cumsum(change, axis=1)], axis=1)


def document_starts(doc_ids):
    """[B, T] bool: True where a new document starts, never at t = 0 (an initial state or cache continues the
    first document)."""
    return jnp.concatenate([jnp.zeros_like(doc_ids[:, :1], bool), doc_ids[:, 1:] != doc_ids[:, :-1]], axis=1)


def positions_in_documents(doc_ids):
    """Position of each token within its document (RoPE restarts at every packed document)."""
    T = doc_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T), doc_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(doc_ids[:, :1], bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def to_chunks(chunk_size, doc_ids, *xs):
    """Token-major inputs in chunks of C = chunk_size tokens: each x [B, T, H, ...] -> [B, H, N, C, ...], the
    last chunk padded with zero tokens (with k = 0 and g = 0 they leave a state unchanged; they continue the
    last document). Returns (the xs, docs [B, 1, N, C], prev_doc [B, 1, N]: the document of the token just
    before each chunk, which the state entering it belongs to)."""
    B, T = doc_ids.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    if pad:
        xs = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in xs]
        doc_ids = jnp.pad(doc_ids, [(0, 0), (0, pad)], mode="edge")
    xs = [jnp.moveaxis(x.reshape(B, N, C, *x.shape[2:]), 3, 1) for x in xs]
    docs = doc_ids.reshape(B, 1, N, C)
    prev_doc = jnp.concatenate([docs[:, :, :1, 0], docs[:, :, :-1, -1]], axis=2)
    return xs, docs, prev_doc
