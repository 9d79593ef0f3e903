"""The gated delta rule (fla's conventions): the public op `gated_delta_rule` and its decode step, the
reference (the token recurrence), the pure-XLA chunked path and the table of backends.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale S_t^T q_t.

`BACKENDS`, fastest first (`backends.select` picks for impl="auto"; measured speeds: BENCHMARKS.md):
  tpu        Mosaic TPU kernels, `pallas_kernels/gated_delta_rule/tpu.py` (chunk 64, dk, dv <= 256)
  triton     Pallas GPU kernels through Triton, `pallas_kernels/gated_delta_rule/triton.py` (chunk 64,
             dk, dv <= 256; compiled with non-bf16 inputs dk <= 128)
  fla        fla-core's own Triton kernels through jax-triton, `pallas_kernels/gated_delta_rule/fla.py` (NVIDIA
             GPUs with the `[fla]` extra; 16-bit inputs; never taken by "auto")
  xla        `chunked` below: the portable fast path and the kernels' oracle
  reference  `reference` below: the definition
Kernel rows run per shard of the mesh (`ops.mesh`); XLA partitions the other rows by itself.

Chunked form (chunk C = 64), per chunk with local inclusive gate cumsum G (see ../shared/spec/gated_delta_rule.md):
  D_ij = exp(G_i - G_j) for j <= i in the same document, else 0 (masked before exp);
  T = (I + strict_lower(beta_i k_i.k_j D_ij))^-1;  W = T diag(beta e) K;  U = T diag(beta) V;
  V_new = U - W S;  O = scale (diag(e) Q S + (Q K^T * D) V_new);  S' = e_C S + (D_C: K)^T V_new,
where e_i = exp(G_i) for tokens still in the document the entering state S belongs to, else 0. Packed
documents thus need no special case in the state pass: a document start zeroes e and cuts D. All of the
intra-chunk work is batched over chunks; only the state pass is a `lax.scan`. Everything runs in float32
at HIGHEST matmul precision (bf16 pure-XLA versions of this op are unstable).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jetnemo_jax.ops import backends, context, documents
from jetnemo_jax.ops import mesh as kernel_mesh
from jetnemo_jax.ops.backends import Backend
from pallas_kernels.gated_delta_rule import fla as fla_kernels
from pallas_kernels.gated_delta_rule import tpu as tpu_kernels
from pallas_kernels.gated_delta_rule import triton as triton_kernels

_HIGHEST = jax.lax.Precision.HIGHEST


def _ein(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HIGHEST)


def l2_normalize(x, eps=1e-6):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


# The reference: inputs already validated by `gated_delta_rule`; doc_ids monotone; everything in float32.

def delta_rule_step(state, q, k, v, g, beta, scale):
    """One token of S_t = exp(g)(I - beta k k^T) S + beta k v^T, o = scale S_t^T q.

    state [..., dk, dv] fp32; q, k [..., dk]; v [..., dv]; g, beta [...]. Returns (o, new_state).
    """
    state = state * jnp.exp(g)[..., None, None]
    err = v - jnp.einsum("...k,...kv->...v", k, state, precision=_HIGHEST)
    state = state + k[..., :, None] * (beta[..., None] * err)[..., None, :]
    o = scale * jnp.einsum("...k,...kv->...v", q, state, precision=_HIGHEST)
    return o, state


@jax.jit
def reference(q, k, v, g, beta, scale, initial_state, doc_ids):
    """Token recurrence. q, k [B,T,H,dk]; v [B,T,H,dv]; g, beta [B,T,H]; state [B,H,dk,dv]; doc_ids [B,T]."""
    def step(state, xs):
        q_t, k_t, v_t, g_t, b_t, start_t = xs
        state = jnp.where(start_t[:, None, None, None], 0.0, state)
        o_t, state = delta_rule_step(state, q_t, k_t, v_t, g_t, b_t, scale)
        return state, o_t

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, documents.document_starts(doc_ids))]
    final_state, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), final_state


# The pure-XLA path.

@jax.custom_vjp
def unit_lower_inverse(A):
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], C a power of two.

    Recursive block doubling, the kernels' scheme (`pallas_kernels/gated_delta_rule`): with X block-diagonal
    in s-blocks (the inverses so far), X - X A_s X, where A_s keeps the lower-left s-block of every 2s-block,
    fills in -T2 A21 T1 of [[T1, 0], [A21, T2]]^-1. Exact like forward substitution and it keeps LAPACK (whose
    CPU triangular solve deadlocked intermittently inside XLA's thread pool here) out of the op. Full-size
    masked matmuls, not gathered blocks: 12 matmuls and a hand-written gradient compile in a fifth of the time
    of the gathered form and its autodiff (CPU: 0.5 s against 2.2 s per fwd+bwd, in every JetBlock).
    """
    C = A.shape[-1]
    if C & (C - 1):
        raise ValueError(f"chunk size {C} must be a power of two")
    i = jnp.arange(C)
    diff = i[:, None] ^ i[None, :]  # i, j share a 2s-block but not an s-block iff s <= i ^ j < 2s
    X = jnp.broadcast_to(jnp.eye(C, dtype=A.dtype), A.shape)
    s = 1
    while s < C:
        A_s = jnp.where((diff >= s) & (diff < 2 * s) & (i[:, None] > i[None, :]), A, 0.0)
        X = X - _ein("...ij,...jk,...kl->...il", X, A_s, X)
        s *= 2
    return X


