"""Building blocks of the warp-specialised Mosaic GPU (Hopper) kernels in `mosaic_gpu` and
`mosaic_gpu_backward`: a memory warpgroup streams operand tiles by TMA through a ring of shared-memory slots
(`memory_ring`) while compute warpgroups consume them (`compute_loop`); CTA pairs can share a multicast tile
(`clustering`); the ring is as deep as an H100's shared memory allows (`fit_stages`).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SMEM_BYTES = 227 * 1024 - 1024  # an H100 CTA's shared memory, less room for barriers
F32 = jnp.float32


def num_sms():
    return jax.devices()[0].core_count if jax.default_backend() == "gpu" else 4


def tma_tile(cols, dtype):
    """Tiling and swizzle of a wgmma operand whose rows are `cols` wide (up to the 128-byte swizzle)."""
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


# jax 0.10's plgpu.load wants an index argument, which 0.11 deprecates
_LOAD_IDX = ((),) if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty else ()


def load(ref, layout, interpret):
    """An epilogue read of untiled shared memory into registers of `layout` (Mosaic finds no bank-conflict-free
    plan for these small tiles, so the plain one). GPU interpret mode knows plain reads only."""
    if interpret:
        return ref[...]
    return plgpu.load(ref, *_LOAD_IDX, layout=layout, optimized=False)


def memory_ring(steps, stages, consumed, issue):
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


def compute_loop(tiles):
    """The compute warpgroups' side of `memory_ring`: they take the registers the memory warpgroup gave up,
    and the decorated body runs once per tile of this CTA."""
    plgpu.set_max_registers(232, action="increase")
    return pl.loop(0, tiles)


def interpret_params(interpret):
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public name yet (jax 0.10)

    return {"interpret": InterpretGPUParams()}


def clustering(cluster, interpret):
    """CTA pairs share their common operand tile by TMA multicast (half its L2 reads), and each slot of the ring
    is refilled once both CTAs consumed it. GPU interpret mode has no cluster barriers: tests run unclustered."""
    cluster = 1 if interpret else cluster
    if cluster == 1:
        return 1, {}, {}, lambda **kw: plgpu.Barrier(**kw)
    return (cluster, dict(collective_axes="cluster"), dict(cluster=(cluster,), cluster_names=("cluster",)),
            lambda **kw: plgpu.ClusterBarrier(collective_axes=("cluster",), **kw))


def fit_stages(stages, smem):
    """The deepest ring up to `stages` whose shared memory, smem(stages) bytes, fits the H100's 227 KiB."""
    while stages > 1 and smem(stages) > SMEM_BYTES:
        stages -= 1
    return stages
