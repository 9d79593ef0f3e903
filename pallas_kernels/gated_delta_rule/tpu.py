"""Mosaic TPU kernels for the chunked gated delta rule (chunk C = 64, fp32 state and arithmetic), their layout
and their custom VJP: `gated_delta_rule` is the entry point.

Layout (`gated_delta_rule` builds it): [B, T, H, d] -> [B*H, Tp, d'] with T padded to a multiple of 64 by
tokens with g = 0, beta = 0 and zero q, k, v (they leave the state untouched), and dk, dv zero-padded to 64 or a
multiple of 128 (zero key columns change no dot product and zero value columns stay zero in the state and the
output, so the padding is exact; the scale comes from the true dk). The kernels then see q, k [BH, Tp, dk]
float32, already L2-normalised (the ops layer fuses the norm with this transpose); v [BH, Tp, dv] in any float
dtype (read as is, computed in float32); g, beta [BH, Tp, 1] float32; starts [B, Tp, 1] float32, 1.0 where a
new document starts (never at t = 0: the initial state continues the first document); h0 [BH, dk, dv]
float32. Row b of the BH axis is batch b // heads.

Per chunk (see shared/spec/gated_delta_rule.md and `jetnemo_jax.ops.delta_rule.chunked`, the XLA twin):
  D_ij = exp(G_i - G_j) for j <= i with no document start in (j, i], else 0 (masked before exp);
  e_i = exp(G_i) while token i is still in the entering state's document, else 0;
  T = (I + strict_lower(beta_i k_i.k_j D_ij))^-1;  W = T diag(beta e) K;  U = T diag(beta) V;
  V_new = U - W S;  O = scale (diag(e) Q S + (Q K^T * D) V_new);  S' = e_C S + (diag(D_C:) K)^T V_new.
A document start thus needs no branch: it zeroes e and cuts D. The grid is (BH, chunks) with the chunk
axis sequential and the state (or its gradient) carried in VMEM scratch, so W, U and V_new never reach HBM.

Kernels: `forward` (o and the final state), `chunk_states` (the state entering every chunk, recomputed
for the backward instead of being kept from the forward: it costs one state pass at backward time, the same
HBM traffic, but no activation memory between forward and backward), and `backward` (one reverse pass over
chunks carrying dS). All quantities stay 2D with C rows, so per-token scalars are [C, 1] columns; sums over
token ranges are matmuls with 0/1 triangular matrices, which keeps every operation a plain Mosaic op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

CHUNK = 64
MAX_HEAD_DIM = 256  # the VMEM budget of the kernels is worked out up to dk = dv = 256
_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b, ca, cb):
    return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=_F32)


def _dot(a, b):  # a @ b
    return _mm(a, b, 1, 0)


def _dot_t(a, b):  # a @ b.T
    return _mm(a, b, 1, 1)


def _t_dot(a, b):  # a.T @ b
    return _mm(a, b, 0, 0)


def _rowsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _total(x):  # [r, c] -> [1, 1]
    return jnp.sum(_rowsum(x), axis=0, keepdims=True)


def _iota():
    return (jax.lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0),
            jax.lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1))


def _lanes(col):  # [C, 1] -> [C, C], the column repeated along lanes
    return jnp.broadcast_to(col, (CHUNK, CHUNK))


def _matvec(m, col):  # [C, C] @ [C, 1] as a full-width matmul (Mosaic has no N = 1 matmul)
    return _dot(m, _lanes(col))[:, :1]


def _unit_lower_inverse(a, row, col):
    """(I + a)^-1 for strictly lower a [C, C]: the recursive block inverse of chunked.unit_lower_inverse,
    written with full-size masked matmuls. With X block-diagonal in s-blocks (the inverses found so far),
    X - X a_s X, where a_s keeps only the lower-left s-blocks of each 2s-block, fills in -T2 A21 T1."""
    x = (row == col).astype(_F32)
    diff = jnp.bitwise_xor(row, col)  # i, j share a 2s-block but not an s-block iff s <= i ^ j < 2s
    s = 1
    while s < CHUNK:
        a_s = jnp.where((diff >= s) & (diff < 2 * s) & (row > col), a, 0.0)
        x = x - _dot(x, _dot(a_s, x))
        s *= 2
    return x


def _chunk_terms(k, g, beta, starts):
    """Gate and document terms of one chunk (see the module docstring); all masks applied before exp."""
    row, col = _iota()
    incl = (col <= row).astype(_F32)  # [i, m] = m <= i: inclusive prefix sums
    after = (col > row).astype(_F32)  # [j, m] = m > j: suffix sums past j
    strict = row > col
    # Sums over (j, i] as one 0/1 matmul per matrix, never as a difference of two cumsums (that cancels
    # catastrophically under strong decay).
    seg_g = _dot(incl, jnp.where(strict, _lanes(g), 0.0))
    seg_st = _dot(incl, jnp.where(strict, _lanes(starts), 0.0))
    keep = (col <= row) & (seg_st < 0.5)
    d = jnp.where(keep, jnp.exp(jnp.where(keep, seg_g, 0.0)), 0.0)
    in_doc = _matvec(incl, starts) < 0.5  # no start in [0, i]: still the entering state's document
    e = jnp.where(in_doc, jnp.exp(jnp.where(in_doc, _matvec(incl, g), 0.0)), 0.0)
    last_keep = _matvec(after, starts) < 0.5
    d_last = jnp.where(last_keep, jnp.exp(jnp.where(last_keep, _matvec(after, g), 0.0)), 0.0)
    is_last = jax.lax.broadcasted_iota(jnp.int32, (CHUNK, 1), 0) == CHUNK - 1
    e_last = jnp.sum(jnp.where(is_last, e, 0.0), axis=0, keepdims=True)  # [1, 1]
    kk = _dot_t(k, k)
    a = jnp.where(strict, beta * kk * d, 0.0)
    t = _unit_lower_inverse(a, row, col)
    return dict(row=row, col=col, strict=strict, d=d, e=e, d_last=d_last, e_last=e_last, kk=kk, t=t)


def _load(refs):
    return [r[...].astype(_F32) for r in refs]


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, st_ref, h0_ref, *refs, scale, n_chunks, with_output):
    out_refs, s_scr = refs[:-1], refs[-1]
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        s_scr[...] = h0_ref[...]

    s = s_scr[...]
    if not with_output:
        out_refs[0][...] = s  # the state entering this chunk
    q, k, v, g, beta, starts = _load((q_ref, k_ref, v_ref, g_ref, b_ref, st_ref))
    c = _chunk_terms(k, g, beta, starts)
    w = _dot(c["t"], beta * c["e"] * k)
    u = _dot(c["t"], beta * v)
    v_new = u - _dot(w, s)
    s_new = c["e_last"] * s + _t_dot(c["d_last"] * k, v_new)
    s_scr[...] = s_new
    if with_output:
        o_ref, final_ref = out_refs
        o = scale * (_dot(c["e"] * q, s) + _dot(_dot_t(q, k) * c["d"], v_new))
        o_ref[...] = o.astype(o_ref.dtype)

        @pl.when(n == n_chunks - 1)
        def _():
            final_ref[...] = s_new


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, st_ref, s_ref, do_ref, dst_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, db_ref, dh0_ref, ds_scr, *, scale, n_chunks):
    n = pl.program_id(1)  # chunk n_chunks - 1 - n: the reverse pass

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dst_ref[...]

    ds = ds_scr[...]  # gradient of the state leaving this chunk
    q, k, v, g, beta, starts, s, do = _load((q_ref, k_ref, v_ref, g_ref, b_ref, st_ref, s_ref, do_ref))
    c = _chunk_terms(k, g, beta, starts)
    t, d, e, d_last, kk = c["t"], c["d"], c["e"], c["d_last"], c["kk"]
    rk, rv = beta * e * k, beta * v
    w = _dot(t, rk)
    v_new = _dot(t, rv) - _dot(w, s)
    qk = _dot_t(q, k)

    # Output and state-update terms.
    dv_new = scale * _t_dot(qk * d, do) + _dot(d_last * k, ds)
    dp = scale * _dot_t(do, v_new)  # gradient of P = QK^T * D
    dqk = dp * d
    dq = scale * e * _dot_t(do, s) + _dot(dqk, k)
    dk = _t_dot(dqk, q)
    dd = dp * qk
    dkd = _dot_t(v_new, ds)  # gradient of diag(d_last) K
    dk = dk + d_last * dkd
    dd_last = _rowsum(dkd * k)
    de = scale * _rowsum(do * _dot(q, s))
    de_last = _total(s * ds)
    ds_prev = c["e_last"] * ds + scale * _t_dot(e * q, do) - _t_dot(w, dv_new)

    # Through W = T Rk, U = T Rv and V_new = U - W S.
    dw = -_dot_t(dv_new, s)
    dt = _dot_t(dw, rk) + _dot_t(dv_new, rv)
    drk = _t_dot(t, dw)
    drv = _t_dot(t, dv_new)
    dk = dk + beta * e * drk
    drk_k = _rowsum(drk * k)
    dbeta = e * drk_k + _rowsum(drv * v)
    de = de + beta * drk_k

    # Through T = (I + A)^-1: dA = -T^T dT T^T on the strictly lower part, A = beta_i (k_i.k_j) D_ij.
    da = jnp.where(c["strict"], -_t_dot(t, _dot_t(dt, t)), 0.0)
    dbeta = dbeta + _rowsum(da * kk * d)
    dkk = da * beta * d
    dk = dk + _dot(dkk, k) + _t_dot(dkk, k)
    dd = dd + da * beta * kk

    # Gates: D_ij = exp(sum of g over (j, i]) -> dg_m = sum_{i >= m > j} dD_ij D_ij; e_i over [0, i];
    # d_last_j over (j, C-1]; e_last over the whole chunk.
    row, col = c["row"], c["col"]
    ge = (col >= row).astype(_F32)  # [m, i] = i >= m
    dseg = _dot(ge, dd * d)  # [m, j] = sum_{i >= m} dD_ij D_ij
    dg = (_rowsum(jnp.where(c["strict"], dseg, 0.0)) + _matvec(ge, de * e)
          + _matvec(c["strict"].astype(_F32), dd_last * d_last) + de_last * c["e_last"])

    ds_scr[...] = ds_prev
    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = beta * drv
    dg_ref[...] = dg
    db_ref[...] = dbeta

    @pl.when(n == n_chunks - 1)
    def _():
        dh0_ref[...] = ds_prev


def _shapes(q, v, starts):
    bh, tp, dk = q.shape
    dv = v.shape[-1]
    if tp % CHUNK:
        raise ValueError(f"sequence length {tp} must be padded to a multiple of {CHUNK}")
    for name, size in (("dk", dk), ("dv", dv)):
        if size != 64 and size % 128:
            raise ValueError(f"{name}={size} must be 64 or a multiple of 128 (pad with zeros)")
    if bh % starts.shape[0]:
        raise ValueError(f"BH={bh} is not a multiple of the batch size {starts.shape[0]}")
    return bh, tp // CHUNK, dk, dv, bh // starts.shape[0]


def _call(kernel, grid_n, in_specs, out_specs, out_shape, scratch, interpret, *args):
    return pl.pallas_call(
        kernel, grid=(args[0].shape[0], grid_n), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret)(*args)


def _token_specs(dk, dv, heads, chunk_of):
    """BlockSpecs for q, k, v, g, beta, starts at chunk chunk_of(n) of row b."""
    sq = pl.Squeezed()
    tok = lambda width: pl.BlockSpec((sq, CHUNK, width), lambda b, n: (b, chunk_of(n), 0))
    return [tok(dk), tok(dk), tok(dv), tok(1), tok(1),
            pl.BlockSpec((sq, CHUNK, 1), lambda b, n: (b // heads, chunk_of(n), 0))]


def _state_spec(dk, dv):
    return pl.BlockSpec((pl.Squeezed(), dk, dv), lambda b, n: (b, 0, 0))


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def forward(q, k, v, g, beta, starts, h0, *, scale, interpret=False):
    """Returns o [BH, Tp, dv] in v's dtype and the final state [BH, dk, dv] float32."""
    bh, n_chunks, dk, dv, heads = _shapes(q, v, starts)
    kernel = functools.partial(_fwd_kernel, scale=scale, n_chunks=n_chunks, with_output=True)
    out_specs = [pl.BlockSpec((pl.Squeezed(), CHUNK, dv), lambda b, n: (b, n, 0)), _state_spec(dk, dv)]
    out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(h0.shape, _F32)]
    return tuple(_call(kernel, n_chunks, [*_token_specs(dk, dv, heads, lambda n: n), _state_spec(dk, dv)],
                       out_specs, out_shape, [pltpu.VMEM((dk, dv), _F32)], interpret,
                       q, k, v, g, beta, starts, h0))


