"""Mosaic GPU (Hopper, sm_90a) kernels of the generated causal convolution's weight and input-activation
gradients, `grad_h` and `grad_w2` (`mosaic_gpu` holds the forward, `grad_u` and the entry points): each forms
the tap gradient dk = dc * u (masked) tile by tile in registers and feeds it to wgmma from shared memory; their
common operand tile (w2t's rows, h^T) is multicast to a CTA pair, halving their L2 reads (`mosaic_gpu.GRAD_H`
and `GRAD_W2` hold the measurements). Tile sizes come in as `cfg` (a `mosaic_gpu.Tiles`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.dynamic_conv.mosaic_gpu_pipeline import (
    F32,
    clustering,
    compute_loop,
    fit_stages,
    interpret_params,
    load,
    memory_ring,
    num_sms,
    tma_tile,
)
from pallas_kernels.dynamic_conv.triton import PAD


def grad_h(dc, u, w2t, pos, *, cfg, interpret=False, ctas=None):
    """dh [N, G] = sum_w (dc * U_w) w2t[w]^T (`triton.grad_h`'s contract, G <= 512). A CTA per bt-row tile: its
    memory warpgroup streams (dc, u shifted back W-1-w rows, w2t[w] rows) tiles per (channel chunk, tap) step,
    the w2t tile multicast to the CTA pair, which takes adjacent row tiles. Taps run fastest, so a chunk's dc
    and u rows come from L2 for its later taps (with taps slowest they came from DRAM again: at 4B on an H100,
    2.2 GB of DRAM reads and 1.35 ms against 1.20). Each compute warpgroup forms
    dk = where(pos >= W-1-w, dc * u) in registers, stores it as a wgmma operand and accumulates its half of G.
    Both form the same dk: a warpgroup forming it once for both, and forming the next dk while the last wgmma
    runs, measured slower on the H100 (BENCHMARKS.md)."""
    bt, bk = cfg.bt, cfg.bk
    N, D = dc.shape
    width, G, _ = w2t.shape
    half, dt = G // 2, w2t.dtype
    cluster, multicast, launch, consumed_barrier = clustering(cfg.cluster, interpret)
    if N % (bt * cluster) or D % bk or half % 8 or half > 256:
        raise ValueError(f"grad_h: N={N} % {bt * cluster}, D={D} % {bk}, G/2={half} % 8 or > 256")
    ntile, dsteps = N // bt // cluster, D // bk
    ksteps = width * dsteps
    stages = fit_stages(cfg.stages, lambda n: 2 * (n * (2 * bt * bk + bk * G) + 2 * bt * half + 2 * bt * bk)
                         + 4 * 2 * bt)  # 16-bit operands, int32 pos
    front = 0
    if interpret:  # the interpreter has no TMA zero fill for rows before 0
        u, front = jnp.pad(u, [(PAD, 0), (0, 0)]), PAD
    nclu = min((ctas or num_sms()) // cluster, ntile)

    def body(dc_ref, u_ref, w_ref, pos_ref, dh_ref, dc_smem, u_smem, w_smem, pos_smem, out_smem, dk_smem, loaded,
             consumed, side):
        wg, g = lax.axis_index("wg"), lax.axis_index("cgrid")
        rank = lax.axis_index("cluster") if cluster > 1 else 0  # within the CTA pair
        mine = (ntile - 1 - g) // nclu + 1

        def row0(n):
            return pl.multiple_of(((g + n * nclu) * cluster + rank) * bt, bt)

        @pl.when(wg == 2)
        def _memory():
            def issue(s, slot):
                r0 = row0(lax.div(s, ksteps))
                k = lax.rem(s, ksteps)
                w, d = lax.rem(k, width), lax.div(k, width)
                cols = pl.ds(pl.multiple_of(d * bk, bk), bk)
                plgpu.copy_gmem_to_smem(dc_ref.at[pl.ds(r0, bt), cols], dc_smem.at[slot], loaded.at[slot])
                plgpu.copy_gmem_to_smem(u_ref.at[pl.ds(front + r0 - (width - 1 - w), bt), cols], u_smem.at[slot],
                                        loaded.at[slot])
                plgpu.copy_gmem_to_smem(w_ref.at[w, cols], w_smem.at[slot], loaded.at[slot], **multicast)

            memory_ring(mine * ksteps, stages, consumed, issue)

        @pl.when(wg < 2)
        def _compute():
            @compute_loop(mine)
            def _(n):
                r0 = row0(n)
                plgpu.copy_gmem_to_smem(pos_ref.at[pl.ds(PAD + r0, bt)], pos_smem.at[wg], side.at[wg])
                plgpu.barrier_wait(side.at[wg])
                pos = lax.broadcast_in_dim(load(pos_smem.at[wg], plgpu.Layout.WGMMA.reduce(1), interpret),
                                           (bt, bk), [0])

                def matmul(acc_ref):
                    def step(k, _):
                        slot = lax.rem(n * ksteps + k, stages)
                        plgpu.barrier_wait(loaded.at[slot])
                        dcv = load(dc_smem.at[slot], plgpu.Layout.WGMMA, interpret).astype(F32)
                        uv = load(u_smem.at[slot], plgpu.Layout.WGMMA, interpret).astype(F32)
                        dk_smem[wg] = jnp.where(pos >= width - 1 - lax.rem(k, width), dcv * uv, 0.0).astype(dt)
                        plgpu.commit_smem()  # the generic-proxy stores before the tensor cores read them
                        plgpu.wgmma(acc_ref, dk_smem.at[wg], w_smem.at[slot, :, pl.ds(wg * half, half)])
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(consumed.at[slot])

                    lax.fori_loop(0, ksteps, step, None)
                    return acc_ref[...]

                acc = pl.run_scoped(matmul, plgpu.ACC((bt, half), F32))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
                out_smem[wg] = acc.astype(dt)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg], dh_ref.at[pl.ds(r0, bt), pl.ds(wg * half, half)])

            plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((stages, bt, bk), dc.dtype),
        plgpu.SMEM((stages, bt, bk), u.dtype),
        plgpu.SMEM((stages, bk, G), dt, transforms=tma_tile(bk, dt)),
        plgpu.SMEM((2, bt), jnp.int32),
        plgpu.SMEM((2, bt, half), dt),
        plgpu.SMEM((2, bt, bk), dt, transforms=tma_tile(bk, dt)),
        plgpu.Barrier(num_arrivals=3, num_barriers=stages),
        consumed_barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=2),
    ]
    body.__name__ = "dynamic_conv_grad_h"
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((N, G), dt), scratch_types=scratch, grid=(nclu,),
                        grid_names=("cgrid",), num_threads=3, thread_name="wg", **launch,
                        **interpret_params(interpret))(
        dc, u, jnp.swapaxes(w2t, 1, 2), pos)  # w2t[w]^T rows: the B operand's [bk, G] tiles


def row_splits(programs, slots, tiles):
    """The fewest row splits (powers of two dividing `tiles` row tiles, up to 8) for which `programs` per split
    fill the `slots` persistent CTAs' (or pairs') last wave to 90% (the measurements: `mosaic_gpu.GRAD_W2`)."""
    for s in (1, 2, 4, 8):
        waves = s * programs / slots
        if waves >= 0.9 * -(-waves // 1) or tiles % (2 * s) or s == 8:
            return s


def grad_w2(h, dc, u, pos, width, *, cfg, interpret=False, ctas=None):
    """(dw2t [W, G, D], db2t [W, D]) float32, dw2t[w] = h^T (dc * U_w), db2t[w] its column sums (`triton.grad_w2`'s
    contract). A program per (row split, tap, bd channels) accumulates [h^T; ones] x dk over its rows: A is h's
    [bt, G] row tile read transposed by the wgmma (no XLA transpose of h: at 4B on an H100 1.24 ms against 1.33
    with one), its rows (G) split between the compute warpgroups, and the second warpgroup also multiplies a
    constant 64-row tile of ones (db2 rides the MMA); B is dk, formed in registers as in `grad_h`. A CTA pair
    takes two taps of one (split, channel block): the h and dc tiles are multicast. Rows are split (splits=None:
    the fewest splits whose programs fill 90% of the SMs) and the partial sums added by XLA."""
    bt, bd = cfg.bt, cfg.bd
    N, G = h.shape
    D = dc.shape[1]
    dt = h.dtype
    cluster, multicast, launch, consumed_barrier = clustering(  # odd widths: unclustered (taps pair up)
        cfg.cluster if width % cfg.cluster == 0 else 1, interpret)
    taps = width // cluster  # the CTAs of a cluster take taps cluster * t + c of one (split, channel block)
    slots = (ctas or num_sms()) // cluster
    splits = cfg.splits or row_splits(taps * (D // bd), slots, N // bt)
    if N % (bt * splits) or D % bd or G % 64 or width % cluster or bt != bd:
        raise ValueError(f"grad_w2: N={N} % {bt * splits}, D={D} % {bd}, G={G} % 64, W={width} % {cluster} or "
                         f"bt={bt} != bd={bd} (wgmma wants one swizzle for A and B)")
    m_first = min(64 * -(-(G + 64) // 128), G)  # warpgroup 0's rows of h^T; warpgroup 1 the rest and the ones
    steps = N // splits // bt
    nprog = splits * taps * (D // bd)
    stages = fit_stages(cfg.stages, lambda n: n * (2 * G * bt + 4 * bt * bd + 4 * bt) + 4 * bt * bd
                         + 2 * 64 * bt + 4 * 2 * 64 * bd)
    front = 0
    if interpret:  # also: the interpreter's wgmma knows no transposed operands, so h^T comes from XLA there
        u, front = jnp.pad(u, [(PAD, 0), (0, 0)]), PAD
    nclu = min(slots, nprog)
    tile = tma_tile(bd, dt)  # A's swizzle is B's

    def body(h_ref, dc_ref, u_ref, pos_ref, ones_ref, out_ref, a_smem, dc_smem, u_smem, pos_smem, dk_smem,
             ones_smem, o_smem, loaded, consumed, side):
        wg, g = lax.axis_index("wg"), lax.axis_index("cgrid")
        rank = lax.axis_index("cluster") if cluster > 1 else 0  # within the CTA pair
        mine = (nprog - 1 - g) // nclu + 1

        def coords(p):  # this CTA's p-th program -> (row split, tap, channel block)
            prog = g + p * nclu
            return (lax.div(prog, taps * (D // bd)), lax.rem(lax.div(prog, D // bd), taps) * cluster + rank,
                    lax.rem(prog, D // bd))

        @pl.when(wg == 2)
        def _memory():
            def issue(s, slot):
                sp, w, d = coords(lax.div(s, steps))
                r0 = pl.multiple_of((sp * steps + lax.rem(s, steps)) * bt, bt)
                cols = pl.ds(pl.multiple_of(d * bd, bd), bd)
                a_tile = h_ref.at[:, pl.ds(r0, bt)] if interpret else h_ref.at[pl.ds(r0, bt)]
                plgpu.copy_gmem_to_smem(a_tile, a_smem.at[slot], loaded.at[slot], **multicast)
                plgpu.copy_gmem_to_smem(dc_ref.at[pl.ds(r0, bt), cols], dc_smem.at[slot], loaded.at[slot],
                                        **multicast)
                plgpu.copy_gmem_to_smem(u_ref.at[pl.ds(front + r0 - (width - 1 - w), bt), cols], u_smem.at[slot],
                                        loaded.at[slot])
                plgpu.copy_gmem_to_smem(pos_ref.at[pl.ds(PAD + r0, bt)], pos_smem.at[slot], loaded.at[slot])

            memory_ring(mine * steps, stages, consumed, issue)

        def compute(m0, mw, ones):  # this warpgroup's rows [m0, m0 + mw) of h^T, and the ones tile if `ones`
            def h_rows(slot):
                if interpret:
                    return a_smem.at[slot, pl.ds(m0, mw)]
                return plgpu.transpose_ref(a_smem.at[slot, :, pl.ds(m0, mw)], (1, 0))

            if ones:
                plgpu.copy_gmem_to_smem(ones_ref, ones_smem, side)
                plgpu.barrier_wait(side)

            @compute_loop(mine)
            def _(p):
                sp, w, d = coords(p)

                def matmul(*accs):
                    def step(k, _):
                        slot = lax.rem(p * steps + k, stages)
                        plgpu.barrier_wait(loaded.at[slot])
                        pos = lax.broadcast_in_dim(
                            load(pos_smem.at[slot], plgpu.Layout.WGMMA.reduce(1), interpret), (bt, bd), [0])
                        dcv = load(dc_smem.at[slot], plgpu.Layout.WGMMA, interpret).astype(F32)
                        uv = load(u_smem.at[slot], plgpu.Layout.WGMMA, interpret).astype(F32)
                        dk_smem[wg] = jnp.where(pos >= width - 1 - w, dcv * uv, 0.0).astype(dt)
                        plgpu.commit_smem()
                        if mw:
                            plgpu.wgmma(accs[0], h_rows(slot), dk_smem.at[wg])
                        if ones:
                            plgpu.wgmma(accs[-1], ones_smem, dk_smem.at[wg])
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(consumed.at[slot])

                    lax.fori_loop(0, steps, step, None)
                    return [acc[...] for acc in accs]

                accs = pl.run_scoped(matmul, *[plgpu.ACC((n, bd), F32) for n in [mw] * bool(mw) + [64] * ones])
                rows = [m0 + 64 * q for q in range(mw // 64)] + [G] * ones  # out rows of each 64-row chunk
                chunks = [a[q * 64:(q + 1) * 64] for a in accs for q in range(a.shape[0] // 64)]
                for r, chunk in zip(rows, chunks):  # the epilogue through a 64-row buffer
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    o_smem[wg] = chunk
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[wg], out_ref.at[sp, w, pl.ds(r, 64), pl.ds(d * bd, bd)])

            plgpu.wait_smem_to_gmem(0)

        pl.when(wg == 0)(lambda: compute(0, m_first, False))
        pl.when(wg == 1)(lambda: compute(m_first, G - m_first, True))

    scratch = [
        plgpu.SMEM((stages, G, bt) if interpret else (stages, bt, G), dt, transforms=tile),
        plgpu.SMEM((stages, bt, bd), dc.dtype),
        plgpu.SMEM((stages, bt, bd), u.dtype),
        plgpu.SMEM((stages, bt), jnp.int32),
        plgpu.SMEM((2, bt, bd), dt, transforms=tile),
        plgpu.SMEM((64, bt), dt, transforms=tile),
        plgpu.SMEM((2, 64, bd), F32),
        plgpu.Barrier(num_arrivals=4, num_barriers=stages),
        consumed_barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1),
    ]
    body.__name__ = "dynamic_conv_grad_w2"
    out = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((splits, width, G + 64, D), F32),
                       scratch_types=scratch, grid=(nclu,), grid_names=("cgrid",), num_threads=3, thread_name="wg",
                       **launch, **interpret_params(interpret))(
        h.T if interpret else h, dc, u, pos, jnp.ones((64, bt), dt))
    out = jnp.sum(out, axis=0)
    return out[:, :G], out[:, G]
