"""Mosaic TPU kernels of the generated causal convolution; layout in `common`.

Same contract as `triton` (`forward`, `forward_with_residual`, `backward`): `forward` generates the taps per
(channel tile, token tile) with h @ w2t[w] + b2t[w] in VMEM, convolves and applies SiLU; `backward`
regenerates the taps with one XLA matmul and runs `conv_backward`, the conv-only backward kernel. Blocks
cannot overlap, so the rows a tile reads before (W-1) and after (W-1, backward) come from HALO-row blocks
of the neighbouring tiles; a row shift is a sublane roll of [halo; tile; halo] and an aligned slice. The
channel axis is outermost so a w2t block stays in VMEM while the token tiles stream past it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dynamic_conv import common

BT, HALO = 256, 16  # token tile; halo rows (a bf16 sublane tile, >= W - 1)
PAD = BT  # zero rows before and after the token rows: the neighbouring halos of the edge tiles
U_PAD = PAD  # u carries them too
ROWS, DIM = BT, 128
_F32 = common.F32


def padded_generator_dim(g):
    return -(-g // 128) * 128


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))


def _shifter(parts, lead):
    """x_at(s): rows s.. s + BT of the window concat(parts) whose tile starts at row `lead`."""
    win = jnp.concatenate([p.astype(_F32) for p in parts], axis=0)
    n = win.shape[0]
    return lambda s: (pltpu.roll(win, (-s) % n, 0) if s else win)[lead:lead + BT]


def _fwd_kernel(h_ref, w2_ref, b2_ref, u_ref, uprev_ref, pos_ref, y_ref, *, width, precision):
    h = h_ref[...]
    tap = lambda w: (jnp.dot(h, w2_ref[w], preferred_element_type=_F32, precision=precision)
                     + b2_ref[pl.ds(w, 1), :])
    u_at = _shifter([uprev_ref[...], u_ref[...]], HALO)
    y_ref[...] = jax.nn.silu(common.conv(tap, u_at, pos_ref[...], width)).astype(y_ref.dtype)


def _blocks(bd):
    """BlockSpecs (grid (channel tile j, token tile i)) of a [rows, D] array in the padded frame."""
    per = BT // HALO
    return {"cur": pl.BlockSpec((BT, bd), lambda j, i: (i + 1, j)),
            "prev": pl.BlockSpec((HALO, bd), lambda j, i: ((i + 1) * per - 1, j)),
            "next": pl.BlockSpec((HALO, bd), lambda j, i: ((i + 2) * per, j))}


def forward(h, w2t, b2t, u, pos, *, interpret=False):
    """h [N, G]; w2t [W, G, D]; b2t [W, D] float32; u [PAD + N + PAD, D]; pos [PAD + N + PAD] int32.
    N a multiple of BT, D of 128, G of 128. Returns silu(conv) [N, D] in u's dtype."""
    N, G = h.shape
    width, _, D = w2t.shape
    bd = 256 if D % 256 == 0 else 128
    u_spec, pos_spec = _blocks(bd), _blocks(1)
    precision = jax.lax.Precision.HIGHEST if h.dtype == jnp.float32 else None
    kernel = functools.partial(_fwd_kernel, width=width, precision=precision)
    return pl.pallas_call(
        kernel, grid=(D // bd, N // BT),
        in_specs=[pl.BlockSpec((BT, G), lambda j, i: (i, 0)),
                  pl.BlockSpec((width, G, bd), lambda j, i: (0, 0, j)),
                  pl.BlockSpec((width, bd), lambda j, i: (0, j)),
                  u_spec["cur"], u_spec["prev"], pos_spec["cur"]],
        out_specs=pl.BlockSpec((BT, bd), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((N, D), u.dtype),
        compiler_params=_params(), interpret=interpret, name="dynamic_conv_fwd",
    )(h, w2t, b2t, u, u, pos[:, None])


def _bwd_kernel(k_ref, knext_ref, u_ref, uprev_ref, unext_ref, dy_ref, dynext_ref, pos_ref, posnext_ref,
                du_ref, dk_ref, *, width):
    ks = [_shifter([k_ref[w], knext_ref[w]], 0) for w in range(width)]
    pos = _shifter([pos_ref[...], posnext_ref[...]], 0)
    du, dks = common.backward(
        k_at=lambda r, w: ks[w](r),
        u_at=_shifter([uprev_ref[...], u_ref[...], unext_ref[...]], HALO),
        dy_at=_shifter([dy_ref[...], dynext_ref[...]], 0),
        pos_at=lambda r: pos(r).astype(jnp.int32), width=width)
    du_ref[...] = du.astype(du_ref.dtype)
    for w in range(width):
        dk_ref[w] = dks[w].astype(dk_ref.dtype)


def conv_backward(k, u, dy, pos, *, interpret=False):
    """k [W, PAD + N + PAD, D] regenerated taps; u, dy [PAD + N + PAD, D]; pos as in `forward`.
    Returns (du [N, D] in u's dtype, dk [W, N, D] in k's dtype)."""
    width, rows, D = k.shape
    N, bd, per = rows - 2 * PAD, 128, BT // HALO
    rows_spec, pos_spec = _blocks(bd), _blocks(1)
    k_cur = pl.BlockSpec((width, BT, bd), lambda j, i: (0, i + 1, j))
    k_next = pl.BlockSpec((width, HALO, bd), lambda j, i: (0, (i + 2) * per, j))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, width=width), grid=(D // bd, N // BT),
        in_specs=[k_cur, k_next, rows_spec["cur"], rows_spec["prev"], rows_spec["next"],
                  rows_spec["cur"], rows_spec["next"], pos_spec["cur"], pos_spec["next"]],
        out_specs=(pl.BlockSpec((BT, bd), lambda j, i: (i, j)),
                   pl.BlockSpec((width, BT, bd), lambda j, i: (0, i, j))),
        out_shape=(jax.ShapeDtypeStruct((N, D), u.dtype), jax.ShapeDtypeStruct((width, N, D), k.dtype)),
        compiler_params=_params(), interpret=interpret, name="dynamic_conv_bwd",
    )(k, k, u, u, u, dy, dy, pos[:, None], pos[:, None])


def forward_with_residual(h, w2t, b2t, u, pos, *, interpret=False):
    """`forward` and what `backward` needs besides the inputs: nothing (it regenerates the taps)."""
    return forward(h, w2t, b2t, u, pos, interpret=interpret), None


def backward(h, w2t, b2t, u, pos, residual, dy, *, interpret=False):
    """Gradients of `forward`: one XLA matmul regenerates the taps, `conv_backward` forms du and the tap
    gradient dk, XLA's matmuls dh = dk w2t^T and dw2t = h^T dk. Inputs as in `forward`, dy [N, D]. Returns
    (dh [N, G] in h's dtype, dw2t [W, G, D] and db2t [W, D] float32, du [N, D] in u's dtype)."""
    del residual
    pad = [(PAD, PAD), (0, 0)]
    k = jnp.einsum("ng,wgd->wnd", jnp.pad(h, pad), w2t, preferred_element_type=jnp.float32)
    k = (k + b2t[:, None, :]).astype(h.dtype)  # the regenerated taps, in the matmul dtype
    du, dk = conv_backward(k, u, jnp.pad(dy, pad), pos, interpret=interpret)
    dh = jnp.einsum("wnd,wgd->ng", dk, w2t, preferred_element_type=jnp.float32)
    dw2t = jnp.einsum("ng,wnd->wgd", h, dk, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dw2t, jnp.sum(dk.astype(jnp.float32), axis=1), du
