"""impl="pallas_triton": the Pallas GPU kernels of `pallas_kernels.gated_delta_rule.gpu` behind a
`jax.custom_vjp` (compiled through Triton on GPUs, Hopper and Ampere alike; interpreted on CPU for tests).

The kernels read [B, T, H, d] as given and pad T, dk and dv inside with masked loads, and they L2-normalise
q and k themselves, so this module only turns document ids into start flags and chains the kernels.
Forward: `prepare` (T, W, U, KD per chunk; parallel), chunk-entry states and V_new (serial), output
(parallel). Backward: `prepare_backward` (EQ, DVL; parallel), state gradients (serial, reverse), input
gradients (parallel). The forward saves T, W, KD, e, the chunk states and V_new for the backward (in bf16
for bf16 inputs: ~2.2 KB per token and head at dk = 96, dv = 256, ~0.86 GB at the 2B shape's 32K tokens):
recomputing them cost the backward a second serial pass (0.7 ms of 6.1 at that shape, H100). Under
`jax.checkpoint` (the trainer's remat) they live only through one layer's backward.
On a mesh the op runs inside `jax.shard_map` like the TPU kernels (`pallas_gdr.shard_over_mesh`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jetnemo_jax.ops.pallas_gdr import _context_mesh, shard_over_mesh
from pallas_kernels.gated_delta_rule import gpu as kernels

MAX_HEAD_DIM = 256  # register tiles of [dk, block_v] fp32 state plus [C, dk] operands
# Compiled, the fp32 (3xTF32) backward kernels need more than the H100's 227 KiB of shared memory from
# dk = 128 on (measured: 304 KiB at dk = dv = 128); interpret mode has no such limit.
MAX_FP32_KEY_DIM = 64


def check_supported(dk, dv, dtypes, interpret=False):
    for name, size in (("dk", dk), ("dv", dv)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"impl='pallas_triton' supports {name} up to {MAX_HEAD_DIM}, got {name}={size}")
    if not interpret and kernels.dot_dtype(*dtypes) != jnp.bfloat16 and dk > MAX_FP32_KEY_DIM:
        raise ValueError(f"impl='pallas_triton' on GPU with non-bf16 inputs supports dk up to "
                         f"{MAX_FP32_KEY_DIM}, got dk={dk}")


def default_blocks(batch_heads: int, dv: int, fast_dtype=jnp.bfloat16) -> dict[str, int]:
    """dv columns per block, per kernel. The serial passes (and the output kernel, whose dv loop carries
    nothing) take 64, or 32 when B*H (the serial passes' other grid axis) is too small to fill a GPU; the
    parallel kernels whose dv loops accumulate take 128 (H100, 2B shape, each kernel alone: input gradients
    2.80 ms at 128 vs 3.00 at 64, prepare_backward 0.52 vs 0.60). fp32 inputs take 32 everywhere (twice the
    bytes per tile: 64 asked for 256 KiB of shared memory)."""
    fp32 = jnp.dtype(fast_dtype) == jnp.float32
    serial = 32 if fp32 or batch_heads * kernels.padded(dv) // 64 < 132 else 64
    wide = 32 if fp32 else 128
    return dict(prepare=wide, chunk_states=serial, output=serial, prepare_backward=wide, state_grads=serial,
                input_grads=wide)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _core(q, k, v, g, beta, starts, h0, scale, l2norm, blocks, interpret):
    return _core_fwd(q, k, v, g, beta, starts, h0, scale, l2norm, blocks, interpret)[0]


def _core_fwd(q, k, v, g, beta, starts, h0, scale, l2norm, blocks, interpret):
    fast_dtype = kernels.dot_dtype(q, k, v)
    bv = dict(blocks)
    tinv, w, u, kd, e = kernels.prepare(k, v, g, beta, starts, l2norm=l2norm, fast_dtype=fast_dtype,
                                        block_v=bv["prepare"], interpret=interpret)
    states, v_new, final = kernels.chunk_states(w, u, kd, e, h0, block_v=bv["chunk_states"], interpret=interpret)
    o = kernels.output(q, k, v, g, starts, v_new, states, scale=scale, l2norm=l2norm, block_v=bv["output"],
                       interpret=interpret)
    return (o, final), (q, k, v, g, beta, starts, h0, tinv, w, kd, e, states, v_new)


def _core_bwd(scale, l2norm, blocks, interpret, res, cts):
    q, k, v, g, beta, starts, h0, tinv, w, kd, e, states, v_new = res
    do, d_final = cts
    do = do.astype(v.dtype)
    bv = dict(blocks)
    eq, dvl = kernels.prepare_backward(q, k, g, starts, do, scale=scale, l2norm=l2norm, fast_dtype=w.dtype,
                                       block_v=bv["prepare_backward"], interpret=interpret)
    dstates, dv_new, dh0 = kernels.state_grads(w, kd, e, eq, dvl, do, d_final, block_v=bv["state_grads"],
                                               interpret=interpret)
    dq, dk, dv, dg, dbeta = kernels.input_grads(q, k, v, g, beta, starts, tinv, v_new, dv_new, states, do,
                                                dstates, scale=scale, l2norm=l2norm, block_v=bv["input_grads"],
                                                interpret=interpret)
    return dq, dk, dv, dg, dbeta, None, dh0.astype(h0.dtype)


_core.defvjp(_core_fwd, _core_bwd)


def _local(q, k, v, g, beta, initial_state, doc_ids, *, scale, l2norm, block_v, interpret):
    B, _, H, dk = q.shape
    check_supported(dk, v.shape[-1], (q.dtype, k.dtype, v.dtype), interpret)
    blocks = default_blocks(B * H, v.shape[-1], kernels.dot_dtype(q, k, v))
    if block_v:
        blocks = dict.fromkeys(blocks, block_v)
    starts = jnp.concatenate([jnp.zeros((B, 1), bool), doc_ids[:, 1:] != doc_ids[:, :-1]], axis=1)
    return _core(q, k, v, g, beta, starts.astype(jnp.float32), initial_state, scale, l2norm,
                 tuple(sorted(blocks.items())), interpret)


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, doc_ids, *, l2norm, interpret, block_v=None,
                     mesh=None):
    """q, k [B,T,H,dk] raw (normalised inside when `l2norm`); v [B,T,H,dv]; g, beta [B,T,H]; any float
    dtypes; initial_state [B,H,dk,dv] float32; doc_ids [B,T] monotone. Returns (o [B,T,H,dv] in v's
    dtype, final state float32); gradients come back in each input's dtype. `block_v` sets one dv block
    for every kernel (benchmarks); None takes `default_blocks`."""
    fn = functools.partial(_local, scale=scale, l2norm=l2norm, block_v=block_v, interpret=interpret)
    mesh = mesh if mesh is not None else _context_mesh()
    if mesh is not None:
        fn = shard_over_mesh(fn, mesh)
    return fn(q, k, v, g, beta, initial_state, doc_ids)
