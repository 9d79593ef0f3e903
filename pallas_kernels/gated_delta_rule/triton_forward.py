"""Pallas GPU kernels (Triton lowering) for the chunked gated delta rule, chunk C = 64, fp32 state: the tile
helpers every kernel shares and the forward kernels (the backward ones: `triton_backward`; the entry point,
layout and custom VJP: `triton`).

The kernels read the caller's layout directly and pad inside with masked loads, so no padded or
transposed copy of the inputs reaches HBM: q, k [B, T, H, dk] raw (L2-normalised here when `l2norm`);
v [B, T, H, dv]; g, beta [B, T, H]; starts [B, T] float32, 1.0 where a new document starts (never at
t = 0: the initial state continues the first document); h0 [B, H, dk, dv] float32. Masked-out tokens
load as q = k = v = g = beta = 0, which leaves the state untouched; masked-out key/value columns are zero,
which changes no dot product. Triton wants power-of-two tiles with dot dims >= 16, hence the padding.

Per chunk (see shared/spec/gated_delta_rule.md; `jetnemo_jax.ops.delta_rule.chunked` is the XLA twin):
  D_ij = exp(sum of g over (j, i]) for j <= i in one document, else 0 (masked before exp);
  e_i = exp(G_i) while token i is still in the entering state's document, else 0;
  T = (I + strict_lower(beta_i k_i.k_j D_ij))^-1;  W = T diag(beta e) K;  U = T diag(beta) V;
  V_new = U - W S;  O = scale (diag(e) Q S + (Q K^T * D) V_new);  S' = e_C S + (diag(D_C:) K)^T V_new.

Kernels (fla's pipeline shape): `prepare` (parallel over chunks: T, and W, U, KD = diag(D_C:) K and e
stored chunk-major so that a serial step is two dots); `chunk_states` (the state entering every chunk, V_new
and the final state: the serial pass, one program per (batch*head, dv block) looping over chunks with the
fp32 state in registers); `output` (parallel over chunks). Backward, from the forward's T, W, KD, e, states
and V_new: `prepare_backward` (EQ = scale diag(e) Q and DVL = scale (Q K^T * D)^T dO), `state_grads` (the
serial reverse pass carrying dS, three dots a step, storing dS and dV_new) and `input_grads` (two kernels
parallel over chunks). The delta rule is separable over value columns: the serial passes take one dv block
per program (parallelism when B*H is small); the parallel kernels take a whole chunk per program and loop
over its dv blocks, so the key- and chunk-space work is done once per chunk and every gradient is written
once.

Precision: `fast` dots take bf16 operands with fp32 accumulation when the inputs are bf16 (fla's choice:
q, k, v, T, W, U, V_new, the states and their gradients rounded to bf16, and stored so), else `precise`
ones; `precise` dots (the inverse, and everything for fp32 inputs) are IEEE fp32 in interpret mode and
3xTF32 on the GPU (fp32 accuracy on the tensor cores).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

CHUNK = 64
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Launch:
    """Warps per program and software-pipelining stages of a kernel launch, and the measurement that chose them."""
    num_warps: int
    num_stages: int  # with bf16 inputs; fp32 tiles are twice the size: one stage keeps them in shared memory
    measured: str


LAUNCH = Launch(num_warps=4, num_stages=2, measured="H100, 2B shape, e.g. the two serial passes at dv blocks of "
                "64: 0.69 and 1.14 ms at 4 warps against 0.96 and 1.22 at 8")
INPUT_GRADS_LAUNCH = Launch(num_warps=8, num_stages=2, measured="H100, 2B shape, the input gradients at dv blocks "
                            "of 128: 2.8 ms at 8 warps against 5.3 at 4 and 5.8 at 16")


def padded(d: int) -> int:
    """Tile width of a head dim: a power of two, at least 16 (Triton's smallest dot dim)."""
    return max(16, pl.next_power_of_2(d))


class Dots:
    """Matmuls a @ b with optional transposes, at the kernel's two precisions."""

    def __init__(self, fast_dtype, interpret):
        self.fast_dtype = jnp.dtype(fast_dtype)
        # fp32 accuracy (3xTF32) for fp32 inputs; with bf16 inputs the one precise result (the inverse T) is
        # rounded to bf16 for every dot that reads it, so one TF32 pass (10-bit mantissa) is enough there.
        tf32x3 = self.fast_dtype == F32
        gpu = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if tf32x3 else jax.lax.DotAlgorithmPreset.TF32_TF32_F32
        self.precision = jax.lax.Precision.HIGHEST if interpret else gpu

    def precise(self, a, b, ta=False, tb=False):
        dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
        return jax.lax.dot_general(a.astype(F32), b.astype(F32), dims, precision=self.precision,
                                   preferred_element_type=F32)

    def fast(self, a, b, ta=False, tb=False):
        if self.fast_dtype == F32:
            return self.precise(a, b, ta, tb)
        dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
        return jax.lax.dot_general(a.astype(self.fast_dtype), b.astype(self.fast_dtype), dims,
                                   precision=jax.lax.Precision.DEFAULT, preferred_element_type=F32)


def _iota():
    idx = jnp.arange(CHUNK, dtype=jnp.int32)
    return idx, idx[:, None], idx[None, :]


def _l2norm(x):
    r = jax.lax.rsqrt(jnp.sum(x * x, axis=1) + 1e-6)
    return x * r[:, None], r


class Chunk:
    """Loads of chunk n of row (b, h), masked to the true T, dk and dv."""

    def __init__(self, b, h, T, dk, dv, dkp):
        self.b, self.h, self.T, self.dk, self.dv, self.dkp = b, h, T, dk, dv, dkp

    def rows(self, n):
        t = n * CHUNK + jnp.arange(CHUNK, dtype=jnp.int32)
        return pl.ds(n * CHUNK, CHUNK), t < self.T

    def mask(self, n, width, start, true_width):
        rows, ok = self.rows(n)
        cols = start + jnp.arange(width, dtype=jnp.int32)
        return rows, ok[:, None] & (cols < true_width)[None, :]

    def tokens(self, ref, n, width, start, true_width):
        """[C, width] slice of a [B, T, H, d] ref: columns start..start+width, zero outside."""
        rows, mask = self.mask(n, width, start, true_width)
        ref = ref.at[self.b, rows, self.h, pl.ds(start, width)]
        return plt.load(ref, mask=mask, other=0.0).astype(F32), mask

    def scalars(self, ref, n):  # [C] from a [B, T, H] ref
        rows, ok = self.rows(n)
        return plt.load(ref.at[self.b, rows, self.h], mask=ok, other=0.0).astype(F32)

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


def gates(g, st):
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
    x = (row == col).astype(F32)
    diff = jnp.bitwise_xor(row, col)  # i, j share a 2s-block but not an s-block iff s <= i ^ j < 2s
    s = 1
    while s < CHUNK:
        a_s = jnp.where((diff >= s) & (diff < 2 * s) & (row > col), a, 0.0)
        x = x - dots.precise(x, dots.precise(a_s, x))
        s *= 2
    return x


def rev_cumsum(x, axis=0):  # inclusive sums from the end (Triton lowers forward cumsums only)
    return jnp.sum(x, axis=axis, keepdims=True) - jnp.cumsum(x, axis=axis) + x


class Program:
    """Row (b, h) of this program, its chunk-major tiles (T, W, U, ...: [BH, N*C, width] refs, chunk n in
    rows n*C..) and the masked state and value tiles of a dv block at column v0."""

    def __init__(self, bh, heads, T, dk, dv, dkp, bv):
        self.bh, self.b, self.h = bh, bh // heads, bh % heads
        self.ld = Chunk(self.b, self.h, T, dk, dv, dkp)
        self.dk, self.dkp, self.bv, self.dv = dk, dkp, bv, dv

    def smask(self, v0):
        krows, vcols = jnp.arange(self.dkp, dtype=jnp.int32), v0 + jnp.arange(self.bv, dtype=jnp.int32)
        return (krows < self.dk)[:, None] & (vcols < self.dv)[None, :]

    def state(self, ref, v0):  # [dkp, bv] of a [B, H, dk, dv] ref
        return ref.at[self.b, self.h, pl.ds(0, self.dkp), pl.ds(v0, self.bv)]

    # Chunk-major loads keep the stored dtype (bf16 for bf16 inputs): they feed dots, and a bf16 tile takes
    # half the registers of its fp32 copy; the few elementwise uses cast.
    # Chunk n's state starts at row n*dk of a [BH, N*dk + dkp - dk, dvp] ref: rows past dk are not stored
    # (a quarter of the states' traffic at dk = 96), so loads and stores of [dkp, bv] mask them.
    def _chunk_state_at(self, ref, n, v0):
        rows = jnp.arange(self.dkp, dtype=jnp.int32)[:, None] < self.dk
        mask = None if self.dk == self.dkp else jnp.broadcast_to(rows, (self.dkp, self.bv))
        return ref.at[self.bh, pl.ds(n * self.dk, self.dkp), pl.ds(v0, self.bv)], mask

    def chunk_state(self, ref, n, v0):  # [dkp, bv] of chunk n
        ref, mask = self._chunk_state_at(ref, n, v0)
        return plt.load(ref, mask=mask, other=None if mask is None else 0.0)

    def store_chunk_state(self, ref, n, v0, x):
        ref, mask = self._chunk_state_at(ref, n, v0)
        plt.store(ref, x.astype(ref.dtype), mask=mask)

    def values(self, ref, n, v0):  # [C, bv] of a [B, T, H, dv] ref, zero outside T and dv
        return self.ld.tokens(ref, n, self.bv, v0, self.dv)[0]

    def store_values(self, ref, n, v0, x):
        rows, mask = self.ld.mask(n, self.bv, v0, self.dv)
        plt.store(ref.at[self.b, rows, self.h, pl.ds(v0, self.bv)], x.astype(ref.dtype), mask=mask)

    def tile(self, ref, n, c0=0, width=None):  # [C, width] of a chunk-major ref
        width = ref.shape[-1] if width is None else width
        return plt.load(ref.at[self.bh, pl.ds(n * CHUNK, CHUNK), pl.ds(c0, width)])

    def store_tile(self, ref, n, x, c0=0):
        plt.store(ref.at[self.bh, pl.ds(n * CHUNK, CHUNK), pl.ds(c0, x.shape[-1])], x.astype(ref.dtype))

    def e_last(self, e_ref, n):  # e's last entry in chunk n of a [BH, N*C] ref
        e = plt.load(e_ref.at[self.bh, pl.ds(n * CHUNK, CHUNK)])
        return jnp.sum(jnp.where(jnp.arange(CHUNK, dtype=jnp.int32) == CHUNK - 1, e, 0.0))


def dims(B, T, H, dk, dv, block_v):
    dkp, dvp = padded(dk), padded(dv)
    bv = min(dvp, block_v)
    if bv & (bv - 1) or bv < 16:
        raise ValueError(f"block_v={block_v} must be a power of two >= 16")
    return dict(B=B, T=T, H=H, BH=B * H, dk=dk, dv=dv, dkp=dkp, dvp=dvp, bv=bv, nv=dvp // bv,
                N=pl.cdiv(T, CHUNK))


def dot_dtype(*xs):
    """bf16 operands for the fast dots when every input (array or dtype) is bf16, else float32."""
    return jnp.bfloat16 if all(jnp.dtype(getattr(x, "dtype", x)) == jnp.bfloat16 for x in xs) else F32


def call(kernel, m, grid, out_shape, fast_dtype, args, *, interpret, num_warps, num_stages):
    if num_stages is None:
        num_stages = LAUNCH.num_stages if fast_dtype == jnp.bfloat16 else 1
    kernel = functools.partial(kernel, heads=m["H"], T=m["T"], dk=m["dk"], dv=m["dv"], dkp=m["dkp"], bv=m["bv"],
                               dots=Dots(fast_dtype, interpret))
    grid = {"serial": (m["BH"], m["nv"]), "chunks": (m["BH"], m["N"])}[grid]
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=interpret,
                          compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages))(*args)


