"""Triton (Pallas GPU) kernels of the generated causal convolution; layout in `common`.

No kernel tensor ([rows, W, Dv]) and no tap gradient ever reaches HBM, forward or backward:
- `forward`: per (token tile, channel tile) program, generates the W taps h @ w2t[w] + b2t[w] in registers,
  convolves and applies SiLU; for training it also stores the pre-activation c (the backward's silu').
- `backward`: dc = dy silu'(c) (one XLA fusion), then three kernels:
  `grad_u`: du_t = sum_j dc_{t+j} k_{t+j}[W-1-j], each tap regenerated in registers by a matmul on the
  j-shifted rows of h (the forward's matmul work once more);
  `grad_h`: dh = sum_w (dc * U_w) w2t[w]^T and `grad_w2`: dw2t[w] = h^T (dc * U_w) and db2t[w] = 1^T (dc * U_w),
  where U_w is u shifted back by W-1-w rows and masked at document starts: the tap gradient dc * U_w is
  formed tile by tile in registers as the matmul operand.
Programs are independent (Triton has no sequential grid axis): shifted rows come from overlapping loads of
the same HBM rows, which L1/L2 serve. Block sizes are powers of two with dot dims >= 16 (the caller pads).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dynamic_conv import common

PAD = 128  # zero rows before and after the token rows (>= any token block and >= W - 1)
ROWS, DIM = 128, 128  # the caller pads the token rows and channels to multiples of these

# Block sizes and launch parameters of each kernel: the fastest of `python bench/dynamic_conv.py --profile`'s
# sweep on an H100 at the 2B shape (BENCHMARKS.md). gtiles: G blocks per program, sharing each tap-gradient
# tile (fewer elementwise passes, more registers); splits: programs per grad_w2 output block over the rows.
FWD = {"bt": 128, "bd": 128, "bg": 64, "num_warps": 8, "num_stages": 2}
GRAD_U = {"bt": 128, "bd": 64, "bg": 128, "num_warps": 8, "num_stages": 2}
GRAD_H = {"bt": 64, "bg": 128, "bk": 64, "gtiles": 3, "num_warps": 4, "num_stages": 3}
GRAD_W2 = {"bn": 64, "bg": 128, "bd": 64, "gtiles": 3, "splits": 8, "num_warps": 8, "num_stages": 3}

_ANY = pl.BlockSpec(memory_space=pl.ANY)
_F32 = common.F32


def padded_generator_dim(g):
    """Triton blocks are powers of two with dot dims >= 16: G pads to one such block or 128-multiples."""
    return max(16, pl.next_power_of_2(g)) if g <= 128 else -(-g // 128) * 128


def _params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _block(b, n):
    """The largest power of two <= b dividing n (n is a multiple of 16 or a power of two)."""
    return math.gcd(b, n)


def _divisor(q, n):
    """The largest divisor of n that is <= q (G blocks per program)."""
    return max(d for d in range(1, min(q, n) + 1) if n % d == 0)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _tap(h_ref, w2_ref, b2_ref, rows, cols, w, bg, precision):
    """Kernel tap w at `rows` and channel block `cols`: h[rows] @ w2t[w, :, cols] + b2t[w, cols], float32."""
    acc = None
    for g in range(h_ref.shape[1] // bg):
        part = jnp.dot(h_ref[rows, pl.ds(g * bg, bg)], w2_ref[w, pl.ds(g * bg, bg), cols],
                       preferred_element_type=_F32, precision=precision)
        acc = part if acc is None else acc + part
    return acc + b2_ref[pl.ds(w, 1), cols].astype(_F32)


def _fwd_kernel(h_ref, w2_ref, b2_ref, u_ref, pos_ref, y_ref, *c_ref, bt, bd, bg, width, precision):
    i, j = pl.program_id(0), pl.program_id(1)
    base, cols = PAD + i * bt, pl.ds(j * bd, bd)
    tap = lambda w: _tap(h_ref, w2_ref, b2_ref, pl.ds(i * bt, bt), cols, w, bg, precision)
    u_at = lambda s: u_ref[pl.ds(base + s, bt), cols].astype(_F32)
    c = common.conv(tap, u_at, pos_ref[pl.ds(base, bt)][:, None], width)
    y_ref[...] = jax.nn.silu(c).astype(y_ref.dtype)
    if c_ref:
        c_ref[0][...] = c.astype(c_ref[0].dtype)


def forward(h, w2t, b2t, u, pos, *, save_c=False, interpret=False, **blocks):
    """h [N, G]; w2t [W, G, D]; b2t [W, D] float32; u [PAD + N + PAD, D]; pos [PAD + N + PAD] int32.
    N a multiple of ROWS, D of DIM. Returns silu(conv) [N, D] in u's dtype, and with save_c also c [N, D]."""
    cfg = {**FWD, **blocks}
    N, G = h.shape
    width, _, D = w2t.shape
    bt, bd, bg = cfg["bt"], _block(cfg["bd"], D), _block(cfg["bg"], G)
    kernel = functools.partial(_fwd_kernel, bt=bt, bd=bd, bg=bg, width=width, precision=_precision(h.dtype))
    out_specs = [pl.BlockSpec((bt, bd), lambda i, j: (i, j))] * (1 + save_c)
    out_shape = [jax.ShapeDtypeStruct((N, D), u.dtype)] * (1 + save_c)
    out = pl.pallas_call(
        kernel, grid=(N // bt, D // bd), in_specs=[_ANY] * 5, out_specs=out_specs, out_shape=out_shape,
        compiler_params=_params(cfg["num_warps"], cfg["num_stages"]), interpret=interpret,
        name="dynamic_conv_fwd",
    )(h, w2t, b2t, u, pos)
    return tuple(out) if save_c else out[0]


def forward_with_residual(h, w2t, b2t, u, pos, *, interpret=False):
    """`forward` and what `backward` needs besides the inputs: the pre-activation c."""
    return forward(h, w2t, b2t, u, pos, save_c=True, interpret=interpret)


def _grad_u_kernel(h_ref, w2_ref, b2_ref, dc_ref, pos_ref, du_ref, *, bt, bd, bg, width, precision):
    i, j = pl.program_id(0), pl.program_id(1)
    base, cols = PAD + i * bt, pl.ds(j * bd, bd)
    du = None
    for r in range(width):  # row t + r's output read u_t through its tap W-1-r
        rows = pl.ds(base + r, bt)
        k = _tap(h_ref, w2_ref, b2_ref, rows, cols, width - 1 - r, bg, precision)
        term = jnp.where(pos_ref[rows][:, None] >= r, dc_ref[rows, cols].astype(_F32) * k, 0.0)
        du = term if du is None else du + term
    du_ref[...] = du.astype(du_ref.dtype)


def _grad_h_kernel(dc_ref, u_ref, w2_ref, pos_ref, dh_ref, *, bt, bg, bk, gtiles, width, precision):
    i, g = pl.program_id(0), pl.program_id(1)
    base = PAD + i * bt
    pos = pos_ref[pl.ds(base, bt)][:, None]
    gcols = [pl.ds((g * gtiles + q) * bg, bg) for q in range(gtiles)]  # one tap-gradient tile feeds them all
    steps = dc_ref.shape[1] // bk

    def body(it, accs):  # one (tap, channel block) per step: a few loads per software-pipelining stage
        w, k = jax.lax.div(it, steps), jax.lax.rem(it, steps)
        back = width - 1 - w
        cols = pl.ds(pl.multiple_of(k * bk, bk), bk)
        live = (pos >= back).astype(_F32)
        dk = dc_ref[pl.ds(base, bt), cols].astype(_F32) * u_ref[pl.ds(base - back, bt), cols].astype(_F32)
        dk = (dk * live).astype(w2_ref.dtype)
        return tuple(acc + jax.lax.dot_general(dk, w2_ref[w, gcols[q], cols], (((1,), (1,)), ((), ())),
                                               preferred_element_type=_F32, precision=precision)
                     for q, acc in enumerate(accs))

    accs = jax.lax.fori_loop(0, width * steps, body, (jnp.zeros((bt, bg), _F32),) * gtiles)
    for q in range(gtiles):
        dh_ref[pl.ds(i * bt, bt), gcols[q]] = accs[q].astype(dh_ref.dtype)


def _grad_w2_kernel(h_ref, dc_ref, u_ref, pos_ref, dw_ref, db_ref, *, bn, bg, bd, gtiles, steps, width,
                    precision):
    s, w, d, g = (pl.program_id(a) for a in range(4))
    back = width - 1 - w
    cols = pl.ds(d * bd, bd)
    gcols = [pl.ds((g * gtiles + q) * bg, bg) for q in range(gtiles)]
    ones = jnp.ones((16, bn), h_ref.dtype)  # db2 as a matmul: column sums on the tensor cores

    def body(k, accs):
        r0 = pl.multiple_of((s * steps + k) * bn, bn)
        live = (pos_ref[pl.ds(PAD + r0, bn)][:, None] >= back).astype(_F32)
        dk = dc_ref[pl.ds(PAD + r0, bn), cols].astype(_F32) * u_ref[pl.ds(PAD + r0 - back, bn), cols].astype(_F32)
        dk = (dk * live).astype(h_ref.dtype)
        dot = lambda a, b, dims: jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=_F32,
                                                     precision=precision)
        return (accs[0] + dot(ones, dk, ((1,), (0,))),) + tuple(
            acc + dot(h_ref[pl.ds(r0, bn), gcols[q]], dk, ((0,), (0,))) for q, acc in enumerate(accs[1:]))

    accs = jax.lax.fori_loop(0, steps, body, (jnp.zeros((16, bd), _F32),) + (jnp.zeros((bg, bd), _F32),) * gtiles)
    db_ref[s, w, pl.ds(g * 16, 16), cols] = accs[0]
    for q in range(gtiles):
        dw_ref[s, w, gcols[q], cols] = accs[1 + q]


