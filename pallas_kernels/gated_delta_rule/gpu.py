"""Pallas GPU kernels (Triton lowering) for the chunked gated delta rule: chunk C = 64, fp32 state.

The kernels read the caller's layout directly and pad inside with masked loads, so no padded or
transposed copy of the inputs reaches HBM: q, k [B, T, H, dk] raw (L2-normalised here when `l2norm`);
v [B, T, H, dv]; g, beta [B, T, H]; starts [B, T] float32, 1.0 where a new document starts (never at
t = 0: the initial state continues the first document); h0 [B, H, dk, dv] float32. Masked-out tokens
load as q = k = v = g = beta = 0, which leaves the state untouched; masked-out key/value columns are zero,
which changes no dot product. Triton wants power-of-two tiles with dot dims >= 16, hence the padding.

Per chunk (see shared/spec/gated_delta_rule.md; jetnemo_jax/ops/chunked.py is the XLA twin):
  D_ij = exp(sum of g over (j, i]) for j <= i in one document, else 0 (masked before exp);
  e_i = exp(G_i) while token i is still in the entering state's document, else 0;
  T = (I + strict_lower(beta_i k_i.k_j D_ij))^-1;  W = T diag(beta e) K;  U = T diag(beta) V;
  V_new = U - W S;  O = scale (diag(e) Q S + (Q K^T * D) V_new);  S' = e_C S + (diag(D_C:) K)^T V_new.

Kernels (fla's pipeline shape, with W, U and V_new recomputed where needed instead of stored):
`inverses` (T of every chunk, parallel over chunks: the only chunk quantity saved for the backward);
`chunk_states` (the state entering every chunk and the final state: the serial pass, one program per
(batch*head, dv block) looping over chunks with the fp32 state in registers and little else per step);
`output` (parallel over chunks); `state_grads` (the serial reverse pass carrying dS); `input_grads`
(parallel over chunks). The delta rule is separable over value columns, so dv blocks are independent:
they add parallelism when B*H is small, and every gradient except dv comes out as one partial per block
(the caller sums them; the whole backward is linear in the cotangents).

Precision: `fast` dots take bf16 operands with fp32 accumulation when the inputs are bf16 (fla's choice:
q, k, v, T, W, V_new, the states and their gradients rounded to bf16 for the matmul), else `precise`
ones; `precise` dots (the inverse, and everything for fp32 inputs) are IEEE fp32 in interpret mode and
3xTF32 on the GPU (fp32 accuracy on the tensor cores).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

CHUNK = 64
_F32 = jnp.float32
# Warps per program: 8 for the serial passes, whose [dk, block_v] fp32 state tiles crowd 4 warps'
# registers (H100, 2B shape: chunk states 1.21 vs 1.43 ms, state gradients 2.37 vs 4.02 ms); 4 elsewhere.
NUM_WARPS, SERIAL_WARPS, NUM_STAGES = 4, 8, 2


def padded(d: int) -> int:
    """Tile width of a head dim: a power of two, at least 16 (Triton's smallest dot dim)."""
    return max(16, pl.next_power_of_2(d))


class _Dots:
    """Matmuls a @ b with optional transposes, at the kernel's two precisions."""

    def __init__(self, fast_dtype, interpret, tf32x3=True):
        self.fast_dtype = jnp.dtype(fast_dtype)
        gpu = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if tf32x3 else jax.lax.DotAlgorithmPreset.TF32_TF32_F32
        self.precision = jax.lax.Precision.HIGHEST if interpret else gpu

    def precise(self, a, b, ta=False, tb=False):
        dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
        return jax.lax.dot_general(a.astype(_F32), b.astype(_F32), dims, precision=self.precision,
                                   preferred_element_type=_F32)

    def fast(self, a, b, ta=False, tb=False):
        if self.fast_dtype == _F32:
            return self.precise(a, b, ta, tb)
        dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
        return jax.lax.dot_general(a.astype(self.fast_dtype), b.astype(self.fast_dtype), dims,
                                   precision=jax.lax.Precision.DEFAULT, preferred_element_type=_F32)


def _iota():
    idx = jnp.arange(CHUNK, dtype=jnp.int32)
    return idx, idx[:, None], idx[None, :]


def _l2norm(x):
    r = jax.lax.rsqrt(jnp.sum(x * x, axis=1) + 1e-6)
    return x * r[:, None], r


class _Chunk:
    """Loads of chunk n of row (b, h), masked to the true T, dk and dv."""

    def __init__(self, b, h, T, dk, dv, dkp):
        self.b, self.h, self.T, self.dk, self.dv, self.dkp = b, h, T, dk, dv, dkp

    def rows(self, n):
        t = n * CHUNK + jnp.arange(CHUNK, dtype=jnp.int32)
        return pl.ds(n * CHUNK, CHUNK), t < self.T

    def tokens(self, ref, n, width, start, true_width):
        """[C, width] slice of a [B, T, H, d] ref: columns start..start+width, zero outside."""
        rows, ok = self.rows(n)
        cols = start + jnp.arange(width, dtype=jnp.int32)
        mask = ok[:, None] & (cols < true_width)[None, :]
        ref = ref.at[self.b, rows, self.h, pl.ds(start, width)]
        return plt.load(ref, mask=mask, other=0.0).astype(_F32), mask

    def scalars(self, ref, n):  # [C] from a [B, T, H] ref
        rows, ok = self.rows(n)
        return plt.load(ref.at[self.b, rows, self.h], mask=ok, other=0.0).astype(_F32)

    def starts(self, ref, n):  # [C] from a [B, T] ref
        rows, ok = self.rows(n)
        return plt.load(ref.at[self.b, rows], mask=ok, other=0.0)

    def key(self, ref, n, l2norm):
        """Keys or queries, L2-normalised in fp32 when asked: (x, 1 / norm or None, mask)."""
        x, mask = self.tokens(ref, n, self.dkp, 0, self.dk)
        if not l2norm:
            return x, None, mask
        x, r = _l2norm(x)
        return x, r, mask


def _state_gates(g, st):
    """e, D's last row and e's last entry: what the serial state passes need (no [C, C] scan)."""
    idx, row, col = _iota()
    after = col > row  # [j, m]: m in (j, C-1]
    cut_after = jnp.sum(jnp.where(after, st[None, :], 0.0), axis=1) > 0.5
    g_after = jnp.sum(jnp.where(after, g[None, :], 0.0), axis=1)
    d_last = jnp.where(cut_after, 0.0, jnp.exp(jnp.where(cut_after, 0.0, g_after)))
    in_doc = jnp.cumsum(st) < 0.5  # no document start in [0, i]: still the entering state's document
    e = jnp.where(in_doc, jnp.exp(jnp.where(in_doc, jnp.cumsum(g), 0.0)), 0.0)
    e_last = jnp.sum(jnp.where(idx == CHUNK - 1, e, 0.0))
    return e, d_last, e_last


def _gates(g, st):
    """D (the masked decay), e, d_last, e_last and the strict-lower mask of one chunk; every exponent
    masked before exp. Sums over (j, i] come from one cumsum down each column (never a difference of two
    cumsums, which cancels catastrophically under strong decay)."""
    _, row, col = _iota()
    strict = row > col
    doc = jnp.cumsum(st)  # documents started inside the chunk up to token i
    seg = jnp.cumsum(jnp.where(strict, g[:, None], 0.0), axis=0)  # [i, j] = sum_{j < m <= i} g_m
    keep = (row >= col) & (doc[:, None] == doc[None, :])
    d = jnp.where(keep, jnp.exp(jnp.where(keep, seg, 0.0)), 0.0)
    return (d, *_state_gates(g, st), strict)


def _unit_lower_inverse(a, dots):
    """(I + a)^-1 for strictly lower a [C, C] by recursive block doubling: with X block-diagonal in
    s-blocks (the inverses so far), X - X a_s X, where a_s keeps the lower-left s-block of every
    2s-block, fills in -T2 A21 T1 (the TPU kernel's scheme)."""
    _, row, col = _iota()
    x = (row == col).astype(_F32)
    diff = jnp.bitwise_xor(row, col)  # i, j share a 2s-block but not an s-block iff s <= i ^ j < 2s
    s = 1
    while s < CHUNK:
        a_s = jnp.where((diff >= s) & (diff < 2 * s) & (row > col), a, 0.0)
        x = x - dots.precise(x, dots.precise(a_s, x))
        s *= 2
    return x


def _rev_cumsum(x, axis=0):  # inclusive sums from the end (Triton lowers forward cumsums only)
    return jnp.sum(x, axis=axis, keepdims=True) - jnp.cumsum(x, axis=axis) + x


def _inverse_kernel(k_ref, g_ref, b_ref, st_ref, t_ref, *, heads, T, dk, dkp, l2norm, dots):
    bh, n = pl.program_id(0), pl.program_id(1)
    ld = _Chunk(bh // heads, bh % heads, T, dk, 0, dkp)
    k, _, _ = ld.key(k_ref, n, l2norm)
    beta = ld.scalars(b_ref, n)
    d, *_, strict = _gates(ld.scalars(g_ref, n), ld.starts(st_ref, n))
    a = jnp.where(strict, beta[:, None] * dots.fast(k, k, tb=True) * d, 0.0)
    plt.store(t_ref.at[bh, pl.ds(n * CHUNK, CHUNK)], _unit_lower_inverse(a, dots))


class _Program:
    """Row (b, h) and value columns v0..v0+bv of this program, and the masks of its state tile."""

    def __init__(self, bh, iv, heads, T, dk, dv, dkp, bv):
        self.bh, self.iv, self.b, self.h, self.v0 = bh, iv, bh // heads, bh % heads, iv * bv
        self.ld = _Chunk(self.b, self.h, T, dk, dv, dkp)
        self.dkp, self.bv, self.dv = dkp, bv, dv
        krows, vcols = jnp.arange(dkp, dtype=jnp.int32), self.v0 + jnp.arange(bv, dtype=jnp.int32)
        self.smask = (krows < dk)[:, None] & (vcols < dv)[None, :]

    def state(self, ref):  # [dkp, bv] of a [B, H, dk, dv] ref
        return ref.at[self.b, self.h, pl.ds(0, self.dkp), pl.ds(self.v0, self.bv)]

    def chunk_state(self, ref, n):  # [dkp, bv] of chunk n in a [BH, N*dkp, dvp] ref
        return ref.at[self.bh, pl.ds(n * self.dkp, self.dkp), pl.ds(self.v0, self.bv)]

    def values(self, ref, n):  # [C, bv] of a [B, T, H, dv] ref and its mask
        return self.ld.tokens(ref, n, self.bv, self.v0, self.dv)

    def tinv(self, ref, n):
        return plt.load(ref.at[self.bh, pl.ds(n * CHUNK, CHUNK)])


def _v_new(t, k, v, beta, e, s, dots):
    """W = T diag(beta e) K and V_new = T diag(beta) V - W S."""
    w = dots.fast(t, (beta * e)[:, None] * k)
    return w, dots.fast(t, beta[:, None] * v) - dots.fast(w, s)


def _states_kernel(k_ref, v_ref, g_ref, b_ref, st_ref, h0_ref, t_ref, states_ref, final_ref, *, heads, T,
                   dk, dv, dkp, bv, n_chunks, l2norm, dots):
    """Serial pass: the state entering every chunk (stored) and the final state."""
    p = _Program(pl.program_id(0), pl.program_id(1), heads, T, dk, dv, dkp, bv)

    def body(n, s):
        plt.store(p.chunk_state(states_ref, n), s.astype(states_ref.dtype))
        k, _, _ = p.ld.key(k_ref, n, l2norm)
        v, _ = p.values(v_ref, n)
        beta = p.ld.scalars(b_ref, n)
        e, d_last, e_last = _state_gates(p.ld.scalars(g_ref, n), p.ld.starts(st_ref, n))
        _, v_new = _v_new(p.tinv(t_ref, n), k, v, beta, e, s, dots)
        return e_last * s + dots.fast(d_last[:, None] * k, v_new, ta=True)

    s = jax.lax.fori_loop(0, n_chunks, body, plt.load(p.state(h0_ref), mask=p.smask, other=0.0))
    plt.store(p.state(final_ref), s, mask=p.smask)


def _output_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, st_ref, t_ref, states_ref, o_ref, *, heads, T, dk, dv,
                   dkp, bv, scale, l2norm, dots):
    """Parallel over chunks: O = scale (diag(e) Q S + (Q K^T * D) V_new) from the chunk's entering state."""
    n = pl.program_id(1)
    p = _Program(pl.program_id(0), pl.program_id(2), heads, T, dk, dv, dkp, bv)
    s = plt.load(p.chunk_state(states_ref, n)).astype(_F32)
    q, _, _ = p.ld.key(q_ref, n, l2norm)
    k, _, _ = p.ld.key(k_ref, n, l2norm)
    v, vmask = p.values(v_ref, n)
    beta = p.ld.scalars(b_ref, n)
    d, e, _, _, _ = _gates(p.ld.scalars(g_ref, n), p.ld.starts(st_ref, n))
    _, v_new = _v_new(p.tinv(t_ref, n), k, v, beta, e, s, dots)
    o = dots.fast(e[:, None] * q, s) + dots.fast(dots.fast(q, k, tb=True) * d, v_new)
    plt.store(o_ref.at[p.b, p.ld.rows(n)[0], p.h, pl.ds(p.v0, bv)], (scale * o).astype(o_ref.dtype), mask=vmask)


def _dstates_kernel(q_ref, k_ref, g_ref, b_ref, st_ref, t_ref, do_ref, dfin_ref, dstates_ref, dh0_ref, *,
                    heads, T, dk, dv, dkp, bv, n_chunks, scale, l2norm, dots):
    """Serial reverse pass: the gradient of the state leaving every chunk (stored) and of h0:
    dS <- e_C dS + scale (diag(e) Q)^T dO - W^T dV_new, dV_new = scale (QK^T * D)^T dO + diag(D_C:) K dS."""
    p = _Program(pl.program_id(0), pl.program_id(1), heads, T, dk, dv, dkp, bv)

    def body(i, ds):
        n = n_chunks - 1 - i
        plt.store(p.chunk_state(dstates_ref, n), ds.astype(dstates_ref.dtype))
        q, _, _ = p.ld.key(q_ref, n, l2norm)
        k, _, _ = p.ld.key(k_ref, n, l2norm)
        do, _ = p.values(do_ref, n)
        beta = p.ld.scalars(b_ref, n)
        d, e, d_last, e_last, _ = _gates(p.ld.scalars(g_ref, n), p.ld.starts(st_ref, n))
        w = dots.fast(p.tinv(t_ref, n), (beta * e)[:, None] * k)
        dv_new = scale * dots.fast(dots.fast(q, k, tb=True) * d, do, ta=True) + dots.fast(d_last[:, None] * k, ds)
        return e_last * ds + scale * dots.fast(e[:, None] * q, do, ta=True) - dots.fast(w, dv_new, ta=True)

    ds = jax.lax.fori_loop(0, n_chunks, body, plt.load(p.state(dfin_ref), mask=p.smask, other=0.0))
    plt.store(p.state(dh0_ref), ds, mask=p.smask)


def _grads_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, st_ref, t_ref, s_ref, do_ref, ds_ref,
                  dq_ref, dk_ref, dv_ref, dg_ref, db_ref, *, heads, T, dk, dv, dkp, bv, scale, l2norm, dots):
    """Parallel over chunks: every input gradient of one chunk from its entering state S and the gradient
    dS of its leaving state; dq, dk, dg, dbeta are this dv block's partials."""
    n = pl.program_id(1)
    p = _Program(pl.program_id(0), pl.program_id(2), heads, T, dk, dv, dkp, bv)
    fast = dots.fast
    # Ordered so that few [C, dk] tiles are live at once (they cost 64 registers a thread each at 4 warps).
    k, rk_norm, kmask = p.ld.key(k_ref, n, l2norm)
    v, vmask = p.values(v_ref, n)
    do, _ = p.values(do_ref, n)
    beta = p.ld.scalars(b_ref, n)
    d, e, d_last, e_last, strict = _gates(p.ld.scalars(g_ref, n), p.ld.starts(st_ref, n))
    t = p.tinv(t_ref, n)
    s = plt.load(p.chunk_state(s_ref, n)).astype(_F32)
    ds = plt.load(p.chunk_state(ds_ref, n)).astype(_F32)
    rk, rv = (beta * e)[:, None] * k, beta[:, None] * v
    _, v_new = _v_new(t, k, v, beta, e, s, dots)
    kk = fast(k, k, tb=True)
    q, rq, _ = p.ld.key(q_ref, n, l2norm)
    qk = fast(q, k, tb=True)

    # Output terms: dq is complete here and leaves first.
    dp = scale * fast(do, v_new, tb=True)  # gradient of P = QK^T * D
    dqk = dp * d
    dq = scale * e[:, None] * fast(do, s, tb=True) + fast(dqk, k)
    if l2norm:  # d/dx of x / |x| (linear in the cotangent, so per-block partials still add up)
        dq = rq[:, None] * (dq - q * jnp.sum(dq * q, axis=1)[:, None])
    rows, ok = p.ld.rows(n)
    plt.store(dq_ref.at[p.iv, p.b, rows, p.h, pl.ds(0, dkp)], dq, mask=kmask)
    dk_ = fast(dqk, q, ta=True)
    de = scale * jnp.sum(do * fast(q, s), axis=1)
    dd = dp * qk

    # State-update terms.
    dv_new = scale * fast(qk * d, do, ta=True) + fast(d_last[:, None] * k, ds)
    dkd = fast(v_new, ds, tb=True)  # gradient of diag(d_last) K
    dk_ = dk_ + d_last[:, None] * dkd
    dd_last = jnp.sum(dkd * k, axis=1)
    de_last = jnp.sum(s * ds)

    # Through W = T Rk, U = T Rv and V_new = U - W S.
    dw = -fast(dv_new, s, tb=True)
    dt = fast(dw, rk, tb=True) + fast(dv_new, rv, tb=True)
    drk = fast(t, dw, ta=True)
    drv = fast(t, dv_new, ta=True)
    plt.store(dv_ref.at[p.b, rows, p.h, pl.ds(p.v0, bv)], (beta[:, None] * drv).astype(dv_ref.dtype), mask=vmask)
    dk_ = dk_ + (beta * e)[:, None] * drk
    drk_k = jnp.sum(drk * k, axis=1)
    dbeta = e * drk_k + jnp.sum(drv * v, axis=1)
    de = de + beta * drk_k

    # Through T = (I + A)^-1: dA = -T^T dT T^T on the strictly lower part, A = beta_i (k_i.k_j) D_ij.
    da = jnp.where(strict, -fast(t, fast(dt, t, tb=True), ta=True), 0.0)
    dbeta = dbeta + jnp.sum(da * kk * d, axis=1)
    dkk = da * beta[:, None] * d
    dk_ = dk_ + fast(dkk, k) + fast(dkk, k, ta=True)
    dd = dd + da * beta[:, None] * kk

    # Gates: D_ij = exp(sum of g over (j, i]) -> dg_m = sum_{i >= m > j} dD_ij D_ij; e_i over [0, i];
    # d_last_j over (j, C-1]; e_last over the whole chunk.
    dseg = _rev_cumsum(dd * d, axis=0)  # [m, j] = sum_{i >= m} dD_ij D_ij
    x = dd_last * d_last
    dg = (jnp.sum(jnp.where(strict, dseg, 0.0), axis=1) + _rev_cumsum(de * e)
          + (jnp.cumsum(x) - x) + de_last * e_last)

    if l2norm:
        dk_ = rk_norm[:, None] * (dk_ - k * jnp.sum(dk_ * k, axis=1)[:, None])
    plt.store(dk_ref.at[p.iv, p.b, rows, p.h, pl.ds(0, dkp)], dk_, mask=kmask)
    plt.store(dg_ref.at[p.iv, p.b, rows, p.h], dg, mask=ok)
    plt.store(db_ref.at[p.iv, p.b, rows, p.h], dbeta, mask=ok)


