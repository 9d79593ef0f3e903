"""Mosaic GPU (Hopper, sm_90a) kernels of the generated causal convolution; layout in `common`.

The forward is warp-specialised and persistent, which the Triton lowering cannot express: each CTA has one
memory warpgroup streaming h and w2 tiles by TMA through a `stages`-deep ring of shared-memory slots and two
compute warpgroups (one channel block each, sharing the h tile) issuing wgmma on them. The memory warpgroup
runs ahead into the CTA's next tile while the compute warpgroups are in their epilogue (conv, SiLU, TMA
store). A compute warpgroup fetches its tile's u rows (one TMA box per tap, shifted back W-1-w rows; rows
before 0 come from the TMA's zero fill), pos and b2 itself before its matmul, so they land during it.
`grad_u` is the same kernel with a longer epilogue: dc = dy silu'(c), stored, then du, whose row shifts are
row-major reads of shared memory (below). `grad_h` and `grad_w2` form the tap gradient dk = dc * u (masked)
tile by tile in registers and feed it to wgmma from shared memory; their common operand tile (w2t's rows, h^T)
is multicast to a CTA pair, halving their L2 reads (at 2B on an H100: grad_h 0.83 ms against 0.98 unclustered,
grad_w2 0.85 against 0.91; the forward and grad_u gain nothing from it). Same layout and residual (none) as
`gpu`.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.dynamic_conv import gpu

PAD, ROWS, DIM, U_PAD = gpu.PAD, gpu.ROWS, gpu.DIM, gpu.U_PAD
# Blocks and ring depths: the fastest of `python bench/dynamic_conv.py --profile`'s sweep on an H100 at the 2B
# shape (the forward's, grad_u's and grad_h's also at 4B; BENCHMARKS.md); grad_w2's row splits per shape
# (`_row_splits`). cluster: CTAs sharing a multicast operand tile.
FWD = {"bt": 128, "bd": 32, "bk": 32, "stages": 6}
GRAD_U = {"bt": 128, "bd": 32, "bk": 32, "stages": 6}
GRAD_H = {"bt": 64, "bk": 32, "stages": 5, "cluster": 2}
GRAD_W2 = {"bt": 64, "bd": 64, "splits": None, "stages": 2, "cluster": 2}
_SMEM_BYTES = 227 * 1024 - 1024  # an H100 CTA's shared memory, less room for barriers
_F32 = jnp.float32


def supported(device, dtype):
    """Whether these kernels run for `dtype` operands on `device`: 16-bit on an sm_90 GPU (wgmma)."""
    return (device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9.")
            and jnp.dtype(dtype).itemsize == 2)


def padded_generator_dim(g):
    """G pads to whole 64-wide K steps (the Triton backward takes any such G too)."""
    return -(-max(g, 64) // 64) * 64


def _num_sms():
    return jax.devices()[0].core_count if jax.default_backend() == "gpu" else 4


def _sm_layout(w2t, b2t, bd):
    """w2t [W, G, D] -> [D / bd, G, Wp * bd] and b2t -> [D / bd, Wp * bd]: a channel block's taps side by side
    (one wgmma operand), blocks leading so a CTA's two blocks are one TMA box."""
    w2w, b2w = gpu._wide_layout(w2t, b2t, bd)
    return jnp.transpose(w2w, (1, 0, 2)), b2w


def _tma_tile(cols, dtype):
    """Tiling and swizzle of a wgmma operand whose rows are `cols` wide (up to the 128-byte swizzle)."""
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


# jax 0.10's plgpu.load wants an index argument, which 0.11 deprecates
_LOAD_IDX = ((),) if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty else ()


def _load(ref, layout, interpret):
    """An epilogue read of untiled shared memory into registers of `layout` (Mosaic finds no bank-conflict-free
    plan for these small tiles, so the plain one). GPU interpret mode knows plain reads only."""
    if interpret:
        return ref[...]
    return plgpu.load(ref, *_LOAD_IDX, layout=layout, optimized=False)


def forward(h, w2t, b2t, u, pos, *, interpret=False, ctas=None, **blocks):
    """y = silu(conv) [N, D] in u's dtype; arguments as `gpu.forward` (16-bit h, w2t, u)."""
    return _tap_tiles(h, w2t, b2t, u, pos, None, interpret=interpret, ctas=ctas, cfg={**FWD, **blocks})


