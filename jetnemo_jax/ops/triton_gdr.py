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
# Compiled, the fp32 (3xTF32) kernels at dk <= 128 take up to 192 KiB of shared memory (dv blocks of 32) and
# pass the GPU tests on an H100; at dk = 256 they need 256-384 KiB even at blocks of 16 (sm_90 proxy,
# tests/pallas_kernels/triton_resources.py), over the H100's 227. Interpret mode has no such limit.
MAX_FP32_KEY_DIM = 128


def check_supported(dk, dv, dtypes, interpret=False):
    for name, size in (("dk", dk), ("dv", dv)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"impl='pallas_triton' supports {name} up to {MAX_HEAD_DIM}, got {name}={size}")
    if not interpret and kernels.dot_dtype(*dtypes) != jnp.bfloat16 and dk > MAX_FP32_KEY_DIM:
        raise ValueError(f"impl='pallas_triton' on GPU with non-bf16 inputs supports dk up to "
                         f"{MAX_FP32_KEY_DIM}, got dk={dk}")


def default_block_v(batch_heads: int, dk: int, dv: int, fast_dtype=jnp.bfloat16) -> int:
    """dv columns per block: 128, or the widest of 64 and 32 that still gives the serial passes (grid
    B*H x dv blocks) a program per SM of an H100 (132). H100, 2B shape, the whole op forward+backward:
    5.08-5.17 ms with 128 against 5.30-5.39 with 64 for the serial passes and the output and 128 for the
    other kernels (each kernel alone favoured 64 there, by less than its noise). 32 where shared memory
    asks for it (tests/pallas_kernels/triton_resources.py, sm_90): fp32 inputs (twice the bytes per tile) and
    dk > 128 (the reverse serial pass at dk = 256: 224 KiB at 32, 256 at 64, 336 at 128; 227 fit)."""
    if jnp.dtype(fast_dtype) == jnp.float32 or kernels.padded(dk) > 128:
        return 32
    return next((b for b in (128, 64) if batch_heads * kernels.padded(dv) // b >= 132), 32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _core(q, k, v, g, beta, starts, h0, scale, l2norm, block_v, interpret):
    return _core_fwd(q, k, v, g, beta, starts, h0, scale, l2norm, block_v, interpret)[0]


def _core_fwd(q, k, v, g, beta, starts, h0, scale, l2norm, block_v, interpret):
    fast_dtype = kernels.dot_dtype(q, k, v)
    flags = dict(block_v=block_v, interpret=interpret)
    tinv, w, u, kd, e = kernels.prepare(k, v, g, beta, starts, l2norm=l2norm, fast_dtype=fast_dtype, **flags)
    states, v_new, final = kernels.chunk_states(w, u, kd, e, h0, **flags)
    o = kernels.output(q, k, v, g, starts, v_new, states, scale=scale, l2norm=l2norm, **flags)
    return (o, final), (q, k, v, g, beta, starts, h0, tinv, w, kd, e, states, v_new)


def _core_bwd(scale, l2norm, block_v, interpret, res, cts):
    q, k, v, g, beta, starts, h0, tinv, w, kd, e, states, v_new = res
    do, d_final = cts
    do = do.astype(v.dtype)
    flags = dict(block_v=block_v, interpret=interpret)
    eq, dvl = kernels.prepare_backward(q, k, g, starts, do, scale=scale, l2norm=l2norm, fast_dtype=w.dtype,
                                       **flags)
    dstates, dv_new, dh0 = kernels.state_grads(w, kd, e, eq, dvl, do, d_final, **flags)
    dq, dk, dv, dg, dbeta = kernels.input_grads(q, k, v, g, beta, starts, tinv, v_new, dv_new, states, do,
                                                dstates, scale=scale, l2norm=l2norm, **flags)
    return dq, dk, dv, dg, dbeta, None, dh0.astype(h0.dtype)


_core.defvjp(_core_fwd, _core_bwd)


def _local(q, k, v, g, beta, initial_state, doc_ids, *, scale, l2norm, block_v, interpret):
    B, _, H, dk = q.shape
    check_supported(dk, v.shape[-1], (q.dtype, k.dtype, v.dtype), interpret)
    block_v = block_v or default_block_v(B * H, dk, v.shape[-1], kernels.dot_dtype(q, k, v))
    starts = jnp.concatenate([jnp.zeros((B, 1), bool), doc_ids[:, 1:] != doc_ids[:, :-1]], axis=1)
    return _core(q, k, v, g, beta, starts.astype(jnp.float32), initial_state, scale, l2norm, block_v,
                 interpret)


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, doc_ids, *, l2norm, interpret, block_v=None,
                     mesh=None):
    """q, k [B,T,H,dk] raw (normalised inside when `l2norm`); v [B,T,H,dv]; g, beta [B,T,H]; any float
    dtypes; initial_state [B,H,dk,dv] float32; doc_ids [B,T] monotone. Returns (o [B,T,H,dv] in v's
    dtype, final state float32); gradients come back in each input's dtype."""
    fn = functools.partial(_local, scale=scale, l2norm=l2norm, block_v=block_v, interpret=interpret)
    mesh = mesh if mesh is not None else _context_mesh()
    if mesh is not None:
        fn = shard_over_mesh(fn, mesh)
    return fn(q, k, v, g, beta, initial_state, doc_ids)
