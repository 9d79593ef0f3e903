"""Gated linear attention: the recurrence behind GLA, RetNet-style retention and Mamba2-style SSD blocks.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t,

with state S [dk, dv] per head in float32 and g <= 0 the log decay, either one value per head
(RetNet, Mamba2: g [B,T,H]) or one per key dimension (GLA: g [B,T,H,dk]). Packed documents (segment
ids) start from a zero state. `reference` is the token recurrence (the definition); `chunked` does the
work inside chunks of C tokens as masked matmuls and only the state pass as a `lax.scan`.

Chunked form, with G the inclusive cumsum of g inside a chunk (per key dim) and D_ij[d] =
exp(G_i[d] - G_j[d]) for j <= i in the same document (else 0), e_i = exp(G_i) for tokens of the document
the entering state S belongs to (else 0):
    o_i = scale * ((q_i * e_i) S + sum_j (sum_d q_i[d] k_j[d] D_ij[d]) v_j)
    S'  = e_C * S + sum_j (k_j * D_Cj) v_j^T.
D is built from pairwise segment sums (never exp(-G)), so any decay strength is safe; it holds
C * C * dk values per chunk and head, hence the small default chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jetnemo_jax.ops.documents import doc_ids_from_segments, document_starts, to_chunks

IMPLS = ("auto", "xla", "reference")  # the names of `ops.IMPLS` this op has: xla runs `chunked`
_HIGHEST = jax.lax.Precision.HIGHEST


def _ein(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HIGHEST)


def step_reference(state, q, k, v, g, scale):
    """One token. state [..., dk, dv]; q, k, g [..., dk]; v [..., dv] -> (o [..., dv], new state)."""
    state = state * jnp.exp(g)[..., :, None] + k[..., :, None] * v[..., None, :]
    return scale * _ein("...k,...kv->...v", q, state), state


@jax.jit  # jitted whole, as ops.delta_rule's XLA paths: one compile when called eagerly
def reference(q, k, v, g, scale, initial_state, doc_ids):
    """Token recurrence (`lax.scan`). q, k, g [B,T,H,dk]; v [B,T,H,dv]; state [B,H,dk,dv]; doc_ids [B,T]."""
    starts = document_starts(doc_ids)

    def step(state, xs):
        q_t, k_t, v_t, g_t, start_t = xs
        state = jnp.where(start_t[:, None, None, None], 0.0, state)
        o_t, state = step_reference(state, q_t, k_t, v_t, g_t, scale)
        return state, o_t

    final, o = jax.lax.scan(step, initial_state, [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, starts)])
    return jnp.moveaxis(o, 0, 1), final


@functools.partial(jax.jit, static_argnames="chunk_size")
def chunked(q, k, v, g, scale, initial_state, doc_ids, chunk_size=16):
    """Same arguments as `reference`; chunk_size C (any positive integer)."""
    B, T, H, _ = q.shape
    dv = v.shape[-1]
    C = chunk_size
    # padded tokens (k = 0, g = 0) leave the state unchanged; prev_doc: the entering state's document
    (q, k, v, g), docs, prev_doc = to_chunks(C, doc_ids, q, k, v, g)  # [B, H, N, C, ...]
    N = docs.shape[2]
    idx = jnp.arange(C)
    strict = idx[:, None] > idx[None, :]
    # seg[i, j] = sum_{j<m<=i} g_m as a cumsum down each column (a difference of cumsums cancels badly).
    seg = jnp.cumsum(jnp.where(strict[:, :, None], g[..., :, None, :], 0.0), axis=-3)  # [B,H,N,C,C,dk]
    keep = (~strict.T & (docs[..., :, None] == docs[..., None, :]))[..., None]  # j <= i, same document
    D = jnp.where(keep, jnp.exp(jnp.where(keep, seg, 0.0)), 0.0)
    e = jnp.where((docs == prev_doc[..., None])[..., None], jnp.exp(jnp.cumsum(g, axis=-2)), 0.0)  # [B,H,N,C,dk]

    P = _ein("...id,...jd,...ijd->...ij", q, k, D)  # intra-chunk scores with decay
    O_intra = _ein("...ij,...jv->...iv", P, v)
    Qe = q * e
    Kd = k * D[..., -1, :, :]  # each token's decay to the chunk end
    e_last = e[..., -1, :]

    def step(S, xs):
        Qe_n, Kd_n, v_n, el_n = xs
        o_n = _ein("bhck,bhkv->bhcv", Qe_n, S)
        S = el_n[..., :, None] * S + _ein("bhck,bhcv->bhkv", Kd_n, v_n)
        return S, o_n

    final, o_inter = jax.lax.scan(step, initial_state, [jnp.moveaxis(x, 2, 0) for x in (Qe, Kd, v, e_last)])
    o = scale * (jnp.moveaxis(o_inter, 0, 2) + O_intra)  # [B, H, N, C, dv]
    o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(B, N * C, H, dv)
    return o[:, :T], final


def _per_key(g, shape):
    """Per-head gates [B,T,H] broadcast over the key dim; per-key gates [B,T,H,dk] pass through."""
    if g.shape == shape[:3]:
        return jnp.broadcast_to(g[..., None], shape)
    if g.shape != shape:
        raise ValueError(f"g has shape {g.shape}, expected {shape[:3]} (per head) or {shape} (per key dim)")
    return g


def gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                           segment_ids=None, impl="auto", chunk_size=16):
    """q, k [B,T,H,dk]; v [B,T,H,dv]; g (log decay <= 0) [B,T,H] or [B,T,H,dk]; initial_state [B,H,dk,dv].

    Returns (o [B,T,H,dv] in v's dtype, final state float32 or None). No normalisation of q or k: the
    blocks choose their own feature maps. impl: auto (= xla) | xla (`chunked`) | reference.
    """
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected [B,T,H,dk] twice and [B,T,H,dv]")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    g = _per_key(g, q.shape)
    if initial_state is not None and initial_state.shape != (B, H, dk, dv):
        raise ValueError(f"initial_state has shape {initial_state.shape}, expected {(B, H, dk, dv)}")
    scale = dk ** -0.5 if scale is None else scale
    state = jnp.zeros((B, H, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)
    args = (f32(q), f32(k), f32(v), f32(g), scale, state, doc_ids_from_segments(segment_ids, (B, T)))
    if impl == "reference":
        o, final = reference(*args)
    else:
        o, final = chunked(*args, chunk_size=chunk_size)
    return o.astype(v.dtype), (final if output_final_state else None)


def gated_linear_attention_step(q, k, v, g, state, *, scale=None):
    """One decode token: q, k [B,H,dk]; v [B,H,dv]; g [B,H] or [B,H,dk]; state [B,H,dk,dv] float32."""
    if state.shape != (*q.shape, v.shape[-1]):
        raise ValueError(f"state has shape {state.shape}, expected {(*q.shape, v.shape[-1])}")
    g = g[..., None] if g.shape == q.shape[:2] else g
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)
    o, state = step_reference(f32(state), f32(q), f32(k), f32(v), jnp.broadcast_to(f32(g), q.shape), scale)
    return o.astype(v.dtype), state