def grad_u(h, w2t, b2t, dy, u, pos, *, interpret=False, ctas=None, **blocks):
    """(du, dc) [N, D] in dy's dtype, dc = dy silu'(c): `gpu.grad_u`'s contract. The taps and c are
    regenerated as in the forward; du_t = sum_r P_{W-1-r}[t + r] with P_w = dc * k[w] masked. Tiles overlap
    by 8 rows (the h tile's TMA box starts on an 8-row tile), so each tile's first bt - 8 rows of du see every
    row they need."""
    return _tap_tiles(h, w2t, b2t, u, pos, dy, interpret=interpret, ctas=ctas, cfg={**GRAD_U, **blocks})


def _tap_tiles(h, w2t, b2t, u, pos, dy, *, interpret, ctas, cfg):
    """The forward (dy None: y) or grad_u (du, dc): per (row tile, pair of channel blocks) the taps as one
    wgmma accumulator per compute warpgroup, then the conv epilogue."""
    bt, bd, bk, stages = cfg["bt"], cfg["bd"], cfg["bk"], cfg["stages"]
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
    ctas = min(ctas or _num_sms(), ntiles)
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

            _memory_ring(mine * ksteps, stages, consumed, issue)

        @pl.when(wg < 2)
        def _compute():
            @_compute_loop(mine)
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

                acc = pl.run_scoped(matmul, plgpu.ACC((bt, wide), _F32))
                plgpu.barrier_wait(side.at[wg])
                pos = lax.broadcast_in_dim(_load(pos_smem.at[wg], plgpu.Layout.WGMMA.reduce(1), interpret),
                                           (bt, bd), [0])
                taps, c = [], None
                for w in range(width):
                    b2 = _load(b2_smem.at[wg, pl.ds(w * bd, bd)], plgpu.Layout.WGMMA.reduce(0), interpret)
                    taps.append(acc[:, w * bd:(w + 1) * bd] + lax.broadcast_in_dim(b2, (bt, bd), [1]))
                    uw = _load(u_smem.at[wg, w], plgpu.Layout.WGMMA, interpret)
                    term = jnp.where(pos >= width - 1 - w, taps[w] * uw.astype(_F32), 0.0)
                    c = term if c is None else c + term
                io = io_smem.at[wg]
                if not backward:
                    io[...] = (c / (1.0 + jnp.exp(-c))).astype(io.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(io, outs[0].at[pl.ds(r0, bt), cols])
                    return
                sig = 1.0 / (1.0 + jnp.exp(-c))
                dc = _load(io, plgpu.Layout.WGMMA, interpret).astype(_F32) * sig * (1.0 + c * (1.0 - sig))
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
                shifted = [_load(u_smem.at[wg, w, pl.ds(width - 1 - w, stride)], rows, interpret).astype(_F32)
                           for w in range(width)]
                du = functools.reduce(jnp.add, shifted)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the dc store has read io
                io[pl.ds(0, stride)] = du.astype(io.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io.at[pl.ds(0, stride)], outs[0].at[pl.ds(r0, stride), cols])

            plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((stages, bt, bk), dt, transforms=_tma_tile(bk, dt)),
        plgpu.SMEM((stages, 2, bk, wide), dt, transforms=_tma_tile(bk, dt)),  # wgmma wants one swizzle
        plgpu.SMEM((2, width, bt, bd), u.dtype),  # untiled: TMA boxes may start at any row
        plgpu.SMEM((2, bt), jnp.int32),
        plgpu.SMEM((2, wide), _F32),
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
        grid_names=("cta",), num_threads=3, thread_name="wg", **_interpret(interpret),
    )(*args)
    return (outs[0][:N], outs[1][:N]) if backward else outs[:N]