def _dims(q, v, block_v):
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    dkp, dvp = padded(dk), padded(dv)
    bv = min(dvp, block_v)
    if bv & (bv - 1) or bv < 16:
        raise ValueError(f"block_v={block_v} must be a power of two >= 16")
    return dict(B=B, T=T, H=H, dk=dk, dv=dv, dkp=dkp, dvp=dvp, bv=bv, nv=dvp // bv, N=pl.cdiv(T, CHUNK))


def dot_dtype(*xs):
    """bf16 operands for the fast dots when every input (array or dtype) is bf16, else float32."""
    return jnp.bfloat16 if all(jnp.dtype(getattr(x, "dtype", x)) == jnp.bfloat16 for x in xs) else _F32


def _call(kernel, grid, out_shape, interpret, num_warps, fast_dtype, *args):
    # fp32 tiles are twice the size: one pipeline stage keeps the serial passes in shared memory.
    stages = NUM_STAGES if fast_dtype == jnp.bfloat16 else 1
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=interpret,
                          compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=stages))(*args)


def _kernel(fn, m, fast_dtype, interpret, tf32x3=True, **static):
    return functools.partial(fn, heads=m["H"], T=m["T"], dk=m["dk"], dkp=m["dkp"],
                             dots=_Dots(fast_dtype, interpret, tf32x3), **static)


