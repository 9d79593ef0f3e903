"""@triton.jit adapters that let jax-triton launch fla-core's own kernels of the chunked gated delta rule.

`jax_triton.triton_call` binds a kernel's parameters in one order: the array and scalar inputs as passed, then
the outputs, then the constexprs by name. fla's kernels interleave outputs with inputs and take None for the
features they skip, so each is reached through an adapter here with that order, whose body calls fla's
`JITFunction` (imported from the installed fla-core, never copied) as a device function that Triton inlines.
The heuristics fla derives from None arguments are fixed in the adapters; its autotuning configs are read from
fla's own autotuners (`configs`). Importing this module imports fla-core and torch (the `[fla]` extra).
"""

from __future__ import annotations

import triton
import triton.language as tl
from fla.ops.common import chunk_delta_h, chunk_o
from fla.ops.gated_delta_rule import chunk_fwd, wy_fast
from fla.ops.utils import cumsum


def _inner(kernel):
    """fla's kernel under its heuristics and autotuner decorators."""
    while not isinstance(kernel, triton.JITFunction):
        kernel = kernel.fn
    return kernel


def _configs(kernel):
    """The autotuning configs fla gives `kernel` (on this machine's GPU)."""
    while not isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    return list(kernel.configs)


_CUMSUM = _inner(cumsum.chunk_local_cumsum_scalar_kernel)
_KKT_SOLVE = _inner(chunk_fwd.chunk_gated_delta_rule_fwd_kkt_solve_kernel)
_W_U = _inner(wy_fast.recompute_w_u_fwd_kernel)
_FWD_H = _inner(chunk_delta_h.chunk_gated_delta_rule_fwd_kernel_h_blockdim64)
_FWD_O = _inner(chunk_o.chunk_fwd_kernel_o)
_BWD_DV_LOCAL = _inner(chunk_o.chunk_bwd_kernel_dv_local)
_BWD_DHU = _inner(chunk_delta_h.chunk_gated_delta_rule_bwd_kernel_dhu_blockdim64)
_BWD_DQKWG = _inner(chunk_o.chunk_bwd_kernel_dqkwg)
_WY_BWD = _inner(wy_fast.prepare_wy_repr_bwd_kernel)


@triton.jit
def cumsum_kernel(s, cu_seqlens, chunk_indices, scale, T, o, B: tl.constexpr, H: tl.constexpr, BT: tl.constexpr,
                  REVERSE: tl.constexpr, HAS_SCALE: tl.constexpr, IS_VARLEN: tl.constexpr):
    _CUMSUM(s, o, scale, cu_seqlens, chunk_indices, T, B, H, BT, REVERSE, HAS_SCALE, IS_VARLEN, False)


@triton.jit
def kkt_solve_kernel(k, g, beta, cu_seqlens, chunk_indices, T, A, H: tl.constexpr, K: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, IS_VARLEN: tl.constexpr):
    _KKT_SOLVE(k, g, beta, A, cu_seqlens, chunk_indices, T, H, H, K, BT, BC, BK, True, IS_VARLEN)


@triton.jit
def w_u_kernel(k, v, beta, A, g, cu_seqlens, chunk_indices, T, w, u, H: tl.constexpr, K: tl.constexpr,
               V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    _W_U(k, v, beta, w, u, A, g, cu_seqlens, chunk_indices, T, H, H, K, V, BT, BK, BV, True, IS_VARLEN)


@triton.jit
def fwd_h_kernel(k, u, w, g, h0, cu_seqlens, chunk_offsets, T, v_new, h, ht, H: tl.constexpr, K: tl.constexpr,
                 V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                 IS_VARLEN: tl.constexpr):
    _FWD_H(k, u, w, v_new, g, None, h, h0, ht, cu_seqlens, chunk_offsets, T, H, H, K, V, BT, BV,
           True, False, True, STORE_FINAL_STATE, True, False, IS_VARLEN)


@triton.jit
def fwd_o_kernel(q, k, v_new, h, g, cu_seqlens, chunk_indices, scale, T, o, H: tl.constexpr, K: tl.constexpr,
                 V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    _FWD_O(q, k, v_new, h, g, None, o, cu_seqlens, chunk_indices, scale, T, H, H, K, V, BT, BK, BV,
           True, False, False, IS_VARLEN)


@triton.jit
def bwd_dv_local_kernel(q, k, g, do, cu_seqlens, chunk_indices, scale, T, dv, H: tl.constexpr, K: tl.constexpr,
                        V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        IS_VARLEN: tl.constexpr):
    _BWD_DV_LOCAL(q, k, g, None, None, do, dv, cu_seqlens, chunk_indices, scale, T, H, H, K, V, BT, BK, BV,
                  True, False, False, IS_VARLEN)


@triton.jit
def bwd_dhu_kernel(q, k, w, g, dht, do, dv, cu_seqlens, chunk_offsets, scale, T, dh, dh0, dv2, H: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    _BWD_DHU(q, k, w, g, None, dht, dh0, do, dh, dv, dv2, cu_seqlens, chunk_offsets, scale, T, H, H, K, V, BT, BV,
             True, False, True, True, False, IS_VARLEN)


@triton.jit
def bwd_dqkwg_kernel(q, k, v_new, g, h, do, dh, dv, cu_seqlens, chunk_indices, scale, T, dq, dk, dw, dg,
                     B: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    _BWD_DQKWG(q, k, v_new, g, None, h, do, dh, dq, dk, dw, dv, dg, cu_seqlens, chunk_indices, scale, B, T, H, H,
               K, V, BT, BK, BV, True, False, True, False, IS_VARLEN)


@triton.jit
def wy_bwd_kernel(k, v, beta, g, A, dw, du, cu_seqlens, chunk_indices, T, dk, dv, db, dg, H: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  IS_VARLEN: tl.constexpr):
    _WY_BWD(k, v, beta, g, A, dw, du, dk, dv, db, dg, cu_seqlens, chunk_indices, T, H, H, K, V, BT, BK, BV,
            True, IS_VARLEN)


# adapter name -> (adapter, fla's autotuning configs for the kernel it calls)
KERNELS = {
    "cumsum": (cumsum_kernel, _configs(cumsum.chunk_local_cumsum_scalar_kernel)),
    "kkt_solve": (kkt_solve_kernel, _configs(chunk_fwd.chunk_gated_delta_rule_fwd_kkt_solve_kernel)),
    "w_u": (w_u_kernel, _configs(wy_fast.recompute_w_u_fwd_kernel)),
    "fwd_h": (fwd_h_kernel, _configs(chunk_delta_h.chunk_gated_delta_rule_fwd_kernel_h_blockdim64)),
    "fwd_o": (fwd_o_kernel, _configs(chunk_o.chunk_fwd_kernel_o)),
    "bwd_dv_local": (bwd_dv_local_kernel, _configs(chunk_o.chunk_bwd_kernel_dv_local)),
    "bwd_dhu": (bwd_dhu_kernel, _configs(chunk_delta_h.chunk_gated_delta_rule_bwd_kernel_dhu_blockdim64)),
    "bwd_dqkwg": (bwd_dqkwg_kernel, _configs(chunk_o.chunk_bwd_kernel_dqkwg)),
    "wy_bwd": (wy_bwd_kernel, _configs(wy_fast.prepare_wy_repr_bwd_kernel)),
}
