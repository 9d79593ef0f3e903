"""fla-core's Triton kernels of the chunked gated delta rule (flash-linear-attention, the kernels the official
Jet-Nemotron code calls), launched from JAX through jax-triton: a second, independently written GPU backend and
an oracle for ours. NVIDIA GPUs only, with the `[fla]` extra (jax-triton, fla-core); there is no interpreter.

The kernels are imported from the installed fla-core at run time and reached through `fla_adapters` (jax-triton
binds parameters in another order than fla's). They are chained as `fla.ops.gated_delta_rule.chunk` chains them:
forward: chunk-local cumsum of g (log2 units), fused K K^T + triangular solve (A), W and U, the chunk states with
V_new and the final state, the output. Backward: W and U and the chunk states again (fla recomputes rather than
keeps them), dV through the intra-chunk term, the state gradients (reverse serial pass), dq, dk, dW and dg, the WY
backward, and the reverse cumsum of dg. The L2 norm of q and k is the op's, in JAX before the kernels (fla's
`use_qk_l2norm_in_kernel` runs its own l2norm kernels with the same arithmetic, x / sqrt(sum x^2 + 1e-6)).

Packed documents use fla's varlen mode: the rows are laid end to end ([1, B*T]) and every document is a sequence
of `cu_seqlens`. Its grids and per-sequence states need a static count, so a call holds at most
`max_documents_per_row(T)` documents per row on average (as fla's `prepare_chunk_indices_static`, the unused
slots are zero-length sequences); a call with more returns NaN, never another function. The price of the static
count: float32 states per sequence slot, [B*T/16, H, dk, dv] (0.6 GB at B=2, T=4096, H=12, 96 x 256), and chunk
states for five times the chunks. Rows that are one document each take fla's plain batched mode (a `lax.cond`
on the document ids), which has neither.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import KERNEL_RESIDUALS

CHUNK = 64  # fla's fused K K^T + solve kernel is its chunk-64 path
MAX_HEAD_DIM = 256
RCP_LN2 = 1.0 / math.log(2.0)  # fla keeps the gate cumsum in log2 units for exp2
EXTRA = "the `[fla]` extra (pip install -e '.[fla]': jax-triton and fla-core)"
# fla-org/flash-linear-attention#640: Triton 3.4.0 to 3.7.0 miscompiles fla's gated chunk_bwd_dqkwg on Hopper when
# its dk tile is 64 wide (dg and dk wrong by O(1)); fla itself refuses every gated backward there. The issue's
# bisection found tiles of 32 and 128 correct (dk <= 32 and dk > 64 here, e.g. the 2B's 96 and the 4B's 128, which
# the GPU tests check), so only 64 is refused.
MISCOMPILED_DK_TILE = 64


def max_documents_per_row(T: int) -> int:
    """The packed documents a call may hold per row on average: one per 16 tokens (at least 8)."""
    return min(T, max(8, -(-T // 16)))


def _versions():
    """None when fla-core, jax-triton and a GPU are here, else why not."""
    try:
        import fla  # noqa: F401
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or jax-triton's "requires JAX with GPU support"
        return f"fla's kernels need {EXTRA} on an NVIDIA GPU ({type(e).__name__}: {e})"
    return None


def _tiling():
    """fla's CONST_TILING for the dv-local and dq/dk/dW/dg kernels (its launchers' rule, from shared memory)."""
    from fla.utils import check_shared_mem
    if check_shared_mem("hopper") or check_shared_mem("ampere"):
        return 128  # fla takes 64 on Ampere for non-16-bit inputs; the dtype check below keeps that case out
    return 64 if check_shared_mem("ada") else 32


def _tile(n, limit):
    return min(max(1 << (n - 1).bit_length(), 16), limit)


def check_supported(dk, dv, dtypes):
    """Raises ValueError naming what fla's kernels (as launched here) do not support."""
    why = _versions()
    if why:
        raise ValueError(why)
    for name, size in (("dk", dk), ("dv", dv)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"fla's kernels support {name} up to {MAX_HEAD_DIM}, got {name}={size}")
    if len({jnp.dtype(d) for d in dtypes}) != 1 or jnp.dtype(dtypes[0]) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"fla's kernels take q, k, v in one 16-bit dtype (bf16 or fp16), got "
                         f"{tuple(str(jnp.dtype(d)) for d in dtypes)}")
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    if (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
            and _tile(dk, _tiling()) == MISCOMPILED_DK_TILE):
        import triton
        raise ValueError(f"fla's gated dq/dk/dg kernel is miscompiled by Triton {triton.__version__} on Hopper at "
                         f"dk={dk} (a dk tile of {MISCOMPILED_DK_TILE}; fla-org/flash-linear-attention#640): "
                         f"needs Triton >= 3.7.1")