def _memory_ring(steps, stages, consumed, issue):
    """The memory warpgroup's loop: step s waits until its ring slot's last contents are consumed, then
    `issue(s, slot)` starts its TMA loads; at the end it observes the last consumptions too (every barrier
    phase is waited on, which the interpreter checks)."""
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, steps)
    def _(s):
        slot = lax.rem(s, stages)

        @pl.when(s >= stages)
        def _():
            plgpu.barrier_wait(consumed.at[slot])

        issue(s, slot)

    @pl.loop(steps, steps + stages)
    def _(s):
        @pl.when(s >= stages)
        def _():
            plgpu.barrier_wait(consumed.at[lax.rem(s, stages)])


def _compute_loop(tiles):
    """The compute warpgroups' side of `_memory_ring`: they take the registers the memory warpgroup gave up,
    and the decorated body runs once per tile of this CTA."""
    plgpu.set_max_registers(232, action="increase")
    return pl.loop(0, tiles)


def _interpret(interpret):
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public name yet (jax 0.10)

    return {"interpret": InterpretGPUParams()}


def forward_with_residual(h, w2t, b2t, u, pos, *, interpret=False):
    """`forward` and what `backward` needs besides the inputs: nothing."""
    return forward(h, w2t, b2t, u, pos, interpret=interpret), None


def backward(h, w2t, b2t, u, pos, residual, dy, *, interpret=False):
    """`gpu.backward`'s contract with this module's kernels (`grad_h` falls back to Triton's beyond G = 512, where
    its warpgroups' halves of G exceed one wgmma)."""
    del residual
    du, dc = grad_u(h, w2t, b2t, dy.astype(u.dtype), u, pos, interpret=interpret)
    fits = w2t.shape[1] <= 512
    dh = (grad_h if fits else gpu.grad_h)(dc, u, w2t, pos, interpret=interpret)
    dw2t, db2t = grad_w2(h, dc, u, pos, w2t.shape[0], interpret=interpret)
    return dh, dw2t, db2t, du


def _clustering(cluster, interpret):
    """CTA pairs share their common operand tile by TMA multicast (half its L2 reads), and each slot of the ring
    is refilled once both CTAs consumed it. GPU interpret mode has no cluster barriers: tests run unclustered."""
    cluster = 1 if interpret else cluster
    if cluster == 1:
        return 1, {}, {}, lambda **kw: plgpu.Barrier(**kw)
    return (cluster, dict(collective_axes="cluster"), dict(cluster=(cluster,), cluster_names=("cluster",)),
            lambda **kw: plgpu.ClusterBarrier(collective_axes=("cluster",), **kw))


def _fit_stages(stages, smem):
    """The deepest ring up to `stages` whose shared memory, smem(stages) bytes, fits the H100's 227 KiB."""
    while stages > 1 and smem(stages) > _SMEM_BYTES:
        stages -= 1
    return stages


