"""Mosaic GPU (Hopper, sm_90a) kernels of the generated causal convolution; layout in `common`.

The forward is warp-specialised and persistent, which the Triton lowering cannot express: each CTA has one
memory warpgroup streaming h and w2 tiles by TMA through a `stages`-deep ring of shared-memory slots and two
compute warpgroups (one channel block each, sharing the h tile) issuing wgmma on them. The memory warpgroup
runs ahead into the CTA's next tile while the compute warpgroups are in their epilogue (conv, SiLU, TMA
store). A compute warpgroup fetches its tile's u rows (one TMA box per tap, shifted back W-1-w rows; rows
before 0 come from the TMA's zero fill), pos and b2 itself before its matmul, so they land during it.
`grad_u` is the same kernel with a longer epilogue: dc = dy silu'(c), stored, then du, whose row shifts go
through per-CTA parking rows in L2 (below). `grad_h` and `grad_w2` are the Triton ones (`gpu.backward`): same
layout, same residual (none).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.dynamic_conv import gpu

PAD, ROWS, DIM, U_PAD = gpu.PAD, gpu.ROWS, gpu.DIM, gpu.U_PAD
FWD = {"bt": 128, "bd": 32, "bk": 64, "stages": 3}
GRAD_U = {"bt": 128, "bd": 32, "bk": 32, "stages": 5}
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
        outs, refs = refs[:1 + 2 * backward], refs[1 + 2 * backward:]
        h_smem, w_smem, u_smem, pos_smem, b2_smem, io_smem, loaded, consumed, side, shift = refs
        wg, cta = lax.axis_index("wg"), lax.axis_index("cta")
        mine = (ntiles - 1 - cta) // ctas + 1

        def coords(n):
            t = cta + n * ctas
            return pl.multiple_of(t // ncol * stride, 8), t % ncol

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, mine * ksteps)
            def _(s):
                slot = lax.rem(s, stages)

                @pl.when(s >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                r0, j = coords(lax.div(s, ksteps))
                ks = pl.ds(lax.rem(s, ksteps) * bk, bk)
                plgpu.copy_gmem_to_smem(h_ref.at[pl.ds(r0, bt), ks], h_smem.at[slot], loaded.at[slot])
                plgpu.copy_gmem_to_smem(w2_ref.at[pl.ds(2 * j, 2), ks], w_smem.at[slot], loaded.at[slot])

            @pl.loop(mine * ksteps, mine * ksteps + stages)
            def _(s):  # observe the last consumptions too (every barrier phase is waited on)
                @pl.when(s >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[lax.rem(s, stages)])

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")

            @pl.loop(0, mine)
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
                # k[w] masked. Tap W-1 needs no shift (r = 0); the others go through this CTA's parking rows in
                # L2 (TMA out, TMA back r rows on), P_w written where tap w's u was: a register layout cannot
                # shift by a row, and on jax 0.11.2 (H100) wgmma-layout reads of shared memory at row offsets
                # off the 8-row tile return wrong rows, and row-major reads of what a wgmma-layout store wrote
                # do not match it; TMA in both directions is exact.
                p = [jnp.where(pos >= width - 1 - w, dc * taps[w], 0.0) for w in range(width)]
                for w in range(width - 1):
                    u_smem[wg, w] = p[w].astype(u_smem.dtype)
                plgpu.commit_smem()
                park = outs[2].at[cta, wg]
                for w in range(width - 1):
                    plgpu.copy_smem_to_gmem(u_smem.at[wg, w], park.at[w, pl.ds(0, bt)])
                plgpu.copy_smem_to_gmem(io, outs[1].at[pl.ds(r0, bt), cols])  # dc, off the round trip's path
                plgpu.wait_smem_to_gmem(1)  # the parked rows are in L2 (dc may still be in flight)
                for w in range(width - 1):
                    plgpu.copy_gmem_to_smem(park.at[w, pl.ds(width - 1 - w, bt)], u_smem.at[wg, w], shift.at[wg])
                du = p[width - 1].astype(u_smem.dtype).astype(_F32)  # rounded as the parked ones are
                plgpu.barrier_wait(shift.at[wg])
                for w in range(width - 1):
                    du = du + _load(u_smem.at[wg, w], plgpu.Layout.WGMMA, interpret).astype(_F32)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the dc store has read io
                io[...] = du.astype(io.dtype)
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
        plgpu.Barrier(num_arrivals=max(width - 1, 1), num_barriers=2),  # grad_u: the shifted P back from L2
    ]
    out = jax.ShapeDtypeStruct((rows, D), u.dtype)
    args = (h, w2w, b2w, u, pos) + ((dy.astype(u.dtype),) if backward else ())
    body.__name__ = "dynamic_conv_grad_u" if backward else "dynamic_conv_fwd"  # the kernel's name in profiles
    park = jax.ShapeDtypeStruct((ctas, 2, width - 1, bt + 8, bd), u.dtype)  # grad_u's row shifts (L2-resident)
    outs = plgpu.kernel(
        body, out_type=(out, out, park) if backward else out, scratch_types=scratch, grid=(ctas,),
        grid_names=("cta",), num_threads=3, thread_name="wg", **_interpret(interpret),
    )(*args)
    return (outs[0][:N], outs[1][:N]) if backward else outs[:N]


def _interpret(interpret):
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public name yet (jax 0.10)

    return {"interpret": InterpretGPUParams()}


def forward_with_residual(h, w2t, b2t, u, pos, *, interpret=False):
    """`forward` and what `backward` needs besides the inputs: nothing."""
    return forward(h, w2t, b2t, u, pos, interpret=interpret), None


def backward(h, w2t, b2t, u, pos, residual, dy, *, interpret=False):
    """`gpu.backward` with this module's `grad_u` (the Triton grad_h and grad_w2 read its dc)."""
    return gpu.backward(h, w2t, b2t, u, pos, residual, dy, interpret=interpret, du_kernel=grad_u)