def tiles(m, width, dtype):  # a chunk-major [B*H, N*C, width] buffer
    return jax.ShapeDtypeStruct((m["BH"], m["N"] * CHUNK, width), dtype)


def states_shape(m, dtype):  # a state per chunk, [B*H, N*dk + dkp - dk, dvp] (chunk n in rows n*dk..)
    return jax.ShapeDtypeStruct((m["BH"], m["N"] * m["dk"] + m["dkp"] - m["dk"], m["dvp"]), dtype)


def serial_dims(w, h0, block_v):  # the dims of a serial pass, from a chunk-major input and a state
    B, H, dk, dv = h0.shape
    return dims(B, w.shape[1], H, dk, dv, block_v)


# Launch options of every kernel: `num_stages` None takes LAUNCH's (1 for fp32 inputs).
STATIC = ("block_v", "interpret", "num_warps", "num_stages")


def _prepare_kernel(k_ref, v_ref, g_ref, b_ref, st_ref, t_ref, w_ref, u_ref, kd_ref, e_ref, *, heads, T, dk, dv,
                    dkp, bv, n_blocks, l2norm, dots):
    """Parallel over chunks: T = (I + A)^-1 and what the serial pass reads, so that its step is two dots:
    W = T diag(beta e) K, U = T diag(beta) V, KD = diag(D_C:) K and e."""
    n = pl.program_id(1)
    p = Program(pl.program_id(0), heads, T, dk, dv, dkp, bv)
    k, _, _ = p.ld.key(k_ref, n, l2norm)
    beta = p.ld.scalars(b_ref, n)
    d, e, d_last, _, strict = gates(p.ld.scalars(g_ref, n), p.ld.starts(st_ref, n))
    t = _unit_lower_inverse(jnp.where(strict, beta[:, None] * dots.fast(k, k, tb=True) * d, 0.0), dots)
    p.store_tile(t_ref, n, t)
    p.store_tile(w_ref, n, dots.fast(t, (beta * e)[:, None] * k))
    p.store_tile(kd_ref, n, d_last[:, None] * k)
    plt.store(e_ref.at[p.bh, pl.ds(n * CHUNK, CHUNK)], e)

    def block(i, carry):
        v0 = i * bv
        p.store_tile(u_ref, n, dots.fast(t, beta[:, None] * p.values(v_ref, n, v0)), v0)
        return carry

    jax.lax.fori_loop(0, n_blocks, block, 0)


