"""The layout and `jax.custom_vjp` that every backend of the generated causal convolution shares: `generated_conv`
runs one backend's kernels (`tpu`, `triton` or `mosaic_gpu`, passed in as the module) on [B, T, ...] inputs.

The op takes the generator's hidden activation h = silu(x W1) [B, T, G] and its second projection
(w2 [G, Dv * W] channel-major, b2) instead of the kernels: the forward kernel generates each tile's taps in
fast memory, so no float32 [B, T, Dv, W] kernel tensor is formed (the XLA path's), and the forward keeps no
more than the taps in the matmul dtype for the backward (the Triton kernels with `STORE_TAPS`; the others keep
nothing: their backward regenerates them). Each backend supplies `forward`, `forward_with_residual` and
`backward` (see `triton`), its tile constants (ROWS, DIM: what rows and channels pad to; PAD zero rows of pos
before and after, U_PAD of u) and `padded_generator_dim`.

Layout (see common.py): batch rows flattened into one row axis, rows padded to the tile (u also by the
backend's U_PAD zero rows each side), channels and G zero-padded (exact: zero taps and zero inputs add
nothing), pos (each token's position in its document) with PAD rows each side, and w2, b2 tap-major.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import KERNEL_RESIDUALS


def _roundup(n, m):
    return -(-n // m) * m


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _core(h, w2t, b2t, u, pos, kernels, interpret):
    return kernels.forward(h, w2t, b2t, u, pos, interpret=interpret)


def _core_fwd(h, w2t, b2t, u, pos, kernels, interpret):
    y, residual = kernels.forward_with_residual(h, w2t, b2t, u, pos, interpret=interpret)
    # Named (the stored taps), so that a remat policy can keep them (model.REMAT_POLICIES["kernels"]) instead
    # of rerunning the forward kernel.
    return y, (h, w2t, b2t, u, pos, checkpoint_name(residual, KERNEL_RESIDUALS))


def _core_bwd(kernels, interpret, res, dy):
    dh, dw2t, db2t, du = kernels.backward(*res, dy, interpret=interpret)
    return dh, dw2t.astype(res[1].dtype), db2t, jnp.pad(du, [(kernels.U_PAD, kernels.U_PAD), (0, 0)]), None


_core.defvjp(_core_fwd, _core_bwd)


def generated_conv(kernels, u, h, w2, b2, pos, *, interpret=False):
    """silu(causal conv of u with kernels h @ w2 + b2), fused, on the backend module `kernels`.

    u [B,T,Dv]; h [B,T,G] (the matmul dtype); w2 [G, Dv*W] channel-major; b2 [Dv*W]; pos [B,T] int32, each
    token's position in its document (tap w reaches back W-1-w tokens where pos allows). Returns y [B,T,Dv] in
    u's dtype, differentiable in u, h, w2 and b2."""
    B, T, D = u.shape
    G = h.shape[-1]
    width = w2.shape[1] // D
    N, Np = B * T, _roundup(B * T, kernels.ROWS)
    Dp, Gp = _roundup(D, kernels.DIM), kernels.padded_generator_dim(G)
    w2t = jnp.transpose(w2.reshape(G, D, width), (2, 0, 1)).astype(h.dtype)
    w2t = jnp.pad(w2t, [(0, 0), (0, Gp - G), (0, Dp - D)])
    b2t = jnp.pad(b2.reshape(D, width).T.astype(jnp.float32), [(0, 0), (0, Dp - D)])
    h = jnp.pad(h.reshape(N, G), [(0, Np - N), (0, Gp - G)])
    u = jnp.pad(u.reshape(N, D), [(kernels.U_PAD, Np - N + kernels.U_PAD), (0, Dp - D)])
    pos = jnp.pad(pos.reshape(N), [(kernels.PAD, Np - N + kernels.PAD)])
    y = _core(h, w2t, b2t, u, pos, kernels, interpret)
    return y[:N, :D].reshape(B, T, D)
