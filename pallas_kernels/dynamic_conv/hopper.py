"""Mosaic GPU (Hopper, sm_90a) kernels of the generated causal convolution; layout in `common`.

The forward is warp-specialised and persistent, which the Triton lowering cannot express: each CTA has one
memory warpgroup streaming h and w2 tiles by TMA through a `stages`-deep ring of shared-memory slots and two
compute warpgroups (one channel block each, sharing the h tile) issuing wgmma on them. The memory warpgroup
runs ahead into the CTA's next tile while the compute warpgroups are in their epilogue (conv, SiLU, TMA
store). A compute warpgroup fetches its tile's u rows (one TMA box per tap, shifted back W-1-w rows; rows
before 0 come from the TMA's zero fill), pos and b2 itself before its matmul, so they land during it.
The backward is the Triton one (`gpu.backward`): same layout, same residual (none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.dynamic_conv import gpu

PAD, ROWS, DIM, U_PAD = gpu.PAD, gpu.ROWS, gpu.DIM, gpu.U_PAD
FWD = {"bt": 128, "bd": 32, "bk": 64, "stages": 3}
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


def _load(ref, layout, interpret):
    """An epilogue read of untiled shared memory into registers of `layout` (Mosaic finds no bank-conflict-free
    plan for these small tiles, so the plain one). GPU interpret mode knows plain reads only."""
    return ref[...] if interpret else plgpu.load(ref, (), layout=layout, optimized=False)


def forward(h, w2t, b2t, u, pos, *, interpret=False, ctas=None, **blocks):
    """y = silu(conv) [N, D] in u's dtype; arguments as `gpu.forward` (bf16 h, w2t, u)."""
    cfg = {**FWD, **blocks}
    bt, bd, bk, stages = cfg["bt"], cfg["bd"], cfg["bk"], cfg["stages"]
    N, G = h.shape
    width, _, D = w2t.shape
    wide = pl.next_power_of_2(width) * bd
    if N % bt or D % (2 * bd) or G % bk:
        raise ValueError(f"hopper.forward: N={N} % {bt}, D={D} % {2 * bd} or G={G} % {bk} is not 0")
    w2w, b2w = _sm_layout(w2t, b2t, bd)
    u, front = gpu._front_padded(u, interpret)  # interpret mode clamps negative starts, the TMA zero-fills
    ncol, ksteps = D // (2 * bd), G // bk
    ntiles = N // bt * ncol
    ctas = min(ctas or _num_sms(), ntiles)
    dt = h.dtype

    def body(h_ref, w2_ref, b2_ref, u_ref, pos_ref, y_ref, h_smem, w_smem, u_smem, pos_smem, b2_smem, y_smem,
             loaded, consumed, side):
        wg, cta = lax.axis_index("wg"), lax.axis_index("cta")
        mine = (ntiles - 1 - cta) // ctas + 1

        def coords(n):
            t = cta + n * ctas
            return t // ncol, t % ncol

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, mine * ksteps)
            def _(s):
                slot = lax.rem(s, stages)

                @pl.when(s >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                i, j = coords(lax.div(s, ksteps))
                ks = pl.ds(lax.rem(s, ksteps) * bk, bk)
                plgpu.copy_gmem_to_smem(h_ref.at[pl.ds(i * bt, bt), ks], h_smem.at[slot], loaded.at[slot])
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
                i, j = coords(n)
                cb, r0 = 2 * j + wg, i * bt
                cols = pl.ds(cb * bd, bd)
                for w in range(width):  # u shifted back by W-1-w rows: rows before 0 come from the TMA's zero fill
                    plgpu.copy_gmem_to_smem(u_ref.at[pl.ds(front + r0 - (width - 1 - w), bt), cols],
                                            u_smem.at[wg, w], side.at[wg])
                plgpu.copy_gmem_to_smem(pos_ref.at[pl.ds(PAD + r0, bt)], pos_smem.at[wg], side.at[wg])
                plgpu.copy_gmem_to_smem(b2_ref.at[cb], b2_smem.at[wg], side.at[wg])

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
                c = None
                for w in range(width):
                    back = width - 1 - w
                    b2 = _load(b2_smem.at[wg, pl.ds(w * bd, bd)], plgpu.Layout.WGMMA.reduce(0), interpret)
                    tap = acc[:, w * bd:(w + 1) * bd] + lax.broadcast_in_dim(b2, (bt, bd), [1])
                    uw = _load(u_smem.at[wg, w], plgpu.Layout.WGMMA, interpret)
                    term = jnp.where(pos >= back, tap * uw.astype(_F32), 0.0)
                    c = term if c is None else c + term
                y = c / (1.0 + jnp.exp(-c))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read y_smem
                y_smem[wg] = y.astype(y_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(y_smem.at[wg], y_ref.at[pl.ds(r0, bt), cols])

            plgpu.wait_smem_to_gmem(0)

    tile = _tma_tile(bk, dt)
    scratch = [
        plgpu.SMEM((stages, bt, bk), dt, transforms=tile),
        plgpu.SMEM((stages, 2, bk, wide), dt, transforms=_tma_tile(min(wide, 64), dt)),
        plgpu.SMEM((2, width, bt, bd), u.dtype),  # untiled: TMA boxes may start at any row
        plgpu.SMEM((2, bt), jnp.int32),
        plgpu.SMEM((2, wide), _F32),
        plgpu.SMEM((2, bt, bd), u.dtype),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=width + 2, num_barriers=2),
    ]
    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((N, D), u.dtype), scratch_types=scratch, grid=(ctas,),
        grid_names=("cta",), num_threads=3, thread_name="wg", **_interpret(interpret),
    )(h, w2w, b2w, u, pos)


def _interpret(interpret):
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public name yet (jax 0.10)

    return {"interpret": InterpretGPUParams()}


def forward_with_residual(h, w2t, b2t, u, pos, *, interpret=False):
    """`forward` and what `backward` needs besides the inputs: nothing."""
    return forward(h, w2t, b2t, u, pos, interpret=interpret), None


backward = gpu.backward