def _unit_lower_inverse_fwd(A):
    X = unit_lower_inverse(A)
    return X, X


def _unit_lower_inverse_bwd(X, dX):
    # d(I + A)^-1 = -X dA X, so dA = -X^T dX X^T on A's strictly lower entries (the only ones read).
    C = X.shape[-1]
    Xt = jnp.swapaxes(X, -1, -2)
    return (jnp.where(jnp.arange(C)[:, None] > jnp.arange(C)[None, :], -_ein("...ij,...jk,...kl->...il", Xt, dX, Xt),
                      0.0),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


# The XLA paths are jitted whole: called eagerly (tests, notebooks) an op compiles once instead of once per
# primitive (a tiny JetBlock's first eager call: 5.6 -> 1.9 s on CPU); inside a jit they are inlined.
@functools.partial(jax.jit, static_argnames="chunk_size")
def chunked(q, k, v, g, beta, scale, initial_state, doc_ids, chunk_size=64):
    """q, k [B,T,H,dk]; v [B,T,H,dv]; g, beta [B,T,H]; initial_state [B,H,dk,dv]; doc_ids [B,T] monotone."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    C = chunk_size
    # Padded tokens (g = 0, beta = 0, k = 0) leave the state unchanged; they continue the last document.
    (q, k, v, g, beta), docs, prev_doc = documents.to_chunks(C, doc_ids, q, k, v, g, beta)  # [B, H, N, C, ...]
    N = docs.shape[2]

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


# The table of backends. Every row runs (q, k, v, g, beta as given; scale; state float32; doc_ids) and returns
# (o in v's dtype, final state float32).

class Call(NamedTuple):
    """What a row's `supports` looks at."""
    dk: int
    dv: int
    dtypes: tuple  # of q, k, v
    chunk_size: int


def _float32(q, k, v, g, beta, l2norm):
    f32 = lambda x: x.astype(jnp.float32)
    qf, kf = (l2_normalize(q), l2_normalize(k)) if l2norm else (f32(q), f32(k))
    return qf, kf, f32(v), f32(g), f32(beta)


def _run_reference(q, k, v, g, beta, scale, state, doc_ids, *, l2norm, chunk_size, interpret, mesh):
    o, final_state = reference(*_float32(q, k, v, g, beta, l2norm), scale, state, doc_ids)
    return o.astype(v.dtype), final_state


def _run_xla(q, k, v, g, beta, scale, state, doc_ids, *, l2norm, chunk_size, interpret, mesh):
    o, final_state = chunked(*_float32(q, k, v, g, beta, l2norm), scale, state, doc_ids, chunk_size=chunk_size)
    return o.astype(v.dtype), final_state


def _per_shard(fn, mesh):
    """fn(q, k, v, g, beta, initial_state, starts) -> (o, final_state), run per shard of `mesh` (if any):
    batch over the rules' batch axes, heads over their head axes (the recurrence is local to a batch row and
    head)."""
    if mesh is None:
        return fn
    b, h = kernel_mesh.kernel_axes(mesh)
    tok, gate = PartitionSpec(b, None, h, None), PartitionSpec(b, None, h)
    state, rows = PartitionSpec(b, h, None, None), PartitionSpec(b, None)
    return kernel_mesh.shard_map(fn, mesh, (tok, tok, tok, gate, gate, state, rows), (tok, state))


def _run_tpu(q, k, v, g, beta, scale, state, doc_ids, *, l2norm, chunk_size, interpret, mesh):
    # q and k arrive normalised in float32 (the norm fuses with the kernels' transpose); v in its own dtype.
    qf, kf, _, gf, betaf = _float32(q, k, v, g, beta, l2norm)
    fn = lambda q, k, v, g, beta, h0, starts: tpu_kernels.gated_delta_rule(q, k, v, g, beta, scale, h0, starts,
                                                                           interpret=interpret)
    return _per_shard(fn, mesh)(qf, kf, v, gf, betaf, state, documents.document_starts(doc_ids))


def _run_triton(q, k, v, g, beta, scale, state, doc_ids, *, l2norm, chunk_size, interpret, mesh):
    # The kernels take the inputs as they are and L2-normalise q, k themselves.
    fn = lambda q, k, v, g, beta, h0, starts: triton_kernels.gated_delta_rule(
        q, k, v, g, beta, scale, h0, starts, l2norm=l2norm, interpret=interpret)
    return _per_shard(fn, mesh)(q, k, v, g, beta, state, documents.document_starts(doc_ids))


def _run_fla(q, k, v, g, beta, scale, state, doc_ids, *, l2norm, chunk_size, interpret, mesh):
    # fla's kernels take q and k normalised, in their own 16-bit dtype (as fla's l2norm kernels hand them over)
    if l2norm:
        q, k = l2_normalize(q).astype(q.dtype), l2_normalize(k).astype(k.dtype)
    fn = lambda q, k, v, g, beta, h0, doc_ids: fla_kernels.gated_delta_rule(q, k, v, g, beta, scale, h0, doc_ids)
    return _per_shard(fn, mesh)(q, k, v, g, beta, state, doc_ids)


def _chunk_64(call):
    return None if call.chunk_size == 64 else f"the kernels use chunk_size=64, got {call.chunk_size}"


def _tpu_supports(call, interpret):
    return _chunk_64(call) or backends.why_not(tpu_kernels.check_supported, call.dk, call.dv)


def _triton_supports(call, interpret):
    return _chunk_64(call) or backends.why_not(triton_kernels.check_supported, call.dk, call.dv, call.dtypes,
                                               interpret)


def _fla_supports(call, interpret):
    if interpret:
        return "fla's kernels run through jax-triton on NVIDIA GPUs only (no interpreter on CPU)"
    return _chunk_64(call) or backends.why_not(fla_kernels.check_supported, call.dk, call.dv, call.dtypes)


BACKENDS = (
    Backend("tpu", "tpu", _tpu_supports, _run_tpu, "Mosaic TPU kernels"),
    Backend("triton", "gpu", _triton_supports, _run_triton, "Pallas-Triton GPU kernels"),
    Backend("fla", "gpu", _fla_supports, _run_fla, "fla-core's Triton kernels through jax-triton", auto=False),
    Backend("xla", None, backends.anywhere, _run_xla, "chunked pure XLA"),
    Backend("reference", None, backends.anywhere, _run_reference, "token recurrence"),
)


def _check_shapes(q, k, v, g, beta):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, dk], got shape {q.shape}")
    B, T, H, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k has shape {k.shape}, expected q's shape {q.shape}")
    if v.ndim != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v has shape {v.shape}, expected [{B}, {T}, {H}, dv]")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} has shape {x.shape}, expected {(B, T, H)}")
    return B, T, H, dk, v.shape[-1]


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     segment_ids=None, use_qk_l2norm=True, impl="auto", chunk_size=64, mesh=None):
    """Gated delta rule over a sequence (fla's conventions).

    q, k [B,T,H,dk]; v [B,T,H,dv]; g (log decay, <= 0) and beta (in (0, 1]) [B,T,H];
    initial_state [B,H,dk,dv] float32; segment_ids [B,T] int (a change of id starts a new document,
    which starts from a zero state). Returns (o [B,T,H,dv] in v's dtype, final_state float32 or None).
    impl: a row of `BACKENDS` ("tpu", "triton", "xla", "reference") or "auto", the first row that this
    platform runs and that supports the call ("tpu" on TPU, "triton" on GPU where a mesh or one device makes
    the layout known, else "xla"). The kernel rows run per shard of `mesh` (else of the training step's mesh,
    `sharding.activation_sharding`, else of the `jax.set_mesh` mesh: `ops.mesh.resolve`).
    """
    B, T, H, dk, dv = _check_shapes(q, k, v, g, beta)
    if initial_state is not None and initial_state.shape != (B, H, dk, dv):
        raise ValueError(f"initial_state has shape {initial_state.shape}, expected {(B, H, dk, dv)}")
    mesh = kernel_mesh.resolve(mesh)
    row, interpret = backends.select("gated_delta_rule", BACKENDS, impl,
                                     Call(dk, dv, (q.dtype, k.dtype, v.dtype), chunk_size), mesh)
    scale = dk ** -0.5 if scale is None else scale
    state = (jnp.zeros((B, H, dk, dv), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    doc_ids = documents.doc_ids_from_segments(segment_ids, (B, T))
    ctx = context.axes(mesh)
    if ctx:  # each shard of the sequence runs the row on its own tokens, without a mesh
        run = lambda *a: row.fn(*a[:5], scale, *a[5:], l2norm=use_qk_l2norm, chunk_size=chunk_size,  # noqa: E731
                                interpret=interpret, mesh=None)
        o, final_state = context.gated_delta_rule(run, mesh, ctx, q, k, v, g, beta, state, doc_ids)
    else:
        o, final_state = row.fn(q, k, v, g, beta, scale, state, doc_ids, l2norm=use_qk_l2norm,
                                chunk_size=chunk_size, interpret=interpret, mesh=mesh)
    return o, (final_state if output_final_state else None)


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=True):
    """One decode token: q, k [B,H,dk]; v [B,H,dv]; g, beta [B,H]; state [B,H,dk,dv] fp32.

    Returns (o [B,H,dv] in v's dtype, new state float32).
    """
    B, H, dk = q.shape
    if state.shape != (B, H, dk, v.shape[-1]):
        raise ValueError(f"state has shape {state.shape}, expected {(B, H, dk, v.shape[-1])}")
    scale = dk ** -0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)
    qf, kf = (l2_normalize(q), l2_normalize(k)) if use_qk_l2norm else (f32(q), f32(k))
    # delta_rule_step rearranged so that decoding, which is bound by the state's bytes, reads S twice and
    # writes it once (XLA otherwise reads the decayed S for k, again for the update and the new S for q):
    # with a = exp(g), S^T k and S^T q come from one pass, then
    # S' = a S + k (beta (v - a S^T k))^T and o = scale (a S^T q + (q.k) beta (v - a S^T k)).
    S, a, b = f32(state), jnp.exp(f32(g))[..., None], f32(beta)[..., None]
    sk, sq = jnp.unstack(jnp.einsum("...jk,...kv->...jv", jnp.stack([kf, qf], -2), S,
                                    precision=jax.lax.Precision.HIGHEST), axis=-2)
    delta = b * (f32(v) - a * sk)
    new_state = a[..., None] * S + kf[..., :, None] * delta[..., None, :]
    o = scale * (a * sq + jnp.sum(qf * kf, -1, keepdims=True) * delta)
    return o.astype(v.dtype), new_state
