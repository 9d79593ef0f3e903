"""Pallas GPU kernels of the generated causal convolution compiled through Triton (any CUDA GPU; interpreted
on CPU for tests); tile math in `common`, layout and custom VJP in `layout`.

No tap gradient ever reaches HBM, and the taps only as the forward's residual (`STORE_TAPS`):
- `forward`: per (token tile, channel tile) program, generates the tile's W taps h @ w2t[w] + b2t[w] in
  registers as one wide matmul (the channel block's taps side by side), convolves and applies SiLU. With
  `STORE_TAPS` it also writes the taps ([N, W * D] in h's dtype) for `grad_u`; else it keeps nothing for
  the backward beyond the op's inputs.
- `backward`: three kernels:
  `grad_u`: du_t = sum_j dc_{t+j} k_{t+j}[W-1-j]: the taps read back from the forward's (`grad_u_stored`) or
  regenerated as in the forward (its matmul work once more), the row shifts done by 0/1 shift-matrix
  matmuls; c recomputed from those taps and dc = dy silu'(c) formed once per row in it and stored for the
  other two;
  `grad_h`: dh = sum_w (dc * U_w) w2t[w]^T and `grad_w2`: dw2t[w] = h^T (dc * U_w) and db2t[w] = 1^T (dc * U_w),
  where U_w is u shifted back by W-1-w rows and masked at document starts: the tap gradient dc * U_w is
  formed tile by tile in registers as the matmul operand.
Programs are independent (Triton has no sequential grid axis): shifted rows come from overlapping masked
loads of the same HBM rows (L1/L2 serve them; rows before 0 or past the end read as zeros, so u, dy and h
need no padded copies). Block sizes are powers of two with dot dims >= 16 (the caller pads).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dynamic_conv import common

PAD = 128  # zero rows before and after pos's token rows (>= any token block and >= W - 1)
# The forward writes its taps for grad_u (one [N, W * D] tensor in h's dtype kept per call: 403 MB per 2B
# JetBlock at 16K tokens) instead of grad_u regenerating them (the forward's matmul work once more). H100, 2B
# shape, 16K tokens: forward 0.445 -> 0.571 ms, grad_u 0.751 -> 0.427 ms; the 2B step at B=4 without remat
# 388.3 -> 384.3-385.8 ms, peak 58.5 -> 67.4 GiB (BENCHMARKS.md, 2026-12-07).
STORE_TAPS = True
U_PAD = 0  # u is read as is: rows before a tile come from masked loads
ROWS, DIM = 128, 128  # the caller pads the token rows and channels to multiples of these


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block sizes and launch options of one kernel: bt (or bn) token rows, bd channels, bg G columns and bk a
    K step per block; gtiles G blocks per program, sharing each tap-gradient tile (fewer elementwise passes,
    more registers); splits programs per grad_w2 output block over the rows. `measured`: where they won."""
    num_warps: int
    num_stages: int
    bt: int = 0
    bn: int = 0
    bd: int = 0
    bg: int = 0
    bk: int = 0
    gtiles: int = 1
    splits: int = 1
    measured: str = "the fastest of `python bench/dynamic_conv.py --profile`'s sweep, H100, 2B shape (BENCHMARKS.md)"


FWD = Tiles(bt=128, bd=32, bg=64, num_warps=8, num_stages=3)
GRAD_U = Tiles(bt=128, bd=64, bg=64, num_warps=8, num_stages=3)
GRAD_U_STORED = Tiles(bt=64, bd=64, num_warps=4, num_stages=3)  # 0.427 ms; GRAD_U's tiles 0.541
GRAD_H = Tiles(bt=64, bg=128, bk=64, gtiles=3, num_warps=4, num_stages=3)
GRAD_W2 = Tiles(bn=64, bg=128, bd=64, gtiles=3, splits=4, num_warps=8, num_stages=3)

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


def _load_rows(ref, start, size, cols, front=0, n=None):
    """Token rows [start, start + size) of `ref` (which holds `front` zero rows before token 0) at `cols`,
    rows before 0 or from n on read as zeros: masked loads, no padded copy in HBM."""
    rows = start + jax.lax.broadcasted_iota(jnp.int32, (size, cols.size), 0)
    mask = rows >= 0 if n is None else (rows >= 0) & (rows < n)
    return plgpu.load(ref.at[pl.ds(front + start, size), cols], mask=mask, other=0)