def grad_h(dc, u, w2t, pos, *, interpret=False, ctas=None, **blocks):
    """dh [N, G] = sum_w (dc * U_w) w2t[w]^T (`gpu.grad_h`'s contract, G <= 512). A CTA per bt-row tile: its
    memory warpgroup streams (dc, u shifted back W-1-w rows, w2t[w] rows) tiles per (channel chunk, tap) step,
    the w2t tile multicast to the CTA pair, which takes adjacent row tiles. Taps run fastest, so a chunk's dc
    and u rows come from L2 for its later taps (with taps slowest they came from DRAM again: at 4B on an H100,
    2.2 GB of DRAM reads and 1.35 ms against 1.20). Each compute warpgroup forms
    dk = where(pos >= W-1-w, dc * u) in registers, stores it as a wgmma operand and accumulates its half of G.
    Both form the same dk: a warpgroup forming it once for both, and forming the next dk while the last wgmma
    runs, measured slower on the H100 (BENCHMARKS.md)."""
    cfg = {**GRAD_H, **blocks}
    bt, bk = cfg["bt"], cfg["bk"]
    N, D = dc.shape
    width, G, _ = w2t.shape
    half, dt = G // 2, w2t.dtype
    cluster, multicast, launch, consumed_barrier = _clustering(cfg["cluster"], interpret)
    if N % (bt * cluster) or D % bk or half % 8 or half > 256:
        raise ValueError(f"grad_h: N={N} % {bt * cluster}, D={D} % {bk}, G/2={half} % 8 or > 256")
    ntile, dsteps = N // bt // cluster, D // bk
    ksteps = width * dsteps
    stages = _fit_stages(cfg["stages"], lambda n: 2 * (n * (2 * bt * bk + bk * G) + 2 * bt * half + 2 * bt * bk)
                         + 4 * 2 * bt)  # 16-bit operands, int32 pos
    front = 0
    if interpret:  # the interpreter has no TMA zero fill for rows before 0
        u, front = jnp.pad(u, [(PAD, 0), (0, 0)]), PAD
    nclu = min((ctas or _num_sms()) // cluster, ntile)

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

            _memory_ring(mine * ksteps, stages, consumed, issue)

        @pl.when(wg < 2)
        def _compute():
            @_compute_loop(mine)
            def _(n):
                r0 = row0(n)
                plgpu.copy_gmem_to_smem(pos_ref.at[pl.ds(PAD + r0, bt)], pos_smem.at[wg], side.at[wg])
                plgpu.barrier_wait(side.at[wg])
                pos = lax.broadcast_in_dim(_load(pos_smem.at[wg], plgpu.Layout.WGMMA.reduce(1), interpret),
                                           (bt, bk), [0])

                def matmul(acc_ref):
                    def step(k, _):
                        slot = lax.rem(n * ksteps + k, stages)
                        plgpu.barrier_wait(loaded.at[slot])
                        dcv = _load(dc_smem.at[slot], plgpu.Layout.WGMMA, interpret).astype(_F32)
                        uv = _load(u_smem.at[slot], plgpu.Layout.WGMMA, interpret).astype(_F32)
                        dk_smem[wg] = jnp.where(pos >= width - 1 - lax.rem(k, width), dcv * uv, 0.0).astype(dt)
                        plgpu.commit_smem()  # the generic-proxy stores before the tensor cores read them
                        plgpu.wgmma(acc_ref, dk_smem.at[wg], w_smem.at[slot, :, pl.ds(wg * half, half)])
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(consumed.at[slot])

                    lax.fori_loop(0, ksteps, step, None)
                    return acc_ref[...]

                acc = pl.run_scoped(matmul, plgpu.ACC((bt, half), _F32))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
                out_smem[wg] = acc.astype(dt)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg], dh_ref.at[pl.ds(r0, bt), pl.ds(wg * half, half)])

            plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((stages, bt, bk), dc.dtype),
        plgpu.SMEM((stages, bt, bk), u.dtype),
        plgpu.SMEM((stages, bk, G), dt, transforms=_tma_tile(bk, dt)),
        plgpu.SMEM((2, bt), jnp.int32),
        plgpu.SMEM((2, bt, half), dt),
        plgpu.SMEM((2, bt, bk), dt, transforms=_tma_tile(bk, dt)),
        plgpu.Barrier(num_arrivals=3, num_barriers=stages),
        consumed_barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=2),
    ]
    body.__name__ = "dynamic_conv_grad_h"
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((N, G), dt), scratch_types=scratch, grid=(nclu,),
                        grid_names=("cgrid",), num_threads=3, thread_name="wg", **launch, **_interpret(interpret))(
        dc, u, jnp.swapaxes(w2t, 1, 2), pos)  # w2t[w]^T rows: the B operand's [bk, G] tiles