def grad_u(h, w2t, b2t, dc, pos, *, interpret=False, **blocks):
    """du [N, D] in dc's dtype. h [N, G]; dc [PAD + N + PAD, D] (zero PAD rows); the rest as in `forward`."""
    cfg = {**GRAD_U, **blocks}
    N, G = h.shape
    width, _, D = w2t.shape
    bt, bd, bg = cfg["bt"], _block(cfg["bd"], D), _block(cfg["bg"], G)
    return pl.pallas_call(
        functools.partial(_grad_u_kernel, bt=bt, bd=bd, bg=bg, width=width, precision=_precision(h.dtype)),
        grid=(N // bt, D // bd), in_specs=[_ANY] * 5, out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((N, D), dc.dtype),
        compiler_params=_params(cfg["num_warps"], cfg["num_stages"]), interpret=interpret,
        name="dynamic_conv_grad_u",
    )(jnp.pad(h, [(PAD, PAD), (0, 0)]), w2t, b2t, dc, pos)


def grad_h(dc, u, w2t, pos, *, interpret=False, **blocks):
    """dh [N, G] = sum_w (dc * U_w) w2t[w]^T in w2t's dtype; dc [PAD + N + PAD, D], u and pos padded alike."""
    cfg = {**GRAD_H, **blocks}
    N, D = dc.shape[0] - 2 * PAD, dc.shape[1]
    width, G, _ = w2t.shape
    bt, bg, bk = cfg["bt"], _block(cfg["bg"], G), _block(cfg["bk"], D)
    gtiles = _divisor(cfg["gtiles"], G // bg)
    return pl.pallas_call(
        functools.partial(_grad_h_kernel, bt=bt, bg=bg, bk=bk, gtiles=gtiles, width=width,
                          precision=_precision(w2t.dtype)),
        grid=(N // bt, G // bg // gtiles), in_specs=[_ANY] * 4, out_specs=_ANY,
        out_shape=jax.ShapeDtypeStruct((N, G), w2t.dtype),
        compiler_params=_params(cfg["num_warps"], cfg["num_stages"]), interpret=interpret,
        name="dynamic_conv_grad_h",
    )(dc, u, w2t, pos)


def grad_w2(h, dc, u, pos, width, *, interpret=False, **blocks):
    """dw2t [W, G, D] and db2t [W, D], float32: dw2t[w] = h^T (dc * U_w), db2t[w] its column sums. The token
    rows are split over `splits` programs per output block (partial sums added here) to fill the GPU."""
    cfg = {**GRAD_W2, **blocks}
    N, G = h.shape
    D = dc.shape[1]
    bn, bg, bd = cfg["bn"], _block(cfg["bg"], G), _block(cfg["bd"], D)
    gtiles, chunks = _divisor(cfg["gtiles"], G // bg), N // bn
    splits = _divisor(cfg["splits"], chunks)
    gprogs = G // bg // gtiles
    dw2, db2 = pl.pallas_call(
        functools.partial(_grad_w2_kernel, bn=bn, bg=bg, bd=bd, gtiles=gtiles, steps=chunks // splits,
                          width=width, precision=_precision(h.dtype)),
        grid=(splits, width, D // bd, gprogs), in_specs=[_ANY] * 4, out_specs=(_ANY, _ANY),
        out_shape=(jax.ShapeDtypeStruct((splits, width, G, D), _F32),
                   jax.ShapeDtypeStruct((splits, width, gprogs * 16, D), _F32)),
        compiler_params=_params(cfg["num_warps"], cfg["num_stages"]), interpret=interpret,
        name="dynamic_conv_grad_w2",
    )(h, dc, u, pos)
    return jnp.sum(dw2, axis=0), jnp.sum(db2[:, :, 0], axis=0)  # every row of every G program holds db2


def backward(h, w2t, b2t, u, pos, c, dy, *, interpret=False):
    """Gradients of `forward` from its saved c: h [N, G], w2t, b2t, u, pos as in `forward`; c, dy [N, D].
    Returns (dh [N, G], dw2t [W, G, D] float32, db2t [W, D] float32, du [N, D]); dh and du in h's and u's
    dtypes."""
    dc = common.silu_grad(c.astype(_F32), dy.astype(_F32)).astype(u.dtype)
    dc = jnp.pad(dc, [(PAD, PAD), (0, 0)])  # zero rows: shifted reads past either end add nothing
    du = grad_u(h, w2t, b2t, dc, pos, interpret=interpret)
    dh = grad_h(dc, u, w2t, pos, interpret=interpret)
    dw2t, db2t = grad_w2(h, dc, u, pos, w2t.shape[0], interpret=interpret)
    return dh, dw2t, db2t, du