def wide_layout(w2t, b2t, bd):
    """w2t [W, G, D] -> [G, D / bd, Wp * bd] and b2t [W, D] -> [D / bd, Wp * bd]: each channel block's taps
    side by side (for `_wide_taps`), zero taps up to Wp, the next power of two (Triton splits in halves)."""
    width, G, D = w2t.shape
    wp = pl.next_power_of_2(width)
    w2t, b2t = (jnp.pad(x, [(0, wp - width)] + [(0, 0)] * (x.ndim - 1)) for x in (w2t, b2t))
    w2w = jnp.transpose(w2t.reshape(wp, G, D // bd, bd), (1, 2, 0, 3)).reshape(G, D // bd, wp * bd)
    return w2w, jnp.transpose(b2t.reshape(wp, D // bd, bd), (1, 0, 2)).reshape(D // bd, wp * bd)


def _wide_taps(h_ref, w2_ref, b2_ref, start, bt, j, bg, width, precision, n=None):
    """The W taps h[rows] @ w2t[w, :, cols] + b2t[w, cols] of channel block j at rows start + (0..bt), float32
    [bt, bd] each, as one [bt, Wp * bd] matmul (`wide_layout`: wide warpgroup MMAs) in a `fori_loop` over G
    blocks (Triton software-pipelines its loads), split by tap. h rows from n on read as zeros."""
    def body(g, acc):
        gs = pl.ds(pl.multiple_of(g * bg, bg), bg)
        return acc + jnp.dot(_load_rows(h_ref, start, bt, gs, n=n), w2_ref[gs, j, :], preferred_element_type=_F32,
                             precision=precision)

    acc = jax.lax.fori_loop(0, h_ref.shape[1] // bg, body, jnp.zeros((bt, w2_ref.shape[2]), _F32))
    return jnp.split(acc + b2_ref[pl.ds(j, 1), :].astype(_F32), pl.next_power_of_2(width), axis=1)[:width]


def _conv(taps, u_ref, pos_ref, t0, bt, cols, width, front, n=None):
    """Pre-activation c [bt, bd] of the tile at rows t0 + (0..bt): taps [W x [bt, bd]] times u shifted back
    (u rows from n on read as zeros)."""
    u_at = lambda s: _load_rows(u_ref, t0 + s, bt, cols, front, n).astype(_F32)
    return common.conv(taps.__getitem__, u_at, pos_ref[pl.ds(PAD + t0, bt)][:, None], width)


def _fwd_kernel(h_ref, w2_ref, b2_ref, u_ref, pos_ref, y_ref, *taps_ref, bt, bd, bg, width, precision, front):
    i, j = pl.program_id(0), pl.program_id(1)
    t0, cols = i * bt, pl.ds(j * bd, bd)
    taps = _wide_taps(h_ref, w2_ref, b2_ref, t0, bt, j, bg, width, precision)
    y_ref[...] = jax.nn.silu(_conv(taps, u_ref, pos_ref, t0, bt, cols, width, front)).astype(y_ref.dtype)
    for k_ref in taps_ref:  # tap w of channel d at column w * D + d
        for w in range(width):
            k_ref[pl.ds(t0, bt), pl.ds(w * u_ref.shape[1] + j * bd, bd)] = taps[w].astype(k_ref.dtype)


def _front_padded(u, interpret):
    """(u, front): the kernels read u at rows before 0 with masked loads. Interpret mode's loads clamp such
    starts into the array (shifting the tile), so there u gets PAD zero rows in front instead."""
    return (jnp.pad(u, [(PAD, 0), (0, 0)]), PAD) if interpret else (u, 0)


def forward(h, w2t, b2t, u, pos, *, interpret=False, store_taps=False, **blocks):
    """h [N, G]; w2t [W, G, D]; b2t [W, D] float32; u [N, D]; pos [PAD + N + PAD] int32. N a multiple of
    ROWS, D of DIM. Returns y = silu(conv) [N, D] in u's dtype; with `store_taps`, (y, the taps [N + PAD,
    W * D] in h's dtype: tap w of channel d at column w * D + d; the PAD rows after N are never written)."""
    cfg = dataclasses.replace(FWD, **blocks)
    N, G = h.shape
    width, _, D = w2t.shape
    bt, bd, bg = cfg.bt, _block(cfg.bd, D), _block(cfg.bg, G)
    u, front = _front_padded(u, interpret)
    kernel = functools.partial(_fwd_kernel, bt=bt, bd=bd, bg=bg, width=width, precision=_precision(h.dtype),
                               front=front)
    out_specs, out_shape = pl.BlockSpec((bt, bd), lambda i, j: (i, j)), jax.ShapeDtypeStruct((N, D), u.dtype)
    if store_taps:
        out_specs, out_shape = (out_specs, _ANY), (out_shape, jax.ShapeDtypeStruct((N + PAD, width * D), h.dtype))
    return pl.pallas_call(
        kernel, grid=(N // bt, D // bd), in_specs=[_ANY] * 5, out_specs=out_specs, out_shape=out_shape,
        compiler_params=_params(cfg.num_warps, cfg.num_stages), interpret=interpret,
        name="dynamic_conv_fwd",
    )(h, *wide_layout(w2t, b2t, bd), u, pos)


def forward_with_residual(h, w2t, b2t, u, pos, *, interpret=False):
    """`forward` and what `backward` needs besides the inputs: the taps with `STORE_TAPS`, else nothing (it
    regenerates the taps and c)."""
    if STORE_TAPS:
        return forward(h, w2t, b2t, u, pos, interpret=interpret, store_taps=True)
    return forward(h, w2t, b2t, u, pos, interpret=interpret), None


def _grad_u_tile(taps, dy_ref, u_ref, pos_ref, du_ref, dc_ref, *, t0, bt, bd, stride, width, op_dtype, precision,
                 front):
    """Row t + r's output read u_t through its tap W-1-r: du_t = sum_r dc_{t+r} k_{t+r}[W-1-r]. With the
    taps of the tile's rows, P_w = dc * k[w] per row, and the row shifts are matmuls with 0/1 shift
    matrices: du = sum_r S_r P_{W-1-r}. Tiles overlap by bt - stride = W - 1 rows, so a tile's first
    `stride` rows see every row they need; c is recomputed from the taps (as in the forward) and dc =
    dy silu'(c) stored for grad_h and grad_w2."""
    n, cols = dy_ref.shape[0], pl.ds(pl.program_id(1) * bd, bd)
    c = _conv(taps, u_ref, pos_ref, t0, bt, cols, width, front, n)
    dc = common.silu_grad(c, _load_rows(dy_ref, t0, bt, cols, n=n).astype(_F32))
    row = t0 + jax.lax.broadcasted_iota(jnp.int32, (bt, bd), 0)
    keep = (row < t0 + stride) & (row < n)
    plgpu.store(dc_ref.at[pl.ds(t0, bt), cols], dc.astype(dc_ref.dtype), mask=keep)
    pos = pos_ref[pl.ds(PAD + t0, bt)][:, None]
    shift = jax.lax.broadcasted_iota(jnp.int32, (bt, bt), 1) - jax.lax.broadcasted_iota(jnp.int32, (bt, bt), 0)
    du = None
    for r in range(width):  # row t's output read u_{t-r} through its tap W-1-r
        p = jnp.where(pos >= r, dc * taps[width - 1 - r], 0.0).astype(op_dtype)
        term = jnp.dot((shift == r).astype(op_dtype), p, preferred_element_type=_F32, precision=precision)
        du = term if du is None else du + term
    plgpu.store(du_ref.at[pl.ds(t0, bt), cols], du.astype(du_ref.dtype), mask=keep)


def _grad_u_kernel(h_ref, w2_ref, b2_ref, dy_ref, u_ref, pos_ref, du_ref, dc_ref, *, bt, bg, precision, **tile):
    """`_grad_u_tile` with the taps regenerated on the tile's rows (the forward's wide matmul, its h tiles
    shared by the taps)."""
    t0 = pl.program_id(0) * tile["stride"]
    taps = _wide_taps(h_ref, w2_ref, b2_ref, t0, bt, pl.program_id(1), bg, tile["width"], precision,
                      dy_ref.shape[0])
    _grad_u_tile(taps, dy_ref, u_ref, pos_ref, du_ref, dc_ref, t0=t0, bt=bt, op_dtype=h_ref.dtype,
                 precision=precision, **tile)


def _grad_u_stored_kernel(k_ref, dy_ref, u_ref, pos_ref, du_ref, dc_ref, *, bt, bd, precision, **tile):
    """`_grad_u_tile` with the forward's taps read back."""
    t0, j = pl.program_id(0) * tile["stride"], pl.program_id(1)
    n, D = dy_ref.shape
    taps = [_load_rows(k_ref, t0, bt, pl.ds(w * D + j * bd, bd), n=n).astype(_F32) for w in range(tile["width"])]
    _grad_u_tile(taps, dy_ref, u_ref, pos_ref, du_ref, dc_ref, t0=t0, bt=bt, bd=bd, op_dtype=k_ref.dtype,
                 precision=precision, **tile)


def _grad_h_kernel(dc_ref, u_ref, w2_ref, pos_ref, dh_ref, *, bt, bg, bk, gtiles, width, precision, front):
    i, g = pl.program_id(0), pl.program_id(1)
    pos = pos_ref[pl.ds(PAD + i * bt, bt)][:, None]
    gcols = [pl.ds((g * gtiles + q) * bg, bg) for q in range(gtiles)]  # one tap-gradient tile feeds them all
    steps = dc_ref.shape[1] // bk

    def body(it, accs):  # one (tap, channel block) per step: a few loads per software-pipelining stage
        w, k = jax.lax.div(it, steps), jax.lax.rem(it, steps)
        back = width - 1 - w
        cols = pl.ds(pl.multiple_of(k * bk, bk), bk)
        dk = dc_ref[pl.ds(i * bt, bt), cols].astype(_F32) * _load_rows(u_ref, i * bt - back, bt, cols, front)
        dk = jnp.where(pos >= back, dk, 0.0).astype(w2_ref.dtype)
        return tuple(acc + jax.lax.dot_general(dk, w2_ref[w, gcols[q], cols], (((1,), (1,)), ((), ())),
                                               preferred_element_type=_F32, precision=precision)
                     for q, acc in enumerate(accs))

    accs = jax.lax.fori_loop(0, width * steps, body, (jnp.zeros((bt, bg), _F32),) * gtiles)
    for q in range(gtiles):
        dh_ref[pl.ds(i * bt, bt), gcols[q]] = accs[q].astype(dh_ref.dtype)


def _grad_w2_kernel(h_ref, dc_ref, u_ref, pos_ref, dw_ref, db_ref, *, bn, bg, bd, gtiles, steps, width, precision,
                    front):
    s, w, d, g = (pl.program_id(a) for a in range(4))
    back = width - 1 - w
    cols = pl.ds(d * bd, bd)
    gcols = [pl.ds((g * gtiles + q) * bg, bg) for q in range(gtiles)]
    ones = jnp.ones((bn, 16), h_ref.dtype)  # db2 as a matmul: column sums on the tensor cores
    dot = lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32,
                                           precision=precision)

    def body(k, accs):  # dw2t[w]^T += (dc * U_w)^T h: the tap gradient is the register operand
        r0 = pl.multiple_of((s * steps + k) * bn, bn)
        dk = dc_ref[pl.ds(r0, bn), cols].astype(_F32) * _load_rows(u_ref, r0 - back, bn, cols, front).astype(_F32)
        dk = jnp.where(pos_ref[pl.ds(PAD + r0, bn)][:, None] >= back, dk, 0.0).astype(h_ref.dtype)
        return tuple(acc + dot(dk, x) for acc, x in zip(accs, [ones] + [h_ref[pl.ds(r0, bn), gc] for gc in gcols]))

    accs = jax.lax.fori_loop(0, steps, body, (jnp.zeros((bd, 16), _F32),) + (jnp.zeros((bd, bg), _F32),) * gtiles)
    db_ref[s, w, cols, pl.ds(g * 16, 16)] = accs[0]
    for q in range(gtiles):
        dw_ref[s, w, cols, gcols[q]] = accs[1 + q]


def _grad_u_launch(cfg, N, D, width):
    bt, bd = cfg.bt, _block(cfg.bd, D)
    stride = bt - (width - 1)  # tiles overlap by W - 1 rows
    if stride < 1:
        raise ValueError(f"grad_u: a token block of {bt} rows is too small for kernel width {width}")
    return dict(grid=(-(-N // stride), D // bd), out_specs=(_ANY, _ANY),
                compiler_params=_params(cfg.num_warps, cfg.num_stages), name="dynamic_conv_grad_u"), \
        dict(bt=bt, bd=bd, stride=stride, width=width)


def grad_u(h, w2t, b2t, dy, u, pos, *, interpret=False, **blocks):
    """(du, dc) [N, D] in dy's dtype, dc = dy silu'(c) (c: the forward's conv). h [N, G]; dy, u [N, D]; the
    rest as in `forward`."""
    cfg = dataclasses.replace(GRAD_U, **blocks)
    N, G = h.shape
    width, _, D = w2t.shape
    launch, tile = _grad_u_launch(cfg, N, D, width)
    w2t, b2t = wide_layout(w2t, b2t, tile["bd"])
    u, front = _front_padded(u, interpret)
    return pl.pallas_call(
        functools.partial(_grad_u_kernel, bg=_block(cfg.bg, G), precision=_precision(h.dtype), front=front, **tile),
        in_specs=[_ANY] * 6, out_shape=(jax.ShapeDtypeStruct((N, D), dy.dtype),) * 2, interpret=interpret, **launch,
    )(h, w2t, b2t, dy, u, pos)


def grad_u_stored(taps, dy, u, pos, *, interpret=False, **blocks):
    """`grad_u` from the forward's taps ([N + PAD, W * D], `forward(store_taps=True)`) instead of h, w2, b2."""
    cfg = dataclasses.replace(GRAD_U_STORED, **blocks)
    N, D = dy.shape
    launch, tile = _grad_u_launch(cfg, N, D, taps.shape[1] // D)
    u, front = _front_padded(u, interpret)
    return pl.pallas_call(
        functools.partial(_grad_u_stored_kernel, precision=_precision(taps.dtype), front=front, **tile),
        in_specs=[_ANY] * 4, out_shape=(jax.ShapeDtypeStruct((N, D), dy.dtype),) * 2, interpret=interpret, **launch,
    )(taps, dy, u, pos)


def grad_h(dc, u, w2t, pos, *, interpret=False, **blocks):
    """dh [N, G] = sum_w (dc * U_w) w2t[w]^T in w2t's dtype; dc, u [N, D]; pos as in `forward`."""
    cfg = dataclasses.replace(GRAD_H, **blocks)
    N, D = dc.shape
    width, G, _ = w2t.shape
    bt, bg, bk = cfg.bt, _block(cfg.bg, G), _block(cfg.bk, D)
    gtiles = _divisor(cfg.gtiles, G // bg)
    u, front = _front_padded(u, interpret)
    return pl.pallas_call(
        functools.partial(_grad_h_kernel, bt=bt, bg=bg, bk=bk, gtiles=gtiles, width=width,
                          precision=_precision(w2t.dtype), front=front),
        grid=(N // bt, G // bg // gtiles), in_specs=[_ANY] * 4, out_specs=_ANY,
        out_shape=jax.ShapeDtypeStruct((N, G), w2t.dtype),
        compiler_params=_params(cfg.num_warps, cfg.num_stages), interpret=interpret,
        name="dynamic_conv_grad_h",
    )(dc, u, w2t, pos)


def grad_w2(h, dc, u, pos, width, *, interpret=False, **blocks):
    """dw2t [W, G, D] and db2t [W, D], float32: dw2t[w] = h^T (dc * U_w), db2t[w] its column sums. The token
    rows are split over `splits` programs per output block (partial sums added here) to fill the GPU."""
    cfg = dataclasses.replace(GRAD_W2, **blocks)
    N, G = h.shape
    D = dc.shape[1]
    bn, bg, bd = cfg.bn, _block(cfg.bg, G), _block(cfg.bd, D)
    gtiles, chunks = _divisor(cfg.gtiles, G // bg), N // bn
    splits = _divisor(cfg.splits, chunks)
    gprogs = G // bg // gtiles
    u, front = _front_padded(u, interpret)
    dw2, db2 = pl.pallas_call(
        functools.partial(_grad_w2_kernel, bn=bn, bg=bg, bd=bd, gtiles=gtiles, steps=chunks // splits,
                          width=width, precision=_precision(h.dtype), front=front),
        grid=(splits, width, D // bd, gprogs), in_specs=[_ANY] * 4, out_specs=(_ANY, _ANY),
        out_shape=(jax.ShapeDtypeStruct((splits, width, D, G), _F32),
                   jax.ShapeDtypeStruct((splits, width, D, gprogs * 16), _F32)),
        compiler_params=_params(cfg.num_warps, cfg.num_stages), interpret=interpret,
        name="dynamic_conv_grad_w2",
    )(h, dc, u, pos)
    # every column of every G program holds db2
    return jnp.swapaxes(jnp.sum(dw2, axis=0), 1, 2), jnp.sum(db2[..., 0], axis=0)


def backward(h, w2t, b2t, u, pos, residual, dy, *, interpret=False):
    """Gradients of `forward` (residual: the taps or None): h [N, G], w2t, b2t, u, pos as in `forward`; dy
    [N, D]. Returns (dh [N, G], dw2t [W, G, D] float32, db2t [W, D] float32, du [N, D]); dh and du in h's and
    u's dtypes."""
    dy = dy.astype(u.dtype)
    if residual is not None:
        du, dc = grad_u_stored(residual, dy, u, pos, interpret=interpret)
    else:
        du, dc = grad_u(h, w2t, b2t, dy, u, pos, interpret=interpret)
    dh = grad_h(dc, u, w2t, pos, interpret=interpret)
    dw2t, db2t = grad_w2(h, dc, u, pos, w2t.shape[0], interpret=interpret)
    return dh, dw2t, db2t, du