def _states_kernel(w_ref, u_ref, kd_ref, e_ref, h0_ref, states_ref, vnew_ref, final_ref, *, heads, T, dk, dv,
                   dkp, bv, n_chunks, dots):
    """Serial pass: the state entering every chunk and V_new = U - W S (both stored), and the final state;
    S' = e_C S + KD^T V_new."""
    p, v0 = Program(pl.program_id(0), heads, T, dk, dv, dkp, bv), pl.program_id(1) * bv

    def body(n, s):
        p.store_chunk_state(states_ref, n, v0, s)
        v_new = p.tile(u_ref, n, v0, bv) - dots.fast(p.tile(w_ref, n), s)
        p.store_tile(vnew_ref, n, v_new, v0)
        return p.e_last(e_ref, n) * s + dots.fast(p.tile(kd_ref, n), v_new, ta=True)

    smask = p.smask(v0)
    s = jax.lax.fori_loop(0, n_chunks, body, plt.load(p.state(h0_ref, v0), mask=smask, other=0.0))
    plt.store(p.state(final_ref, v0), s, mask=smask)


def _output_kernel(q_ref, k_ref, g_ref, st_ref, vnew_ref, states_ref, o_ref, *, heads, T, dk, dv, dkp, bv,
                   n_blocks, scale, l2norm, dots):
    """Parallel over chunks: O = scale (diag(e) Q S + (Q K^T * D) V_new) from the chunk's entering state and
    V_new, one program per chunk looping over the dv blocks."""
    n = pl.program_id(1)
    p = Program(pl.program_id(0), heads, T, dk, dv, dkp, bv)
    q, _, _ = p.ld.key(q_ref, n, l2norm)
    k, _, _ = p.ld.key(k_ref, n, l2norm)
    d, e, _, _, _ = gates(p.ld.scalars(g_ref, n), p.ld.starts(st_ref, n))
    qkd = (scale * dots.fast(q, k, tb=True) * d).astype(dots.fast_dtype)
    eq = ((scale * e)[:, None] * q).astype(dots.fast_dtype)

    def block(i, carry):
        v0 = i * bv
        o = dots.fast(eq, p.chunk_state(states_ref, n, v0)) + dots.fast(qkd, p.tile(vnew_ref, n, v0, bv))
        p.store_values(o_ref, n, v0, o)
        return carry

    jax.lax.fori_loop(0, n_blocks, block, 0)


