"""JetBlock's dynamic causal convolution: `dynamic_conv` (per-token kernels given) and its decode step, and
`generated_dynamic_conv` (the kernels generated from the generator's hidden activation, which the fused
kernels never write out), with the reference and the tables of backends.

`GENERATED_BACKENDS`, fastest first (`backends.select` picks for impl="auto"; measured speeds: BENCHMARKS.md):
  triton      Pallas GPU kernels through Triton, `pallas_kernels/dynamic_conv/triton.py`
  mosaic_gpu  Mosaic GPU kernels, `pallas_kernels/dynamic_conv/mosaic_gpu.py` (16-bit inputs on an sm_90 GPU;
              never `auto`: faster alone, but slower in the 2B train step, and every process compiles them
              again, ~2.5 minutes for that step, which JAX's persistent cache cannot hold; BENCHMARKS.md)
  tpu         Mosaic TPU kernels, `pallas_kernels/dynamic_conv/tpu.py`
  xla         the kernels as one XLA matmul, then `reference`
  reference   the same (the pure-XLA path is the definition)
The kernel rows run per shard of the mesh (`ops.mesh`): rows over the batch axes, channels (whole heads: Dv is
head-major) over the head axes. Beyond its inputs, the Triton forward keeps its taps for the backward
(`triton.STORE_TAPS`: [B*T, W*Dv] in the matmul dtype; faster than regenerating them), the others nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jetnemo_jax.ops import backends, context, documents
from jetnemo_jax.ops import mesh as kernel_mesh
from jetnemo_jax.ops.backends import Backend
from pallas_kernels.dynamic_conv import layout, mosaic_gpu, tpu, triton

_HIGHEST = jax.lax.Precision.HIGHEST


# Jitted whole, as ops.delta_rule's XLA paths: one compile when called eagerly.
@jax.jit
def reference(x, kernels, cache, doc_ids):
    """Depthwise causal conv with per-token kernels, then SiLU.

    x [B,T,D]; kernels [B,T,D,W] (tap W-1 is the current token); cache [B,W-1,D], the inputs just before
    x (zeros at a sequence start), which belong to x's first document; doc_ids [B,T].
    Returns (silu(conv) [B,T,D] fp32, new cache [B,W-1,D]: the last W-1 inputs of x's last document).
    """
    B, T, D, W = kernels.shape
    xp = jnp.concatenate([cache.astype(jnp.float32), x.astype(jnp.float32)], axis=1)  # [B, T+W-1, D]
    docs = jnp.concatenate([jnp.broadcast_to(doc_ids[:, :1], (B, W - 1)), doc_ids], axis=1)
    kernels = kernels.astype(jnp.float32)
    acc = jnp.zeros((B, T, D), jnp.float32)
    for w in range(W):  # tap w reads x_{t-W+1+w}
        same_doc = (docs[:, w:w + T] == doc_ids)[..., None]
        acc = acc + jnp.where(same_doc, kernels[..., w] * xp[:, w:w + T], 0.0)
    last_doc = (docs[:, -(W - 1):] == doc_ids[:, -1:])[..., None] if W > 1 else None
    new_cache = jnp.where(last_doc, xp[:, -(W - 1):], 0.0) if W > 1 else cache
    return jax.nn.silu(acc), new_cache


def reference_step(x, kernel, cache):
    """One token: x [B,D], kernel [B,D,W], cache [B,W-1,D] -> (silu(conv) [B,D] fp32, new cache)."""
    window = jnp.concatenate([cache.astype(jnp.float32), x.astype(jnp.float32)[:, None]], axis=1)  # [B,W,D]
    y = jnp.einsum("bwd,bdw->bd", window, kernel.astype(jnp.float32), precision=_HIGHEST)
    return jax.nn.silu(y), window[:, 1:]


def final_cache(u, cache, doc_ids, width):
    """The last W-1 inputs of each row's last document (zeros where that document is shorter)."""
    B, _, D = u.shape
    prev = jnp.zeros((B, width - 1, D), u.dtype) if cache is None else cache.astype(u.dtype)
    tail = jnp.concatenate([prev, u], axis=1)[:, -(width - 1):]
    docs = jnp.concatenate([jnp.broadcast_to(doc_ids[:, :1], (B, width - 1)), doc_ids], axis=1)
    same = (docs[:, -(width - 1):] == doc_ids[:, -1:])[..., None]
    return jnp.where(same, tail, 0)


def _run_reference(x, kernels, cache, doc_ids, output_final_cache):
    B, _, D, W = kernels.shape
    cache = jnp.zeros((B, W - 1, D), x.dtype) if cache is None else cache
    y, new_cache = reference(x, kernels, cache, doc_ids)
    return y.astype(x.dtype), (new_cache.astype(x.dtype) if output_final_cache else None)


def generated_conv(kernels, u, h, w2, b2, doc_ids, cache, *, interpret=False, mesh=None):
    """The fused kernels of the backend module `kernels` (`pallas_kernels.dynamic_conv.tpu`, `.triton` or
    `.mosaic_gpu`): silu(causal conv of u with kernels h @ w2 + b2), on [B,T,...] inputs.

    u [B,T,Dv]; h [B,T,G] (the matmul dtype); w2 [G, Dv*W] channel-major; b2 [Dv*W]; doc_ids [B,T] monotone;
    cache [B,W-1,Dv] or None (prepended to its row as the first document's earlier tokens; their outputs are
    dropped). Returns y [B,T,Dv] in u's dtype. On `mesh`, runs per shard: rows over the batch axes, channels
    over the head axes, h and doc ids replicated over the head axes, w2 and b2 over the batch axes
    (shard_map sums their gradients)."""
    def local(u, h, w2, b2, doc_ids, cache=None):
        B, T, D = u.shape
        width = w2.shape[1] // D
        if cache is not None:
            u = jnp.concatenate([cache.astype(u.dtype), u], axis=1)
            h = jnp.concatenate([jnp.zeros((B, width - 1, h.shape[-1]), h.dtype), h], axis=1)
            doc_ids = jnp.concatenate([jnp.broadcast_to(doc_ids[:, :1], (B, width - 1)), doc_ids], axis=1)
        pos = documents.positions_in_documents(doc_ids)
        return layout.generated_conv(kernels, u, h, w2, b2, pos, interpret=interpret)[:, u.shape[1] - T:]

    args = [u, h, w2, b2, doc_ids] + ([] if cache is None else [cache])
    if mesh is None:
        return local(*args)
    b, t = kernel_mesh.kernel_axes(mesh)
    specs = [P(b, None, t), P(b, None, None), P(None, t), P(t), P(b, None)] + ([] if cache is None else
                                                                               [P(b, None, t)])
    return kernel_mesh.shard_map(local, mesh, tuple(specs), P(b, None, t))(*args)


# The tables of backends. A `generated_dynamic_conv` row runs (u, h, w2, b2, doc_ids, cache) and returns
# (y in u's dtype, the final cache in u's dtype or None).

class Call(NamedTuple):
    """What a row's `supports` looks at."""
    dtype: object  # of h: the matmul operands
    device: object  # the first device the kernels run on


def _run_xla(u, h, w2, b2, doc_ids, cache, *, output_final_cache, interpret, mesh):
    B, T, D = u.shape
    kernels = (jnp.dot(h, w2, preferred_element_type=jnp.float32) + b2).astype(h.dtype)
    return _run_reference(u, kernels.reshape(B, T, D, w2.shape[1] // D), cache, doc_ids, output_final_cache)


def _fused(kernels):
    def run(u, h, w2, b2, doc_ids, cache, *, output_final_cache, interpret, mesh):
        y = generated_conv(kernels, u, h, w2, b2, doc_ids, cache, interpret=interpret, mesh=mesh)
        width = w2.shape[1] // u.shape[-1]
        return y, (final_cache(u, cache, doc_ids, width) if output_final_cache else None)
    return run


def _mosaic_gpu_supports(call, interpret):
    if jnp.dtype(call.dtype).itemsize != 2:
        return f"the Mosaic GPU kernels take 16-bit inputs, got {jnp.dtype(call.dtype).name}"
    if not interpret and not mosaic_gpu.supported(call.device, call.dtype):
        return f"the Mosaic GPU kernels run on sm_90 GPUs, not on {call.device}"
    return None


# The conv kernels run unsharded without a mesh, also on several devices (as they always have).
GENERATED_BACKENDS = (
    Backend("triton", "gpu", backends.anywhere, _fused(triton), "Pallas-Triton GPU kernels",
            auto_needs_layout=False),
    Backend("mosaic_gpu", "gpu", _mosaic_gpu_supports, _fused(mosaic_gpu), "Mosaic GPU kernels",
            auto_needs_layout=False),
    Backend("tpu", "tpu", backends.anywhere, _fused(tpu), "Mosaic TPU kernels", auto_needs_layout=False),
    Backend("xla", None, backends.anywhere, _run_xla, "XLA matmul and conv"),
    Backend("reference", None, backends.anywhere, _run_xla, "XLA matmul and conv"),
)
BACKENDS = (  # of `dynamic_conv`, whose kernels come materialised: a row runs (x, kernels, cache, doc_ids, ...)
    Backend("xla", None, backends.anywhere, _run_reference, "XLA conv"),
    Backend("reference", None, backends.anywhere, _run_reference, "XLA conv"),
)


def dynamic_conv(x, kernels, *, segment_ids=None, cache=None, output_final_cache=False, impl="auto"):
    """silu(causal depthwise conv of x with per-token kernels).

    x [B,T,D]; kernels [B,T,D,W] (tap W-1 multiplies the current token); cache [B,W-1,D]: the W-1
    inputs before x (they continue x's first document); segment_ids [B,T]: taps never cross documents.
    Returns (y [B,T,D] in x's dtype, final cache [B,W-1,D] in x's dtype or None). impl: a row of `BACKENDS`.
    """
    if x.ndim != 3 or kernels.ndim != 4 or kernels.shape[:3] != x.shape:
        raise ValueError(f"x {x.shape} and kernels {kernels.shape} must be [B,T,D] and [B,T,D,W]")
    B, T, D = x.shape
    W = kernels.shape[-1]
    if cache is not None and cache.shape != (B, W - 1, D):
        raise ValueError(f"cache has shape {cache.shape}, expected {(B, W - 1, D)}")
    row, _ = backends.select("dynamic_conv", BACKENDS, impl, None, None)
    return row.fn(x, kernels, cache, documents.doc_ids_from_segments(segment_ids, (B, T)), output_final_cache)


def dynamic_conv_step(x, kernel, cache):
    """One decode token: x [B,D], kernel [B,D,W], cache [B,W-1,D] -> (y [B,D], new cache)."""
    B, D = x.shape
    if kernel.shape[:2] != (B, D) or cache.shape != (B, kernel.shape[-1] - 1, D):
        raise ValueError(f"kernel {kernel.shape} / cache {cache.shape} do not match x {x.shape}")
    y, new_cache = reference_step(x, kernel, cache)
    return y.astype(x.dtype), new_cache.astype(cache.dtype)


def generated_dynamic_conv(u, h, w2, b2, *, segment_ids=None, cache=None, output_final_cache=False, impl="auto",
                           mesh=None):
    """dynamic_conv with the kernels generated from the generator's hidden activation: kernels = h @ w2 + b2.

    u [B,T,Dv]; h [B,T,G] = silu(x W1) in the matmul dtype; w2 [G, Dv*W] (channel-major: column d*W + w)
    and b2 [Dv*W], both in h's dtype. impl: a row of `GENERATED_BACKENDS` or "auto", the first row that this
    platform runs for these inputs ("mosaic_gpu" or "triton" on GPU, "tpu" on TPU, else "xla"). The kernel
    rows fuse the generation into the conv kernels (no float32 [B,T,Dv,W] kernels in HBM); they run per
    shard of `mesh` (else of the training step's mesh, else of the `jax.set_mesh` mesh: `ops.mesh.resolve`).
    Returns dynamic_conv's pair.
    """
    B, T, D = u.shape
    if (h.ndim != 3 or h.shape[:2] != (B, T) or w2.shape[0] != h.shape[-1] or w2.shape[1] % D
            or b2.shape != w2.shape[1:]):
        raise ValueError(f"u {u.shape}, h {h.shape}, w2 {w2.shape}, b2 {b2.shape}: expected [B,T,D], [B,T,G], "
                         "[G, D*W], [D*W]")
    W = w2.shape[1] // D
    if cache is not None and cache.shape != (B, W - 1, D):
        raise ValueError(f"cache has shape {cache.shape}, expected {(B, W - 1, D)}")
    mesh = kernel_mesh.resolve(mesh)
    row, interpret = backends.select("generated_dynamic_conv", GENERATED_BACKENDS, impl,
                                     Call(h.dtype, kernel_mesh.device(mesh)), mesh)
    doc_ids = documents.doc_ids_from_segments(segment_ids, (B, T))
    ctx = context.axes(mesh)
    if ctx:  # each shard of the sequence runs the row on its own tokens, with the previous W-1 as its cache
        run = lambda u, h, w2, b2, doc_ids, cache, final: row.fn(  # noqa: E731
            u, h, w2, b2, doc_ids, cache, output_final_cache=final, interpret=interpret, mesh=None)
        return context.generated_conv(run, mesh, ctx, W, u, h, w2, b2, doc_ids, cache, output_final_cache)
    return row.fn(u, h, w2, b2, doc_ids, cache, output_final_cache=output_final_cache, interpret=interpret,
                  mesh=mesh)
