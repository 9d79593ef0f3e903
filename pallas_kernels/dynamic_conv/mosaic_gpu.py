"""Mosaic GPU (Hopper, sm_90a) kernels of the generated causal convolution: the entry points (`forward`,
`forward_with_residual`, `backward`: `triton`'s contract, layout in `layout`, tile math in `common`), their tile
sizes, the forward and `grad_u`; `grad_h` and `grad_w2` are in `mosaic_gpu_backward`, the shared pipeline
pieces in `mosaic_gpu_pipeline`.

The forward is warp-specialised and persistent, which the Triton lowering cannot express: each CTA has one
memory warpgroup streaming h and w2 tiles by TMA through a `stages`-deep ring of shared-memory slots and two
compute warpgroups (one channel block each, sharing the h tile) issuing wgmma on them. The memory warpgroup
runs ahead into the CTA's next tile while the compute warpgroups are in their epilogue (conv, SiLU, TMA
store). A compute warpgroup fetches its tile's u rows (one TMA box per tap, shifted back W-1-w rows; rows
before 0 come from the TMA's zero fill), pos and b2 itself before its matmul, so they land during it.
`grad_u` is the same kernel with a longer epilogue: dc = dy silu'(c), stored, then du, whose row shifts are
row-major reads of shared memory (below). `grad_h` and `grad_w2` form the tap gradient dk = dc * u (masked)
tile by tile in registers and feed it to wgmma from shared memory; their common operand tile (w2t's rows, h^T)
is multicast to a CTA pair, halving their L2 reads (`GRAD_H.measured`, `GRAD_W2.measured`; the forward and
grad_u gain nothing from it). Same layout and residual (none) as `triton`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.dynamic_conv import mosaic_gpu_backward, triton
from pallas_kernels.dynamic_conv.mosaic_gpu_pipeline import (
    F32,
    compute_loop,
    interpret_params,
    load,
    memory_ring,
    num_sms,
    tma_tile,
)

PAD, ROWS, DIM, U_PAD = triton.PAD, triton.ROWS, triton.DIM, triton.U_PAD
_SWEEP = "the fastest of `python bench/dynamic_conv.py --profile`'s sweep on an H100 at the 2B shape"


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block sizes and ring depth of one kernel: bt token rows, bd channels, bk a K step per block; stages ring
    slots (fewer where shared memory asks for it); cluster CTAs sharing a multicast operand tile; splits grad_w2's
    row splits (None: per shape, `mosaic_gpu_backward.row_splits`). `measured`: where they won (BENCHMARKS.md)."""
    bt: int
    stages: int
    bd: int = 0
    bk: int = 0
    cluster: int = 1
    splits: int | None = 1
    measured: str = _SWEEP


FWD = Tiles(bt=128, bd=32, bk=32, stages=6, measured=_SWEEP + " and at 4B")
GRAD_U = Tiles(bt=128, bd=32, bk=32, stages=6, measured=_SWEEP + " and at 4B")
GRAD_H = Tiles(bt=64, bk=32, stages=5, cluster=2, measured=_SWEEP + " and at 4B; clustered 0.83 ms against 0.98 "
               "unclustered at 2B")
GRAD_W2 = Tiles(bt=64, bd=64, splits=None, stages=2, cluster=2, measured=(
    _SWEEP + "; clustered 0.85 ms against 0.91 unclustered; row splits: at 2B one split fills 1.45 of 2 waves, "
    "1.00 ms against 0.78 for two, at 4B one fills 1.94, 1.16 ms against 1.18"))
MEASURED = ("in a fwd+bwd step on an H100 at the 2B shape: forward 0.63 ms, grad_u 0.96, grad_h 0.81, grad_w2 "
            "0.74, against Triton's 0.87, 1.48, 0.96 and 1.06 alone (BENCHMARKS.md)")


def supported(device, dtype):
    """Whether these kernels run for `dtype` operands on `device` (faster than `triton` alone there: `MEASURED`;
    not in the 2B train step, BENCHMARKS.md): 16-bit on an sm_90 GPU (wgmma)."""
    return (device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9.")
            and jnp.dtype(dtype).itemsize == 2)


