"""Pallas GPU kernels of the gated delta rule compiled through Triton (Hopper and Ampere alike; interpreted on
CPU for tests): the entry point `gated_delta_rule`, its layout and its `jax.custom_vjp`.

The kernels read [B, T, H, d] as given and pad T, dk and dv inside with masked loads, and they L2-normalise
q and k themselves, so the layout here is only document start flags and the kernels' chaining.
Forward (`triton_forward`): `prepare` (T, W, U, KD per chunk; parallel), chunk-entry states and V_new
(serial), output (parallel). Backward (`triton_backward`): `prepare_backward` (EQ, DVL; parallel), state
gradients (serial, reverse), input gradients (parallel). The forward saves T, W, KD, e, the chunk states and
V_new for the backward (in bf16 for bf16 inputs: ~2.2 KB per token and head at dk = 96, dv = 256, ~0.86 GB
at the 2B shape's 32K tokens): recomputing them would cost the backward a second serial pass
(`RECOMPUTE_MEASURED`). Under `jax.checkpoint` (the trainer's remat) they live only through one layer's
backward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import KERNEL_RESIDUALS
from pallas_kernels.gated_delta_rule import triton_backward as bwd
from pallas_kernels.gated_delta_rule import triton_forward as fwd

CHUNK = fwd.CHUNK
MAX_HEAD_DIM = 256  # register tiles of [dk, block_v] fp32 state plus [C, dk] operands
# Compiled, the fp32 (3xTF32) kernels at dk <= 128 take up to 192 KiB of shared memory (dv blocks of 32) and
# pass the GPU tests on an H100; at dk = 256 they need 256-384 KiB even at blocks of 16 (sm_90 proxy,
# tests/pallas_kernels/triton_resources.py), over the H100's 227. Interpret mode has no such limit.
MAX_FP32_KEY_DIM = 128
RECOMPUTE_MEASURED = "H100, 2B shape: a second serial pass in the backward costs 0.7 ms of its 6.1"


@dataclasses.dataclass(frozen=True)
class BlockV:
    """The dv columns per block of the kernels (`default_block_v`), and the measurements that chose them."""
    widths: tuple[int, ...]  # widest first: the widest that still gives the serial passes `programs` programs
    narrow: int  # where shared memory asks for it: fp32 inputs (twice the bytes per tile) and dk > 128
    programs: int  # the serial passes' grid is B*H x dv blocks: a program per SM of an H100
    measured: str


BLOCK_V = BlockV(widths=(128, 64), narrow=32, programs=132, measured=(
    "H100, 2B shape (B=8), the whole op forward+backward: 5.08-5.17 ms at 128 against 5.30-5.39 at 64 for the "
    "serial passes and the output and 128 for the other kernels (each kernel alone favoured 64, by less than its "
    "noise). Shared memory at dk = 256 (tests/pallas_kernels/triton_resources.py, sm_90), the reverse serial "
    "pass: 224 KiB at 32, 256 at 64, 336 at 128; 227 fit. 2026-12-07, the 2B step's shape (B=2): serial passes "
    "at 32 and the chunk-parallel kernels at 128 took 1.56 ms against 1.79 with 32 for all (and 210.1 against "
    "213.6 ms per train step); at B=8 the split and 128 for all tie (5.32 ms)"))


dot_dtype = fwd.dot_dtype
padded = fwd.padded


def check_supported(dk, dv, dtypes, interpret=False):
    for name, size in (("dk", dk), ("dv", dv)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"the Triton kernels support {name} up to {MAX_HEAD_DIM}, got {name}={size}")
    if not interpret and dot_dtype(*dtypes) != jnp.bfloat16 and dk > MAX_FP32_KEY_DIM:
        raise ValueError(f"the Triton kernels on a GPU with non-bf16 inputs support dk up to {MAX_FP32_KEY_DIM}, "
                         f"got dk={dk}")


def default_block_v(batch_heads: int, dk: int, dv: int, fast_dtype=jnp.bfloat16) -> tuple[int, int]:
    """dv columns per block (`BLOCK_V`), (serial passes, chunk-parallel kernels): the serial passes take the
    widest of its widths that still gives them a program per SM, the chunk-parallel kernels (whose grid also
    spans the chunks) the widest; both the narrow width where fp32 inputs or dk > 128 ask for it."""
    if jnp.dtype(fast_dtype) == jnp.float32 or padded(dk) > 128:
        return BLOCK_V.narrow, BLOCK_V.narrow
    serial = next((b for b in BLOCK_V.widths if batch_heads * padded(dv) // b >= BLOCK_V.programs), BLOCK_V.narrow)
    return serial, BLOCK_V.widths[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _core(q, k, v, g, beta, starts, h0, scale, l2norm, blocks, interpret):
    return _core_fwd(q, k, v, g, beta, starts, h0, scale, l2norm, blocks, interpret)[0]


def _core_fwd(q, k, v, g, beta, starts, h0, scale, l2norm, blocks, interpret):
    fast_dtype = dot_dtype(q, k, v)
    serial, flags = dict(block_v=blocks[0], interpret=interpret), dict(block_v=blocks[1], interpret=interpret)
    tinv, w, u, kd, e = fwd.prepare(k, v, g, beta, starts, l2norm=l2norm, fast_dtype=fast_dtype, **flags)
    states, v_new, final = fwd.chunk_states(w, u, kd, e, h0, **serial)
    o = fwd.output(q, k, v, g, starts, v_new, states, scale=scale, l2norm=l2norm, **flags)
    # Named, so that a remat policy can keep them (model.REMAT_POLICIES["kernels"]) instead of rerunning the kernels.
    res = (q, k, v, g, beta, starts, h0, tinv, w, kd, e, states, v_new)
    return checkpoint_name(((o, final), res), KERNEL_RESIDUALS)


def _core_bwd(scale, l2norm, blocks, interpret, res, cts):
    q, k, v, g, beta, starts, h0, tinv, w, kd, e, states, v_new = res
    do, d_final = cts
    do = do.astype(v.dtype)
    serial, flags = dict(block_v=blocks[0], interpret=interpret), dict(block_v=blocks[1], interpret=interpret)
    eq, dvl = bwd.prepare_backward(q, k, g, starts, do, scale=scale, l2norm=l2norm, fast_dtype=w.dtype, **flags)
    dstates, dv_new, dh0 = bwd.state_grads(w, kd, e, eq, dvl, do, d_final, **serial)
    dq, dk, dv, dg, dbeta = bwd.input_grads(q, k, v, g, beta, starts, tinv, v_new, dv_new, states, do, dstates,
                                            scale=scale, l2norm=l2norm, **flags)
    return dq, dk, dv, dg, dbeta, None, dh0.astype(h0.dtype)


_core.defvjp(_core_fwd, _core_bwd)


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, starts, *, l2norm, interpret=False, block_v=None):
    """q, k [B,T,H,dk] raw (normalised inside when `l2norm`); v [B,T,H,dv]; g, beta [B,T,H]; any float
    dtypes; initial_state [B,H,dk,dv] float32; starts [B,T] bool (`jetnemo_jax.ops.documents.document_starts`).
    Returns (o [B,T,H,dv] in v's dtype, final state float32); gradients come back in each input's dtype.
    `block_v`: dv columns per block, one width for every kernel or (serial passes, chunk-parallel kernels);
    default_block_v's when None."""
    B, _, H, dk = q.shape
    check_supported(dk, v.shape[-1], (q.dtype, k.dtype, v.dtype), interpret)
    block_v = block_v or default_block_v(B * H, dk, v.shape[-1], dot_dtype(q, k, v))
    blocks = tuple(block_v) if isinstance(block_v, (tuple, list)) else (block_v, block_v)
    return _core(q, k, v, g, beta, starts.astype(jnp.float32), initial_state, scale, l2norm, blocks, interpret)