def _row_splits(programs, slots, tiles):
    """The fewest row splits (powers of two dividing `tiles` row tiles, up to 8) for which `programs` per split
    fill the `slots` persistent CTAs' (or pairs') last wave to 90% (at 2B on an H100 one split fills 1.45 of 2
    waves: 1.00 ms against 0.78 for two; at 4B one fills 1.94: 1.16 against 1.18)."""
    for s in (1, 2, 4, 8):
        waves = s * programs / slots
        if waves >= 0.9 * -(-waves // 1) or tiles % (2 * s) or s == 8:
            return s


def grad_w2(h, dc, u, pos, width, *, interpret=False, ctas=None, **blocks):
    """(dw2t [W, G, D], db2t [W, D]) float32, dw2t[w] = h^T (dc * U_w), db2t[w] its column sums (`gpu.grad_w2`'s
    contract). A program per (row split, tap, bd channels) accumulates [h^T; ones] x dk over its rows: A is h's
    [bt, G] row tile read transposed by the wgmma (no XLA transpose of h: at 4B on an H100 1.24 ms against 1.33
    with one), its rows (G) split between the compute warpgroups, and the second warpgroup also multiplies a
    constant 64-row tile of ones (db2 rides the MMA); B is dk, formed in registers as in `grad_h`. A CTA pair
    takes two taps of one (split, channel block): the h and dc tiles are multicast. Rows are split (splits=None:
    the fewest splits whose programs fill 90% of the SMs) and the partial sums added by XLA."""
    cfg = {**GRAD_W2, **blocks}
    bt, bd = cfg["bt"], cfg["bd"]
    N, G = h.shape
    D = dc.shape[1]
    dt = h.dtype
    cluster, multicast, launch, consumed_barrier = _clustering(  # odd widths: unclustered (taps pair up)
        cfg["cluster"] if width % cfg["cluster"] == 0 else 1, interpret)
    taps = width // cluster  # the CTAs of a cluster take taps cluster * t + c of one (split, channel block)
    slots = (ctas or _num_sms()) // cluster
    splits = cfg["splits"] or _row_splits(taps * (D // bd), slots, N // bt)
    if N % (bt * splits) or D % bd or G % 64 or width % cluster or bt != bd:
        raise ValueError(f"grad_w2: N={N} % {bt * splits}, D={D} % {bd}, G={G} % 64, W={width} % {cluster} or "
                         f"bt={bt} != bd={bd} (wgmma wants one swizzle for A and B)")
    m_first = min(64 * -(-(G + 64) // 128), G)  # warpgroup 0's rows of h^T; warpgroup 1 the rest and the ones
    steps = N // splits // bt
    nprog = splits * taps * (D // bd)
    stages = _fit_stages(cfg["stages"], lambda n: n * (2 * G * bt + 4 * bt * bd + 4 * bt) + 4 * bt * bd
                         + 2 * 64 * bt + 4 * 2 * 64 * bd)
    front = 0
    if interpret:  # also: the interpreter's wgmma knows no transposed operands, so h^T comes from XLA there
        u, front = jnp.pad(u, [(PAD, 0), (0, 0)]), PAD
    nclu = min(slots, nprog)
    tile = _tma_tile(bd, dt)  # A's swizzle is B's

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

            _memory_ring(mine * steps, stages, consumed, issue)

        def compute(m0, mw, ones):  # this warpgroup's rows [m0, m0 + mw) of h^T, and the ones tile if `ones`
            def h_rows(slot):
                if interpret:
                    return a_smem.at[slot, pl.ds(m0, mw)]
                return plgpu.transpose_ref(a_smem.at[slot, :, pl.ds(m0, mw)], (1, 0))

            if ones:
                plgpu.copy_gmem_to_smem(ones_ref, ones_smem, side)
                plgpu.barrier_wait(side)

            @_compute_loop(mine)
            def _(p):
                sp, w, d = coords(p)

                def matmul(*accs):
                    def step(k, _):
                        slot = lax.rem(p * steps + k, stages)
                        plgpu.barrier_wait(loaded.at[slot])
                        pos = lax.broadcast_in_dim(
                            _load(pos_smem.at[slot], plgpu.Layout.WGMMA.reduce(1), interpret), (bt, bd), [0])
                        dcv = _load(dc_smem.at[slot], plgpu.Layout.WGMMA, interpret).astype(_F32)
                        uv = _load(u_smem.at[slot], plgpu.Layout.WGMMA, interpret).astype(_F32)
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

                accs = pl.run_scoped(matmul, *[plgpu.ACC((n, bd), _F32) for n in [mw] * bool(mw) + [64] * ones])
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
        plgpu.SMEM((2, 64, bd), _F32),
        plgpu.Barrier(num_arrivals=4, num_barriers=stages),
        consumed_barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1),
    ]
    body.__name__ = "dynamic_conv_grad_w2"
    out = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((splits, width, G + 64, D), _F32),
                       scratch_types=scratch, grid=(nclu,), grid_names=("cgrid",), num_threads=3, thread_name="wg",
                       **launch, **_interpret(interpret))(h.T if interpret else h, dc, u, pos, jnp.ones((64, bt), dt))
    out = jnp.sum(out, axis=0)
    return out[:, :G], out[:, G]
