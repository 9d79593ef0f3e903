"""Tile math shared by the GPU (Triton) and TPU (Mosaic) kernels of the generated causal convolution.

Layout (built by `layout`): tokens of all batch rows flattened to one row axis; pos
[rows] int32, with `PAD` zero rows before and after (on TPU u too, `U_PAD` = PAD; the GPU kernels read u
with masked loads instead), is a token's position in its document, so tap w (reading row t - (W-1) + w)
is live iff pos_t >= W-1-w: one compare masks sequence starts, batch-row starts and document boundaries alike, in the
forward and (read at the later row) in the backward. Kernel taps are tap-major: w2t [W, G, Dv], b2t [W, Dv],
regenerated kernels k [rows, W * Dv]. All arithmetic is float32.

The backends differ only in how a tile at a row offset is fetched (a shifted load on GPU, a halo block and
a sublane roll on TPU); the callbacks below hide that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def conv(tap, u_at, pos, width):
    """Pre-activation c [bt, bd] of the tile. tap(w): kernel tap w at the tile's rows; u_at(s): u at row
    offset s (s <= 0); pos [bt, 1]."""
    c = None
    for w in range(width):
        back = width - 1 - w
        term = jnp.where(pos >= back, tap(w) * u_at(-back), 0.0)
        c = term if c is None else c + term
    return c


def silu_grad(c, dy):
    sig = jax.nn.sigmoid(c)
    return dy * sig * (1.0 + c * (1.0 - sig))


def backward(k_at, u_at, dy_at, pos_at, width):
    """du and the kernel gradient taps of the tile.

    k_at(j, w): tap w at row offset j >= 0; u_at(s); dy_at(j); pos_at(j) [bt, 1]. Row t + j's output used
    u_t through its tap W-1-j, so du_t = sum_j dc_{t+j} k_{t+j}[W-1-j] (live iff pos_{t+j} >= j), with
    dc = dy silu'(c) recomputed at each of the W rows ahead (cheap next to reading k once).
    Returns (du [bt, bd], [dk_w [bt, bd] for w in range(width)]).
    """
    du, dks = None, None
    for j in range(width):
        pos = pos_at(j)
        c = conv(lambda w, j=j: k_at(j, w), lambda s, j=j: u_at(s + j), pos, width)
        dc = silu_grad(c, dy_at(j))
        if j == 0:
            dks = [jnp.where(pos >= width - 1 - w, dc * u_at(w - width + 1), 0.0) for w in range(width)]
        term = jnp.where(pos >= j, dc * k_at(j, width - 1 - j), 0.0)
        du = term if du is None else du + term
    return du, dks