# Launching one adapter.

def _launch(name, grid, out_shape, *args, autotune, zeroed=(), **consts):
    """jax_triton.triton_call of adapter `name`: tuned over fla's own configs when `autotune` (as fla does, on
    the first run of the compiled program), else with fla's first config."""
    import jax_triton
    import triton

    from pallas_kernels.gated_delta_rule import fla_adapters
    kernel, configs = fla_adapters.KERNELS[name]
    configs = [c for c in configs if all(c.kwargs.get(k, v) == v for k, v in consts.items())]
    if autotune and len(configs) > 1:  # a fresh autotuner per call: jax-triton rewires its pruning hook
        scalars = [kernel.arg_names[i] for i, a in enumerate(args) if isinstance(a, (int, float, np.floating))]
        kernel = triton.runtime.Autotuner(kernel, kernel.arg_names, configs, key=scalars, reset_to_zero=None,
                                          restore_value=None)
        opts = {}
    else:
        opts = dict(num_warps=configs[0].num_warps, num_stages=configs[0].num_stages, **configs[0].kwargs)
    return jax_triton.triton_call(*args, kernel=kernel, out_shape=out_shape, grid=grid, zeroed_outputs=zeroed,
                                  **opts, **consts)


def _like(x, dtype=None, shape=None):
    return jax.ShapeDtypeStruct(x.shape if shape is None else shape, x.dtype if dtype is None else dtype)


# The layout: fla's plain batched mode, or its varlen mode over the rows laid end to end.