@functools.partial(jax.jit, static_argnames=("interpret",))
def chunk_states(q, k, v, g, beta, starts, h0, *, interpret=False):
    """The state entering every chunk, [BH, Tp // C, dk, dv] float32 (the backward's recomputation)."""
    bh, n_chunks, dk, dv, heads = _shapes(q, v, starts)
    kernel = functools.partial(_fwd_kernel, scale=1.0, n_chunks=n_chunks, with_output=False)
    out_spec = pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), dk, dv), lambda b, n: (b, n, 0, 0))
    return _call(kernel, n_chunks, [*_token_specs(dk, dv, heads, lambda n: n), _state_spec(dk, dv)],
                 out_spec, jax.ShapeDtypeStruct((bh, n_chunks, dk, dv), _F32),
                 [pltpu.VMEM((dk, dv), _F32)], interpret, q, k, v, g, beta, starts, h0)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def backward(q, k, v, g, beta, starts, states, do, d_final, *, scale, interpret=False):
    """Gradients (dq, dk, dv, dg, dbeta, dh0), all float32, from the chunk-entry `states`, the output
    cotangent do [BH, Tp, dv] and the final-state cotangent d_final [BH, dk, dv]."""
    bh, n_chunks, dk, dv, heads = _shapes(q, v, starts)
    rev = lambda n: n_chunks - 1 - n
    sq = pl.Squeezed()
    in_specs = [*_token_specs(dk, dv, heads, rev),
                pl.BlockSpec((sq, sq, dk, dv), lambda b, n: (b, rev(n), 0, 0)),
                pl.BlockSpec((sq, CHUNK, dv), lambda b, n: (b, rev(n), 0)),
                _state_spec(dk, dv)]
    tok = lambda width: pl.BlockSpec((sq, CHUNK, width), lambda b, n: (b, rev(n), 0))
    out_specs = [tok(dk), tok(dk), tok(dv), tok(1), tok(1), _state_spec(dk, dv)]
    f32 = lambda x: jax.ShapeDtypeStruct(x.shape, _F32)
    out_shape = [f32(q), f32(k), f32(v), f32(g), f32(beta), f32(d_final)]
    kernel = functools.partial(_bwd_kernel, scale=scale, n_chunks=n_chunks)
    return tuple(_call(kernel, n_chunks, in_specs, out_specs, out_shape, [pltpu.VMEM((dk, dv), _F32)],
                       interpret, q, k, v, g, beta, starts, states, do, d_final))