def padded_generator_dim(g):
    """G pads to whole 64-wide K steps (the Triton backward takes any such G too)."""
    return -(-max(g, 64) // 64) * 64


def _sm_layout(w2t, b2t, bd):
    """w2t [W, G, D] -> [D / bd, G, Wp * bd] and b2t -> [D / bd, Wp * bd]: a channel block's taps side by side
    (one wgmma operand), blocks leading so a CTA's two blocks are one TMA box."""
    w2w, b2w = triton.wide_layout(w2t, b2t, bd)
    return jnp.transpose(w2w, (1, 0, 2)), b2w


def forward(h, w2t, b2t, u, pos, *, interpret=False, ctas=None, **blocks):
    """y = silu(conv) [N, D] in u's dtype; arguments as `triton.forward` (16-bit h, w2t, u)."""
    return _tap_tiles(h, w2t, b2t, u, pos, None, interpret=interpret, ctas=ctas, cfg=dataclasses.replace(FWD, **blocks))


def grad_u(h, w2t, b2t, dy, u, pos, *, interpret=False, ctas=None, **blocks):
    """(du, dc) [N, D] in dy's dtype, dc = dy silu'(c): `triton.grad_u`'s contract. The taps and c are
    regenerated as in the forward; du_t = sum_r P_{W-1-r}[t + r] with P_w = dc * k[w] masked. Tiles overlap
    by 8 rows (the h tile's TMA box starts on an 8-row tile), so each tile's first bt - 8 rows of du see every
    row they need."""
    return _tap_tiles(h, w2t, b2t, u, pos, dy, interpret=interpret, ctas=ctas,
                      cfg=dataclasses.replace(GRAD_U, **blocks))


def _tap_tiles(h, w2t, b2t, u, pos, dy, *, interpret, ctas, cfg):
    """The forward (dy None: y) or grad_u (du, dc): per (row tile, pair of channel blocks) the taps as one
    wgmma accumulator per compute warpgroup, then the conv epilogue."""
    bt, bd, bk, stages = cfg.bt, cfg.bd, cfg.bk, cfg.stages
    N, G = h.shape
    width, _, D = w2t.shape
    wide = pl.next_power_of_2(width) * bd
    if N % bt or D % (2 * bd) or G % bk:
        raise ValueError(f"hopper: N={N} % {bt}, D={D} % {2 * bd} or G={G} % {bk} is not 0")
    backward = dy is not None
    if backward and width < 2:
        raise ValueError(f"hopper.grad_u: kernel width {width} < 2")
    stride = bt - 8 if backward else bt  # rows of output per tile
    w2w, b2w = _sm_layout(w2t, b2t, bd)
    nrow, ncol, ksteps = -(-N // stride), D // (2 * bd), G // bk
    front, rows = 0, N
    if interpret:  # the TMA zero-fills and clips boxes past the arrays' ends; the interpreter wants them inside
        rows = nrow * stride + bt
        grow = lambda x, before=0: jnp.pad(x, [(before, rows - N), (0, 0)])
        h, u, front = grow(h), grow(u, PAD), PAD
        dy = None if dy is None else grow(dy)
    ntiles = nrow * ncol
    ctas = min(ctas or num_sms(), ntiles)
    dt = h.dtype

    def body(*refs):
        h_ref, w2_ref, b2_ref, u_ref, pos_ref = refs[:5]
        dy_ref, refs = (refs[5], refs[6:]) if backward else (None, refs[5:])
        outs, refs = refs[:1 + backward], refs[1 + backward:]
        h_smem, w_smem, u_smem, pos_smem, b2_smem, io_smem, loaded, consumed, side = refs
        wg, cta = lax.axis_index("wg"), lax.axis_index("cta")
        mine = (ntiles - 1 - cta) // ctas + 1

        def coords(n):
            t = cta + n * ctas
            return pl.multiple_of(t // ncol * stride, 8), t % ncol

        @pl.when(wg == 2)
        def _memory():
            def issue(s, slot):
                r0, j = coords(lax.div(s, ksteps))
                ks = pl.ds(lax.rem(s, ksteps) * bk, bk)
                plgpu.copy_gmem_to_smem(h_ref.at[pl.ds(r0, bt), ks], h_smem.at[slot], loaded.at[slot])
                plgpu.copy_gmem_to_smem(w2_ref.at[pl.ds(2 * j, 2), ks], w_smem.at[slot], loaded.at[slot])

            memory_ring(mine * ksteps, stages, consumed, issue)

        @pl.when(wg < 2)
        def _compute():
            @compute_loop(mine)
            def _(n):
                r0, j = coords(n)
                cb = 2 * j + wg
                cols = pl.ds(cb * bd, bd)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have read io_smem
                for w in range(width):  # u shifted back by W-1-w rows: rows before 0 come from the TMA's zero fill
                    plgpu.copy_gmem_to_smem(u_ref.at[pl.ds(front + r0 - (width - 1 - w), bt), cols],
                                            u_smem.at[wg, w], side.at[wg])
                plgpu.copy_gmem_to_smem(pos_ref.at[pl.ds(PAD + r0, bt)], pos_smem.at[wg], side.at[wg])
                plgpu.copy_gmem_to_smem(b2_ref.at[cb], b2_smem.at[wg], side.at[wg])
                if backward:
                    plgpu.copy_gmem_to_smem(dy_ref.at[pl.ds(r0, bt), cols], io_smem.at[wg], side.at[wg])

                def matmul(acc_ref):
                    def step(k, _):
                        s = n * ksteps + k
                        slot = lax.rem(s, stages)
                        plgpu.barrier_wait(loaded.at[slot])
                        plgpu.wgmma(acc_ref, h_smem.at[slot], w_smem.at[slot, wg])
                        plgpu.wgmma_wait(1)  # the previous step's wgmma is done: its slot goes back

                        @pl.when(k > 0)
                        def _():
                            plgpu.barrier_arrive(consumed.at[lax.rem(s + stages - 1, stages)])

                    lax.fori_loop(0, ksteps, step, None)
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[lax.rem(n * ksteps + ksteps - 1, stages)])
                    return acc_ref[...]

                acc = pl.run_scoped(matmul, plgpu.ACC((bt, wide), F32))
                plgpu.barrier_wait(side.at[wg])
                pos = lax.broadcast_in_dim(load(pos_smem.at[wg], plgpu.Layout.WGMMA.reduce(1), interpret),
                                           (bt, bd), [0])
                taps, c = [], None
                for w in range(width):
                    b2 = load(b2_smem.at[wg, pl.ds(w * bd, bd)], plgpu.Layout.WGMMA.reduce(0), interpret)
                    taps.append(acc[:, w * bd:(w + 1) * bd] + lax.broadcast_in_dim(b2, (bt, bd), [1]))
                    uw = load(u_smem.at[wg, w], plgpu.Layout.WGMMA, interpret)
                    term = jnp.where(pos >= width - 1 - w, taps[w] * uw.astype(F32), 0.0)
                    c = term if c is None else c + term
                io = io_smem.at[wg]
                if not backward:
                    io[...] = (c / (1.0 + jnp.exp(-c))).astype(io.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(io, outs[0].at[pl.ds(r0, bt), cols])
                    return
                sig = 1.0 / (1.0 + jnp.exp(-c))
                dc = load(io, plgpu.Layout.WGMMA, interpret).astype(F32) * sig * (1.0 + c * (1.0 - sig))
                io[...] = dc.astype(io.dtype)  # each thread overwrites the dy it read
                # row t + r's output read u_t through tap W-1-r: du = sum_r P_{W-1-r} read r rows on, P_w = dc *
                # k[w] masked, stored where tap w's u was. The shifted reads are row-major (WG_STRIDED) loads: on jax
                # 0.11.2 (H100) wgmma-layout reads of shared memory at row offsets off the 8-row tile return wrong
                # rows. (At 2B this takes grad_u from 1.06 to 1.01 ms against a round trip through L2 by TMA.)
                for w in range(width):
                    u_smem[wg, w] = jnp.where(pos >= width - 1 - w, dc * taps[w], 0.0).astype(u_smem.dtype)
                plgpu.commit_smem()  # also a warpgroup barrier: every P_w is whole before the shifted reads
                plgpu.copy_smem_to_gmem(io, outs[1].at[pl.ds(r0, bt), cols])  # dc
                rows = plgpu.Layout.WG_STRIDED((stride, bd), vec_size=2)
                shifted = [load(u_smem.at[wg, w, pl.ds(width - 1 - w, stride)], rows, interpret).astype(F32)
                           for w in range(width)]
                du = functools.reduce(jnp.add, shifted)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the dc store has read io
                io[pl.ds(0, stride)] = du.astype(io.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io.at[pl.ds(0, stride)], outs[0].at[pl.ds(r0, stride), cols])

            plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((stages, bt, bk), dt, transforms=tma_tile(bk, dt)),
        plgpu.SMEM((stages, 2, bk, wide), dt, transforms=tma_tile(bk, dt)),  # wgmma wants one swizzle
        plgpu.SMEM((2, width, bt, bd), u.dtype),  # untiled: TMA boxes may start at any row
        plgpu.SMEM((2, bt), jnp.int32),
        plgpu.SMEM((2, wide), F32),
        plgpu.SMEM((2, bt, bd), u.dtype),  # y; or dy, then dc, then du
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=width + 2 + backward, num_barriers=2),
    ]
    out = jax.ShapeDtypeStruct((rows, D), u.dtype)
    args = (h, w2w, b2w, u, pos) + ((dy.astype(u.dtype),) if backward else ())
    body.__name__ = "dynamic_conv_grad_u" if backward else "dynamic_conv_fwd"  # the kernel's name in profiles
    outs = plgpu.kernel(
        body, out_type=(out, out) if backward else out, scratch_types=scratch, grid=(ctas,),
        grid_names=("cta",), num_threads=3, thread_name="wg", **interpret_params(interpret),
    )(*args)
    return (outs[0][:N], outs[1][:N]) if backward else outs[:N]


def forward_with_residual(h, w2t, b2t, u, pos, *, interpret=False):
    """`forward` and what `backward` needs besides the inputs: nothing."""
    return forward(h, w2t, b2t, u, pos, interpret=interpret), None


def backward(h, w2t, b2t, u, pos, residual, dy, *, interpret=False):
    """`triton.backward`'s contract with this module's kernels (`grad_h` falls back to Triton's beyond G = 512, where
    its warpgroups' halves of G exceed one wgmma)."""
    del residual
    du, dc = grad_u(h, w2t, b2t, dy.astype(u.dtype), u, pos, interpret=interpret)
    fits = w2t.shape[1] <= 512
    dh = (grad_h if fits else triton.grad_h)(dc, u, w2t, pos, interpret=interpret)
    dw2t, db2t = grad_w2(h, dc, u, pos, w2t.shape[0], interpret=interpret)
    return dh, dw2t, db2t, du


def grad_h(dc, u, w2t, pos, *, interpret=False, ctas=None, **blocks):
    """dh [N, G] = sum_w (dc * U_w) w2t[w]^T (`triton.grad_h`'s contract, G <= 512): `mosaic_gpu_backward.grad_h`
    at `GRAD_H`'s tiles (`blocks` override them)."""
    return mosaic_gpu_backward.grad_h(dc, u, w2t, pos, cfg=dataclasses.replace(GRAD_H, **blocks),
                                      interpret=interpret, ctas=ctas)


def grad_w2(h, dc, u, pos, width, *, interpret=False, ctas=None, **blocks):
    """(dw2t [W, G, D], db2t [W, D]) float32 (`triton.grad_w2`'s contract): `mosaic_gpu_backward.grad_w2` at
    `GRAD_W2`'s tiles (`blocks` override them)."""
    return mosaic_gpu_backward.grad_w2(h, dc, u, pos, width, cfg=dataclasses.replace(GRAD_W2, **blocks),
                                       interpret=interpret, ctas=ctas)