_STATIC = ("l2norm", "block_v", "interpret", "num_warps")


@functools.partial(jax.jit, static_argnames=("l2norm", "fast_dtype", "interpret", "num_warps", "tf32x3"))
def inverses(k, g, beta, starts, *, l2norm, fast_dtype, interpret=False, num_warps=NUM_WARPS, tf32x3=True):
    """T of every chunk, [B*H, N*C, C] float32 (chunk n in rows n*C..). `tf32x3=False`: the inverse's
    matmuls in one TF32 pass (bench only: 10-bit mantissas)."""
    m = _dims(k, k, CHUNK)
    kernel = _kernel(_inverse_kernel, m, fast_dtype, interpret, tf32x3, l2norm=l2norm)
    return _call(kernel, (m["B"] * m["H"], m["N"]), jax.ShapeDtypeStruct((m["B"] * m["H"], m["N"] * CHUNK, CHUNK),
                                                                        _F32),
                 interpret, num_warps, fast_dtype, k, g, beta, starts)


@functools.partial(jax.jit, static_argnames=("fast_dtype", *_STATIC))
def chunk_states(k, v, g, beta, starts, h0, tinv, *, l2norm, fast_dtype, block_v=64, interpret=False,
                 num_warps=SERIAL_WARPS):
    """(the state entering every chunk [B*H, N*dkp, dvp] (chunk n in rows n*dkp..), in `fast_dtype` (what
    the fast dots round it to anyway); the final state [B, H, dk, dv] float32)."""
    m = _dims(k, v, block_v)
    kernel = _kernel(_states_kernel, m, fast_dtype, interpret, dv=m["dv"], bv=m["bv"], n_chunks=m["N"],
                     l2norm=l2norm)
    out_shape = [jax.ShapeDtypeStruct((m["B"] * m["H"], m["N"] * m["dkp"], m["dvp"]), fast_dtype),
                 jax.ShapeDtypeStruct(h0.shape, _F32)]
    return tuple(_call(kernel, (m["B"] * m["H"], m["nv"]), out_shape, interpret, num_warps, fast_dtype,
                       k, v, g, beta, starts, h0, tinv))