def check_supported(dk, dv):
    for name, size in (("dk", dk), ("dv", dv)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"the Mosaic TPU kernels support {name} up to {MAX_HEAD_DIM}, got {name}={size}")


def _padded(d):
    return 64 if d <= 64 else -(-d // 128) * 128


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _core(q, k, v, g, beta, starts, h0, scale, interpret):
    return forward(q, k, v, g, beta, starts, h0, scale=scale, interpret=interpret)


def _core_fwd(q, k, v, g, beta, starts, h0, scale, interpret):
    return _core(q, k, v, g, beta, starts, h0, scale, interpret), (q, k, v, g, beta, starts, h0)


def _core_bwd(scale, interpret, res, cts):
    q, k, v, g, beta, starts, h0 = res
    do, d_final = cts
    states = chunk_states(q, k, v, g, beta, starts, h0, interpret=interpret)
    dq, dk, dv, dg, dbeta, dh0 = backward(q, k, v, g, beta, starts, states, do, d_final, scale=scale,
                                          interpret=interpret)
    return dq, dk, dv.astype(v.dtype), dg, dbeta, None, dh0


_core.defvjp(_core_fwd, _core_bwd)


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, starts, *, interpret=False):
    """q, k [B,T,H,dk] L2-normalised float32; v [B,T,H,dv] any float dtype; g, beta [B,T,H] float32;
    initial_state [B,H,dk,dv] float32; starts [B,T] bool (`jetnemo_jax.ops.documents.document_starts`).
    Returns (o [B,T,H,dv] in v's dtype, final state float32), differentiable in all but `starts`."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    check_supported(dk, dv)
    dkp, dvp = _padded(dk), _padded(dv)
    Tp = -(-T // CHUNK) * CHUNK

    def rows(x, width):  # [B, T, H, d] -> [B*H, Tp, width]
        x = jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0), (0, width - x.shape[-1])])
        return jnp.swapaxes(x, 1, 2).reshape(B * H, Tp, width)

    starts = jnp.pad(starts.astype(jnp.float32), [(0, 0), (0, Tp - T)])[..., None]
    h0 = jnp.pad(initial_state, [(0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv)]).reshape(B * H, dkp, dvp)
    o, final = _core(rows(q, dkp), rows(k, dkp), rows(v, dvp), rows(g[..., None], 1),
                     rows(beta[..., None], 1), starts, h0, scale, interpret)
    o = jnp.swapaxes(o.reshape(B, H, Tp, dvp)[:, :, :T, :dv], 1, 2)
    return o, final.reshape(B, H, dkp, dvp)[:, :, :dk, :dv]
