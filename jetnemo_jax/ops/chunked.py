"""Pure-XLA chunked gated delta rule (chunk C = 64), the portable fast path and the kernels' oracle.

Per chunk with local inclusive gate cumsum G (see ../shared/spec/gated_delta_rule.md):
  D_ij = exp(G_i - G_j) for j <= i in the same document, else 0 (masked before exp);
  T = (I + strict_lower(beta_i k_i.k_j D_ij))^-1;  W = T diag(beta e) K;  U = T diag(beta) V;
  V_new = U - W S;  O = scale (diag(e) Q S + (Q K^T * D) V_new);  S' = e_C S + (D_C: K)^T V_new,
where e_i = exp(G_i) for tokens still in the document the entering state S belongs to, else 0. Packed
documents thus need no special case in the state pass: a document start zeroes e and cuts D. All of the
intra-chunk work is batched over chunks; only the state pass is a `lax.scan`. Everything runs in float32
at HIGHEST matmul precision (bf16 pure-XLA versions of this op are unstable).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _ein(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HIGHEST)


def unit_lower_inverse(A):
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], C a power of two.

    Recursive block inversion, [[T1, 0], [A21, T2]]^-1 = [[T1^-1, 0], [-T2^-1 A21 T1^-1, T2^-1]], from 1x1
    blocks up: log2(C) levels of batched matmuls. Exact like forward substitution, and it keeps LAPACK
    (whose CPU triangular solve deadlocked intermittently inside XLA's thread pool here) out of the op.
    """
    C = A.shape[-1]
    if C & (C - 1):
        raise ValueError(f"chunk size {C} must be a power of two")
    lead = A.shape[:-2]
    inv = jnp.ones((*lead, C, 1, 1), A.dtype)  # inverses of the diagonal blocks, size s
    s = 1
    while s < C:
        n = C // (2 * s)
        blocks = A.reshape(*lead, n, 2 * s, n, 2 * s)
        blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., n, 2s, 2s]
        t1, t2 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        low = -_ein("...ij,...jk,...kl->...il", t2, blocks[..., s:, :s], t1)
        top = jnp.concatenate([t1, jnp.zeros_like(t1)], axis=-1)
        bottom = jnp.concatenate([low, t2], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        s *= 2
    return inv[..., 0, :, :]


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, doc_ids, chunk_size=64):
    """q, k [B,T,H,dk]; v [B,T,H,dv]; g, beta [B,T,H]; initial_state [B,H,dk,dv]; doc_ids [B,T] monotone."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    if pad:
        # Padded tokens (g = 0, beta = 0, k = 0) leave the state unchanged; they continue the last document.
        zpad = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, g, beta = map(zpad, (q, k, v, g, beta))
        doc_ids = jnp.pad(doc_ids, [(0, 0), (0, pad)], mode="edge")

    def to_chunks(x):  # [B, N*C, H, ...] -> [B, H, N, C, ...]
        x = x.reshape(B, N, C, H, *x.shape[3:])
        return jnp.moveaxis(x, 3, 1)

    q, k, v, g, beta = map(to_chunks, (q, k, v, g, beta))
    docs = doc_ids.reshape(B, 1, N, C)
    # The state entering chunk n belongs to the document of the token just before it.
    prev_doc = jnp.concatenate([docs[:, :, :1, 0], docs[:, :, :-1, -1]], axis=2)  # [B, 1, N]

    idx = jnp.arange(C)
    strict = idx[:, None] > idx[None, :]
    # Segment sums G_i - G_j = sum_{j<m<=i} g_m as a cumsum down each column, not a difference of two
    # cumsums: the difference cancels catastrophically in the gradient of g under strong decay.
    seg_sum = jnp.cumsum(jnp.where(strict, g[..., :, None], 0.0), axis=-2)  # [B, H, N, C, C]
    same_doc = docs[..., :, None] == docs[..., None, :]  # [B, 1, N, C, C]
    keep = ~strict.T & same_doc  # j <= i, same document
    D = jnp.where(keep, jnp.exp(jnp.where(keep, seg_sum, 0.0)), 0.0)
    G = jnp.cumsum(g, axis=-1)  # [B, H, N, C]
    e = jnp.where(docs == prev_doc[..., None], jnp.exp(G), 0.0)  # [B, H, N, C]

    A = jnp.where(strict, beta[..., :, None] * _ein("...id,...jd->...ij", k, k) * D, 0.0)
    rhs = jnp.concatenate([(beta * e)[..., None] * k, beta[..., None] * v], axis=-1)
    sol = _ein("...ij,...jd->...id", unit_lower_inverse(A), rhs)
    Wm, U = sol[..., :dk], sol[..., dk:]
    P = _ein("...id,...jd->...ij", q, k) * D
    Qe = e[..., None] * q
    Kd = D[..., -1, :, None] * k  # decay of each token to the chunk end
    e_last = e[..., -1]

    def step(S, xs):
        Wm_n, U_n, P_n, Qe_n, Kd_n, el_n = xs
        v_new = U_n - _ein("bhck,bhkv->bhcv", Wm_n, S)
        o_n = scale * (_ein("bhck,bhkv->bhcv", Qe_n, S) + _ein("bhij,bhjv->bhiv", P_n, v_new))
        S = el_n[..., None, None] * S + _ein("bhck,bhcv->bhkv", Kd_n, v_new)
        return S, o_n

    chunk_major = [jnp.moveaxis(x, 2, 0) for x in (Wm, U, P, Qe, Kd, e_last)]
    final_state, o = jax.lax.scan(step, initial_state, chunk_major)  # o [N, B, H, C, dv]
    o = jnp.transpose(o, (1, 0, 3, 2, 4)).reshape(B, N * C, H, dv)
    return o[:, :T], final_state
