"""Pallas GPU kernels (Triton lowering) of the chunked gated delta rule's backward, from the forward's T, W, KD,
e, chunk states and V_new (`triton_forward`, whose tile helpers these kernels share): `prepare_backward`
(EQ = scale diag(e) Q and DVL = scale (Q K^T * D)^T dO; parallel over chunks), `state_grads` (the serial
reverse pass carrying dS, three dots a step, storing dS and dV_new) and `input_grads` (two kernels parallel
over chunks, each looping over the chunk's dv blocks so that every gradient is written once).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gated_delta_rule.triton_forward import (
    CHUNK,
    F32,
    INPUT_GRADS_LAUNCH,
    LAUNCH,
    STATIC,
    Program,
    call,
    dims,
    gates,
    rev_cumsum,
    serial_dims,
    states_shape,
    tiles,
)


def _prepare_backward_kernel(q_ref, k_ref, g_ref, st_ref, do_ref, eq_ref, dvl_ref, *, heads, T, dk, dv, dkp, bv,
                             n_blocks, scale, l2norm, dots):
    """Parallel over chunks: what the serial reverse pass reads besides the forward's W, KD and e:
    EQ = scale diag(e) Q and DVL = scale (Q K^T * D)^T dO (dV_new's part that does not flow through the
    state)."""
    n = pl.program_id(1)
    p = Program(pl.program_id(0), heads, T, dk, dv, dkp, bv)
    q, _, _ = p.ld.key(q_ref, n, l2norm)
    k, _, _ = p.ld.key(k_ref, n, l2norm)
    d, e, _, _, _ = gates(p.ld.scalars(g_ref, n), p.ld.starts(st_ref, n))
    p.store_tile(eq_ref, n, (scale * e)[:, None] * q)
    qkd = (scale * dots.fast(q, k, tb=True) * d).astype(dots.fast_dtype)

    def block(i, carry):
        v0 = i * bv
        p.store_tile(dvl_ref, n, dots.fast(qkd, p.values(do_ref, n, v0), ta=True), v0)
        return carry

    jax.lax.fori_loop(0, n_blocks, block, 0)


def _dstates_kernel(w_ref, kd_ref, e_ref, eq_ref, dvl_ref, do_ref, dfin_ref, dstates_ref, dvnew_ref, dh0_ref, *,
                    heads, T, dk, dv, dkp, bv, n_chunks, dots):
    """Serial reverse pass: the gradient of the state leaving every chunk and dV_new = DVL + KD dS (both
    stored), and of h0: dS <- e_C dS + EQ^T dO - W^T dV_new."""
    p, v0 = Program(pl.program_id(0), heads, T, dk, dv, dkp, bv), pl.program_id(1) * bv

    def body(i, ds):
        n = n_chunks - 1 - i
        p.store_chunk_state(dstates_ref, n, v0, ds)
        dv_new = p.tile(dvl_ref, n, v0, bv) + dots.fast(p.tile(kd_ref, n), ds)
        p.store_tile(dvnew_ref, n, dv_new, v0)
        do = p.values(do_ref, n, v0)
        return (p.e_last(e_ref, n) * ds + dots.fast(p.tile(eq_ref, n), do, ta=True)
                - dots.fast(p.tile(w_ref, n), dv_new, ta=True))

    smask = p.smask(v0)
    ds = jax.lax.fori_loop(0, n_chunks, body, plt.load(p.state(dfin_ref, v0), mask=smask, other=0.0))
    plt.store(p.state(dh0_ref, v0), ds, mask=smask)


def _gate_grads(dd, de, d, e, strict, dd_last=None, d_last=None, de_last_e_last=0.0):
    """dg of one chunk from the gradients of its gates (linear in them, so kernels can add parts):
    D_ij = exp(sum of g over (j, i]) -> dg_m = sum_{i >= m > j} dD_ij D_ij; e_i over [0, i]; d_last_j over
    (j, C-1]; e_last over the whole chunk."""
    dseg = rev_cumsum(dd * d, axis=0)  # [m, j] = sum_{i >= m} dD_ij D_ij
    dg = jnp.sum(jnp.where(strict, dseg, 0.0), axis=1) + rev_cumsum(de * e) + de_last_e_last
    if dd_last is not None:
        x = dd_last * d_last
        dg = dg + jnp.cumsum(x) - x
    return dg


# The input gradients take two kernels, each one loop over the dv blocks with two accumulators of [C, dk]
# (one kernel with all of them spilled registers: 5.7-6.1 ms at the 2B shape on an H100). The first goes
# through the output and V_new, the second through dV_new, T and the gates; dk and dg pass between them
# as float32 partial sums (the backward is linear in the cotangents).


def _grads_output_kernel(q_ref, k_ref, g_ref, st_ref, vnew_ref, s_ref, do_ref, ds_ref, dq_ref, dk_ref, dg_ref, *,
                         heads, T, dk, dv, dkp, bv, n_blocks, scale, l2norm, dots):
    """dq (final), and the parts of dk and dg through O = scale (diag(e) Q S + (QK^T * D) V_new) and through
    V_new in the state update (S' = e_C S + KD^T V_new): sums over value columns of dO S^T, dO V_new^T and
    V_new dS^T."""
    n = pl.program_id(1)
    p = Program(pl.program_id(0), heads, T, dk, dv, dkp, bv)
    fast = dots.fast

    def block(i, acc):
        dos, dp, dkd, de_last = acc
        v0 = i * bv
        s, ds = p.chunk_state(s_ref, n, v0), p.chunk_state(ds_ref, n, v0)
        do = p.values(do_ref, n, v0)
        v_new = p.tile(vnew_ref, n, v0, bv)
        return (dos + fast(do, s, tb=True), dp + fast(do, v_new, tb=True), dkd + fast(v_new, ds, tb=True),
                de_last + jnp.sum(s.astype(F32) * ds.astype(F32)))

    ck = jnp.zeros((CHUNK, dkp), F32)
    dos, dp, dkd, de_last = jax.lax.fori_loop(
        0, n_blocks, block, (ck, jnp.zeros((CHUNK, CHUNK), F32), ck, jnp.float32(0.0)))
    q, rq, kmask = p.ld.key(q_ref, n, l2norm)
    k, _, _ = p.ld.key(k_ref, n, l2norm)
    d, e, d_last, e_last, strict = gates(p.ld.scalars(g_ref, n), p.ld.starts(st_ref, n))
    qk = fast(q, k, tb=True)
    dp = scale * dp  # gradient of P = QK^T * D
    dqk = dp * d
    dq = (scale * e)[:, None] * dos + fast(dqk, k)
    if l2norm:  # d/dx of x / |x|
        dq = rq[:, None] * (dq - q * jnp.sum(dq * q, axis=1)[:, None])
    rows, ok = p.ld.rows(n)
    plt.store(dq_ref.at[p.b, rows, p.h, pl.ds(0, dkp)], dq.astype(dq_ref.dtype), mask=kmask)
    p.store_tile(dk_ref, n, fast(dqk, q, ta=True) + d_last[:, None] * dkd)
    dg = _gate_grads(dp * qk, scale * jnp.sum(q * dos, axis=1), d, e, strict, jnp.sum(dkd * k, axis=1), d_last,
                     de_last * e_last)
    plt.store(dg_ref.at[p.bh, pl.ds(n * CHUNK, CHUNK)], dg)


def _grads_state_kernel(k_ref, v_ref, g_ref, b_ref, st_ref, t_ref, dvnew_ref, s_ref, dk0_ref, dg0_ref, dk_ref,
                        dv_ref, dg_ref, db_ref, *, heads, T, dk, dv, dkp, bv, n_blocks, l2norm, dots):
    """dk, dg (adding the first kernel's parts), dv and dbeta from dV_new through W = T diag(beta e) K,
    U = T diag(beta) V and T = (I + A)^-1: sums over value columns of dV_new S^T and dV_new (beta V)^T."""
    n = pl.program_id(1)
    p = Program(pl.program_id(0), heads, T, dk, dv, dkp, bv)
    fast = dots.fast
    k, rk_norm, kmask = p.ld.key(k_ref, n, l2norm)
    beta = p.ld.scalars(b_ref, n)
    d, e, _, _, strict = gates(p.ld.scalars(g_ref, n), p.ld.starts(st_ref, n))
    t = p.tile(t_ref, n)

    def block(i, acc):
        dws, dtv, dbeta_v = acc
        v0 = i * bv
        s, v, dv_new = p.chunk_state(s_ref, n, v0), p.values(v_ref, n, v0), p.tile(dvnew_ref, n, v0, bv)
        drv = fast(t, dv_new, ta=True)
        p.store_values(dv_ref, n, v0, beta[:, None] * drv)
        return (dws + fast(dv_new, s, tb=True), dtv + fast(dv_new, beta[:, None] * v, tb=True),
                dbeta_v + jnp.sum(drv * v, axis=1))

    dws, dtv, dbeta = jax.lax.fori_loop(
        0, n_blocks, block, (jnp.zeros((CHUNK, dkp), F32), jnp.zeros((CHUNK, CHUNK), F32),
                             jnp.zeros((CHUNK,), F32)))

    # Through W = T Rk (V_new = U - W S: dW = -dV_new S^T); U's part of dT is dtv.
    rk = (beta * e)[:, None] * k
    dt = dtv - fast(dws, rk, tb=True)
    drk = -fast(t, dws, ta=True)
    dk_ = p.tile(dk0_ref, n).astype(F32) + (beta * e)[:, None] * drk
    drk_k = jnp.sum(drk * k, axis=1)
    dbeta = dbeta + e * drk_k

    # Through T = (I + A)^-1: dA = -T^T dT T^T on the strictly lower part, A = beta_i (k_i.k_j) D_ij.
    kk = fast(k, k, tb=True)
    da = jnp.where(strict, -fast(t, fast(dt, t, tb=True), ta=True), 0.0)
    dbeta = dbeta + jnp.sum(da * kk * d, axis=1)
    dkk = da * beta[:, None] * d
    dk_ = dk_ + fast(dkk, k) + fast(dkk, k, ta=True)
    dg = plt.load(dg0_ref.at[p.bh, pl.ds(n * CHUNK, CHUNK)]) + _gate_grads(da * beta[:, None] * kk, beta * drk_k, d,
                                                                            e, strict)
    if l2norm:
        dk_ = rk_norm[:, None] * (dk_ - k * jnp.sum(dk_ * k, axis=1)[:, None])
    rows, ok = p.ld.rows(n)
    plt.store(dk_ref.at[p.b, rows, p.h, pl.ds(0, dkp)], dk_.astype(dk_ref.dtype), mask=kmask)
    plt.store(dg_ref.at[p.b, rows, p.h], dg.astype(dg_ref.dtype), mask=ok)
    plt.store(db_ref.at[p.b, rows, p.h], dbeta.astype(db_ref.dtype), mask=ok)


@functools.partial(jax.jit, static_argnames=("scale", "l2norm", "fast_dtype", *STATIC))
def prepare_backward(q, k, g, starts, do, *, scale, l2norm, fast_dtype, block_v=64, interpret=False,
                     num_warps=LAUNCH.num_warps, num_stages=None):
    """The backward's parallel first kernel: (EQ [B*H, N*C, dkp], DVL [B*H, N*C, dvp]) in `fast_dtype`."""
    B, T, H, dk = q.shape
    m = dims(B, T, H, dk, do.shape[-1], block_v)
    out_shape = [tiles(m, m["dkp"], fast_dtype), tiles(m, m["dvp"], fast_dtype)]
    kernel = functools.partial(_prepare_backward_kernel, n_blocks=m["nv"], scale=scale, l2norm=l2norm)
    return tuple(call(kernel, m, "chunks", out_shape, fast_dtype, (q, k, g, starts, do), interpret=interpret,
                       num_warps=num_warps, num_stages=num_stages))


@functools.partial(jax.jit, static_argnames=STATIC)
def state_grads(w, kd, e, eq, dvl, do, d_final, *, block_v=64, interpret=False, num_warps=LAUNCH.num_warps,
                num_stages=None):
    """(the gradient of the state leaving every chunk, laid out as `chunk_states`; dV_new [B*H, N*C, dvp] in
    W's dtype; dh0 [B, H, dk, dv] float32) from `prepare_backward`, do [B, T, H, dv] and the final-state
    cotangent d_final."""
    m = serial_dims(w, d_final, block_v)
    m["T"] = do.shape[1]
    kernel = functools.partial(_dstates_kernel, n_chunks=m["N"])
    out_shape = [states_shape(m, w.dtype), tiles(m, m["dvp"], w.dtype),
                 jax.ShapeDtypeStruct(d_final.shape, F32)]
    return tuple(call(kernel, m, "serial", out_shape, w.dtype, (w, kd, e, eq, dvl, do, d_final), interpret=interpret,
                       num_warps=num_warps, num_stages=num_stages))


@functools.partial(jax.jit, static_argnames=("scale", "l2norm", *STATIC))
def input_grads(q, k, v, g, beta, starts, tinv, v_new, dv_new, states, do, dstates, *, scale, l2norm, block_v=64,
                interpret=False, num_warps=INPUT_GRADS_LAUNCH.num_warps, num_stages=None):
    """(dq, dk, dv, dg, dbeta), each in its input's dtype, from `prepare`, `chunk_states`, `prepare_backward`
    and `state_grads`: two kernels, the second adding to the first's float32 dk and dg."""
    B, T, H, dk = q.shape
    m = dims(B, T, H, dk, v.shape[-1], block_v)
    fd, launch = v_new.dtype, dict(interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    kernel = functools.partial(_grads_output_kernel, n_blocks=m["nv"], scale=scale, l2norm=l2norm)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), tiles(m, m["dkp"], F32),
                 jax.ShapeDtypeStruct((m["BH"], m["N"] * CHUNK), F32)]
    dq, dk0, dg0 = call(kernel, m, "chunks", out_shape, fd, (q, k, g, starts, v_new, states, do, dstates), **launch)
    kernel = functools.partial(_grads_state_kernel, n_blocks=m["nv"], l2norm=l2norm)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k, v, g, beta)]
    dk, dv, dg, dbeta = call(kernel, m, "chunks", out_shape, fd,
                              (k, v, g, beta, starts, tinv, dv_new, states, dk0, dg0), **launch)
    return dq, dk, dv, dg, dbeta