@functools.partial(jax.jit, static_argnames=("l2norm", "fast_dtype", *STATIC))
def prepare(k, v, g, beta, starts, *, l2norm, fast_dtype, block_v=64, interpret=False, num_warps=LAUNCH.num_warps,
            num_stages=None):
    """The forward's parallel first kernel: (T [B*H, N*C, C], W [.., dkp], U [.., dvp], KD [.., dkp]) in
    `fast_dtype` (what the fast dots round them to), e [B*H, N*C] float32."""
    B, T, H, dk = k.shape
    m = dims(B, T, H, dk, v.shape[-1], block_v)
    out_shape = [tiles(m, CHUNK, fast_dtype), tiles(m, m["dkp"], fast_dtype), tiles(m, m["dvp"], fast_dtype),
                 tiles(m, m["dkp"], fast_dtype), jax.ShapeDtypeStruct((m["BH"], m["N"] * CHUNK), F32)]
    kernel = functools.partial(_prepare_kernel, n_blocks=m["nv"], l2norm=l2norm)
    return tuple(call(kernel, m, "chunks", out_shape, fast_dtype, (k, v, g, beta, starts), interpret=interpret,
                       num_warps=num_warps, num_stages=num_stages))


@functools.partial(jax.jit, static_argnames=STATIC)
def chunk_states(w, u, kd, e, h0, *, block_v=64, interpret=False, num_warps=LAUNCH.num_warps, num_stages=None):
    """(the state entering every chunk [B*H, N*dk + dkp - dk, dvp] and V_new [B*H, N*C, dvp], both in W's
    dtype (what the fast dots round them to anyway); the final state [B, H, dk, dv] float32) from `prepare`
    and h0."""
    m = serial_dims(w, h0, block_v)
    kernel = functools.partial(_states_kernel, n_chunks=m["N"])
    out_shape = [states_shape(m, w.dtype), tiles(m, m["dvp"], w.dtype), jax.ShapeDtypeStruct(h0.shape, F32)]
    return tuple(call(kernel, m, "serial", out_shape, w.dtype, (w, u, kd, e, h0), interpret=interpret,
                       num_warps=num_warps, num_stages=num_stages))


@functools.partial(jax.jit, static_argnames=("scale", "l2norm", *STATIC))
def output(q, k, v, g, starts, v_new, states, *, scale, l2norm, block_v=64, interpret=False,
           num_warps=LAUNCH.num_warps, num_stages=None):
    """o [B, T, H, dv] in v's dtype (v itself is not read) from `chunk_states`."""
    B, T, H, dk = q.shape
    m = dims(B, T, H, dk, v.shape[-1], block_v)
    kernel = functools.partial(_output_kernel, n_blocks=m["nv"], scale=scale, l2norm=l2norm)
    return call(kernel, m, "chunks", jax.ShapeDtypeStruct(v.shape, v.dtype), v_new.dtype,
                 (q, k, g, starts, v_new, states), interpret=interpret, num_warps=num_warps, num_stages=num_stages)