class _Layout:
    """What the kernels index by: the batch and length they see, the sequences, the chunks and fla's index
    arrays (dummies in the plain mode)."""

    def __init__(self, doc_ids, varlen):
        B, T = doc_ids.shape
        doc_ids = doc_ids - doc_ids[:, :1]  # a shard of a sequence (context parallelism) starts mid-numbering
        self.varlen = varlen
        if not varlen:
            self.B, self.T, self.N, self.NT = B, T, B, -(-T // CHUNK)
            self.cu = self.chunk_indices = self.chunk_offsets = jnp.zeros((2,), jnp.int32)
            return
        cap = B * max_documents_per_row(T)  # sequence slots; slot `cap` is always empty (the padding's target)
        self.B, self.T, self.N, self.NT = 1, B * T, cap + 1, -(-(B * T) // CHUNK) + cap
        ndocs = doc_ids[:, -1] + 1
        self.first = jnp.cumsum(ndocs) - ndocs  # each row's first document, a sequence index
        self.last = self.first + ndocs - 1
        self.overflow = jnp.sum(ndocs) > cap
        seq = (doc_ids + self.first[:, None]).reshape(-1)
        lens = jnp.zeros((self.N,), jnp.int32).at[jnp.where(seq < cap, seq, self.N)].add(1, mode="drop")
        zero = jnp.zeros((1,), jnp.int32)
        self.cu = jnp.concatenate([zero, jnp.cumsum(lens)])
        self.chunk_offsets = jnp.concatenate([zero, jnp.cumsum(-(-lens // CHUNK))])
        slot = jnp.arange(self.NT, dtype=jnp.int32)
        used = slot < self.chunk_offsets[-1]
        i_n = jnp.searchsorted(self.chunk_offsets, slot, side="right").astype(jnp.int32) - 1
        i_n = jnp.where(used, i_n, cap)
        i_t = jnp.where(used, slot - self.chunk_offsets[i_n], 0)
        self.chunk_indices = jnp.stack([i_n, i_t], 1).reshape(-1)

    def tokens(self, x):
        return x.reshape(self.B, self.T, *x.shape[2:])

    def states_in(self, state):
        """[B, H, dk, dv] per row -> per sequence (a row's state enters its first document)."""
        if not self.varlen:
            return state
        return jnp.zeros((self.N, *state.shape[1:]), state.dtype).at[self.first].set(state, mode="drop")

    def states_out(self, states):
        """Per sequence -> [B, H, dk, dv] per row (a row's last document leaves its state)."""
        return states if not self.varlen else states[jnp.minimum(self.last, self.N - 1)]

    def states_in_transpose(self, d_states):
        return d_states if not self.varlen else d_states[jnp.minimum(self.first, self.N - 1)]

    def states_out_transpose(self, d_state):
        if not self.varlen:
            return d_state
        return jnp.zeros((self.N, *d_state.shape[1:]), d_state.dtype).at[self.last].set(d_state, mode="drop")

    def poison(self, *xs):
        if not self.varlen:
            return xs
        return tuple(jnp.where(self.overflow, jnp.nan, x).astype(x.dtype) for x in xs)


# The chains of fla.ops.gated_delta_rule.chunk, on one layout.

def _common(lay):
    return (lay.cu, lay.chunk_indices), dict(IS_VARLEN=lay.varlen)


def _cumsum(lay, g, *, reverse, autotune):
    H = g.shape[-1]
    idx, flags = _common(lay)
    (o,) = _launch("cumsum", (lay.NT * lay.B * H,), [_like(g, jnp.float32)], g, *idx,
                   np.float32(RCP_LN2), lay.T, autotune=autotune, B=lay.B, H=H, BT=CHUNK, REVERSE=reverse,
                   HAS_SCALE=not reverse, **flags)
    return o


def _w_u(lay, k, v, beta, A, gc, autotune):
    _, _, H, K = k.shape
    idx, flags = _common(lay)
    return _launch("w_u", (lay.NT, lay.B * H), [_like(k), _like(v)], k, v, beta, A, gc, *idx, lay.T,
                   autotune=autotune, H=H, K=K, V=v.shape[-1], BT=CHUNK, BK=64, BV=64, **flags)


def _states(lay, k, u, w, gc, h0, store_final, autotune):
    _, _, H, K = k.shape
    V = u.shape[-1]
    h_shape = (lay.B, lay.NT, H, K, V)
    return _launch("fwd_h", lambda m: (-(-V // m["BV"]) * lay.N * H,),
                   [_like(u), _like(k, shape=h_shape), _like(h0)], k, u, w, gc, h0, lay.cu, lay.chunk_offsets,
                   lay.T, autotune=autotune, H=H, K=K, V=V, BT=CHUNK, STORE_FINAL_STATE=store_final,
                   IS_VARLEN=lay.varlen)


def _forward(lay, q, k, v, gc, beta, h0, scale, autotune):
    _, _, H, K = k.shape
    V = v.shape[-1]
    idx, flags = _common(lay)
    (A,) = _launch("kkt_solve", (lay.NT, lay.B * H), [_like(k, shape=(*k.shape[:3], CHUNK))], k, gc, beta, *idx,
                   lay.T, autotune=autotune, zeroed=(0,), H=H, K=K, BT=CHUNK, BC=16, **flags)
    w, u = _w_u(lay, k, v, beta, A, gc, autotune)
    v_new, h, ht = _states(lay, k, u, w, gc, h0, True, autotune)
    (o,) = _launch("fwd_o", lambda m: (-(-V // m["BV"]) * lay.NT, lay.B * H), [_like(v)], q, k, v_new, h, gc,
                   *idx, np.float32(scale), lay.T, autotune=autotune, H=H, K=K, V=V, BT=CHUNK, **flags)
    return o, ht, A


def _backward(lay, q, k, v, gc, beta, A, h0, do, dht, scale, autotune):
    _, _, H, K = k.shape
    V = v.shape[-1]
    idx, flags = _common(lay)
    scale = np.float32(scale)
    w, u = _w_u(lay, k, v, beta, A, gc, autotune)
    v_new, h, _ = _states(lay, k, u, w, gc, h0, False, autotune)
    tiles = dict(BK=_tile(K, _tiling()), BV=_tile(V, _tiling()))
    (dv,) = _launch("bwd_dv_local", (lay.NT, lay.B * H), [_like(do)], q, k, gc, do, *idx, scale, lay.T,
                    autotune=autotune, H=H, K=K, V=V, BT=CHUNK, **tiles, **flags)
    dh, dh0, dv = _launch("bwd_dhu", lambda m: (-(-V // m["BV"]) * lay.N * H,),
                          [_like(h), _like(h0), _like(dv)], q, k, w, gc, dht, do, dv, lay.cu, lay.chunk_offsets,
                          scale, lay.T, autotune=autotune, H=H, K=K, V=V, BT=CHUNK, IS_VARLEN=lay.varlen)
    nk = -(-K // tiles["BK"])
    dq, dk, dw, dg = _launch("bwd_dqkwg", (nk * lay.NT, lay.B * H),
                             [_like(q), _like(k), _like(w), _like(gc, shape=(nk, *gc.shape))],
                             q, k, v_new, gc, h, do, dh, dv, *idx, scale, lay.T, autotune=autotune, B=lay.B, H=H,
                             K=K, V=V, BT=CHUNK, **tiles, **flags)
    from fla.utils import check_shared_mem
    wy_tile = 64 if check_shared_mem() else 32  # prepare_wy_repr_bwd's own rule
    dk2, dv, db, dg2 = _launch("wy_bwd", (lay.NT, lay.B * H), [_like(k), _like(v), _like(beta), _like(gc)],
                               k, v, beta, gc, A, dw, dv, *idx, lay.T, autotune=autotune, H=H, K=K, V=V, BT=CHUNK,
                               BK=_tile(K, wy_tile), BV=_tile(V, wy_tile), **flags)
    dg = _cumsum(lay, jnp.sum(dg, 0) + dg2, reverse=True, autotune=autotune)
    return dq, dk + dk2, dv, dg, db, dh0


# The custom VJP: one layout or the other by a lax.cond on the document ids; residuals in [B, T] shapes.

def _one_document_per_row(doc_ids):
    return jnp.all(doc_ids[:, -1] == doc_ids[:, 0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _core(q, k, v, g, beta, h0, doc_ids, scale, autotune):
    return _core_fwd(q, k, v, g, beta, h0, doc_ids, scale, autotune)[0]


def _core_fwd(q, k, v, g, beta, h0, doc_ids, scale, autotune):
    shape = q.shape

    def run(varlen):
        def f(q, k, v, g, beta, h0):
            lay = _Layout(doc_ids, varlen)
            gc = _cumsum(lay, lay.tokens(g), reverse=False, autotune=autotune)
            o, ht, A = _forward(lay, *map(lay.tokens, (q, k, v)), gc, lay.tokens(beta), lay.states_in(h0),
                                scale, autotune)
            o, final = lay.poison(o, lay.states_out(ht))
            return o.reshape(*shape[:3], -1), final, gc.reshape(g.shape), A.reshape(*shape[:3], CHUNK)
        return f

    o, final, gc, A = jax.lax.cond(_one_document_per_row(doc_ids), run(False), run(True), q, k, v, g, beta, h0)
    # Named, so that a remat policy can keep them (model.REMAT_POLICIES["kernels"]) instead of rerunning the kernels.
    res = (q, k, v, gc, beta, A, h0, doc_ids)
    return checkpoint_name(((o, final), res), KERNEL_RESIDUALS)


def _core_bwd(scale, autotune, res, cts):
    q, k, v, gc, beta, A, h0, doc_ids = res
    do, d_final = cts

    def run(varlen):
        def f(q, k, v, gc, beta, A, h0, do, d_final):
            lay = _Layout(doc_ids, varlen)
            t = lay.tokens
            dq, dk, dv, dg, db, dh0 = _backward(lay, t(q), t(k), t(v), t(gc), t(beta), t(A), lay.states_in(h0),
                                                t(do.astype(v.dtype)), lay.states_out_transpose(d_final), scale,
                                                autotune)
            dh0 = lay.states_in_transpose(dh0)
            grads = tuple(x.reshape(y.shape) for x, y in zip((dq, dk, dv, dg, db), (q, k, v, gc, beta)))
            return lay.poison(*grads, dh0)
        return f

    dq, dk, dv, dg, db, dh0 = jax.lax.cond(_one_document_per_row(doc_ids), run(False), run(True),
                                           q, k, v, gc, beta, A, h0, do, d_final.astype(jnp.float32))
    return dq, dk, dv, dg, db, dh0, None


_core.defvjp(_core_fwd, _core_bwd)


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, doc_ids, *, autotune=True):
    """q, k [B,T,H,dk] (L2-normalised by the op when it asks); v [B,T,H,dv]; q, k, v in one 16-bit dtype; g, beta
    [B,T,H]; initial_state [B,H,dk,dv] float32 (it continues each row's first document); doc_ids [B,T] monotone
    (`jetnemo_jax.ops.documents`). Returns (o [B,T,H,dv] in v's dtype, final state float32); gradients come back
    in each input's dtype. `autotune`: fla's configs timed on the first run of the program (as fla does), else
    fla's first config of each kernel (faster compiles)."""
    check_supported(q.shape[-1], v.shape[-1], (q.dtype, k.dtype, v.dtype))
    o, final = _core(q, k, v, g.astype(jnp.float32), beta, initial_state.astype(jnp.float32),
                     doc_ids.astype(jnp.int32), float(scale), bool(autotune))
    return o, final