@functools.partial(jax.jit, static_argnames=("scale", *_STATIC))
def output(q, k, v, g, beta, starts, tinv, states, *, scale, l2norm, block_v=64, interpret=False,
           num_warps=NUM_WARPS):
    """o [B, T, H, dv] in v's dtype from `inverses` and `chunk_states`."""
    m = _dims(q, v, block_v)
    fast_dtype = dot_dtype(q, k, v)
    kernel = _kernel(_output_kernel, m, fast_dtype, interpret, dv=m["dv"], bv=m["bv"], scale=scale, l2norm=l2norm)
    return _call(kernel, (m["B"] * m["H"], m["N"], m["nv"]), jax.ShapeDtypeStruct(v.shape, v.dtype), interpret,
                 num_warps, fast_dtype, q, k, v, g, beta, starts, tinv, states)


@functools.partial(jax.jit, static_argnames=("scale", *_STATIC))
def state_grads(q, k, v, g, beta, starts, tinv, do, d_final, *, scale, l2norm, block_v=64, interpret=False,
                num_warps=SERIAL_WARPS):
    """(the gradient of the state leaving every chunk, laid out as `chunk_states`; dh0 [B, H, dk, dv]
    float32) from do [B, T, H, dv] and the final-state cotangent d_final [B, H, dk, dv]."""
    m = _dims(q, v, block_v)
    fast_dtype = dot_dtype(q, k, v)
    kernel = _kernel(_dstates_kernel, m, fast_dtype, interpret, dv=m["dv"], bv=m["bv"], n_chunks=m["N"],
                     scale=scale, l2norm=l2norm)
    out_shape = [jax.ShapeDtypeStruct((m["B"] * m["H"], m["N"] * m["dkp"], m["dvp"]), fast_dtype),
                 jax.ShapeDtypeStruct(d_final.shape, _F32)]
    return tuple(_call(kernel, (m["B"] * m["H"], m["nv"]), out_shape, interpret, num_warps, fast_dtype,
                       q, k, g, beta, starts, tinv, do, d_final))


@functools.partial(jax.jit, static_argnames=("scale", *_STATIC))
def input_grads(q, k, v, g, beta, starts, tinv, states, do, dstates, *, scale, l2norm, block_v=64,
                interpret=False, num_warps=NUM_WARPS):
    """(dq, dk, dv, dg, dbeta): dv in v's dtype, the others float32 partials with a leading dv-block axis
    (sum it), from `chunk_states` and `state_grads`."""
    m = _dims(q, v, block_v)
    fast_dtype = dot_dtype(q, k, v)
    kernel = _kernel(_grads_kernel, m, fast_dtype, interpret, dv=m["dv"], bv=m["bv"], scale=scale, l2norm=l2norm)
    part = lambda shape: jax.ShapeDtypeStruct((m["nv"], *shape), _F32)
    out_shape = [part(q.shape), part(k.shape), jax.ShapeDtypeStruct(v.shape, v.dtype), part(g.shape),
                 part(beta.shape)]
    return tuple(_call(kernel, (m["B"] * m["H"], m["N"], m["nv"]), out_shape, interpret, num_warps, fast_dtype,
                       q, k, v, g, beta, starts, tinv, states, do, dstates))
