"""impl="pallas" of the generated causal convolution: `pallas_kernels.dynamic_conv` behind a `jax.custom_vjp`.

The op takes the generator's hidden activation h = silu(x W1) [B, T, G] and its second projection
(w2 [G, Dv * W] channel-major, b2) instead of the kernels: the forward kernel generates each tile's taps in
fast memory, so the [B, T, Dv, W] kernel tensor is neither written in the forward nor kept for the
backward (the activation memory the fusion saves). Backward on GPU: three kernels regenerate the taps and
the pre-activation and form du, dh, dw2 and db2 without ever writing the taps or their gradient (see
`pallas_kernels.dynamic_conv.gpu`); the forward keeps nothing beyond the op's inputs. On sm_90 GPUs with
16-bit inputs all four kernels are Mosaic GPU ones (`pallas_kernels.dynamic_conv.hopper`: warp-specialised
TMA/wgmma pipelines), elsewhere Triton. On TPU: one
XLA matmul regenerates the taps, the conv backward kernel writes du and the tap gradient, and XLA's
matmuls form dh = dk w2^T and dw2 = h^T dk.

This module owns the layout (see pallas_kernels/dynamic_conv/common.py): batch rows flattened into one row
axis, a cache (prefill continuation) prepended to its row as the first document's earlier tokens, rows
padded to the tile (u also by the backend's U_PAD zero rows each side), channels and G zero-padded (exact:
zero taps and zero inputs add nothing), and pos, each token's position in its document (PAD rows each side).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jetnemo_jax.ops import shard
from jetnemo_jax.ops.positions import positions_in_documents
from pallas_kernels.dynamic_conv import gpu, hopper, tpu

BACKENDS = {"gpu": gpu, "hopper": hopper, "tpu": tpu}


def kernel_module(backend):
    """The kernels that run on `backend`; CPU interprets the GPU (Triton) ones, and "hopper" names the Mosaic
    GPU ones, interpreted on CPU in tests."""
    return gpu if backend == "cpu" else BACKENDS[backend]


def kernel_backend(backend, dtype, mesh=None):
    """"hopper" where the Mosaic GPU kernels run (16-bit operands on an sm_90 GPU; on an H100 at the 2B shape,
    in a fwd+bwd step: forward 0.63 ms, grad_u 0.96, grad_h 0.81, grad_w2 0.74, against Triton's 0.87, 1.48,
    0.96 and 1.06 alone; BENCHMARKS.md), else `backend`."""
    device = mesh.devices.flat[0] if isinstance(mesh, jax.sharding.Mesh) else jax.devices()[0]
    return "hopper" if backend == "gpu" and hopper.supported(device, dtype) else backend


def _roundup(n, m):
    return -(-n // m) * m


def final_cache(u, cache, doc_ids, width):
    """The last W-1 inputs of each row's last document (zeros where that document is shorter)."""
    B, _, D = u.shape
    prev = jnp.zeros((B, width - 1, D), u.dtype) if cache is None else cache.astype(u.dtype)
    tail = jnp.concatenate([prev, u], axis=1)[:, -(width - 1):]
    docs = jnp.concatenate([jnp.broadcast_to(doc_ids[:, :1], (B, width - 1)), doc_ids], axis=1)
    same = (docs[:, -(width - 1):] == doc_ids[:, -1:])[..., None]
    return jnp.where(same, tail, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _core(h, w2t, b2t, u, pos, backend, interpret):
    return kernel_module(backend).forward(h, w2t, b2t, u, pos, interpret=interpret)


def _core_fwd(h, w2t, b2t, u, pos, backend, interpret):
    y, residual = kernel_module(backend).forward_with_residual(h, w2t, b2t, u, pos, interpret=interpret)
    return y, (h, w2t, b2t, u, pos, residual)


def _core_bwd(backend, interpret, res, dy):
    kern = kernel_module(backend)
    dh, dw2t, db2t, du = kern.backward(*res, dy, interpret=interpret)
    return dh, dw2t.astype(res[1].dtype), db2t, jnp.pad(du, [(kern.U_PAD, kern.U_PAD), (0, 0)]), None


_core.defvjp(_core_fwd, _core_bwd)


def generated_conv(u, h, w2, b2, doc_ids, cache, *, backend, interpret=False, mesh=None):
    """silu(causal conv of u with kernels h @ w2 + b2), fused.

    u [B,T,Dv]; h [B,T,G] (the matmul dtype); w2 [G, Dv*W] channel-major; b2 [Dv*W]; doc_ids [B,T]
    monotone; cache [B,W-1,Dv] or None. Returns y [B,T,Dv] in u's dtype. On `mesh`, runs per shard: rows
    over the batch axes, channels (whole heads: Dv is head-major) over the tensor axis, h and doc ids
    replicated over the tensor axis, w2 and b2 over the batch axes (shard_map sums their gradients)."""
    backend = kernel_backend(backend, h.dtype, mesh)
    if mesh is None:
        return _local(u, h, w2, b2, doc_ids, cache, backend=backend, interpret=interpret)
    b, t = shard.mesh_axes(mesh)
    specs = [P(b, None, t), P(b, None, None), P(None, t), P(t), P(b, None)]
    args = [u, h, w2, b2, doc_ids]
    if cache is not None:
        specs.append(P(b, None, t))
        args.append(cache)

    def local(u, h, w2, b2, doc_ids, cache=None):
        return _local(u, h, w2, b2, doc_ids, cache, backend=backend, interpret=interpret)

    return shard.shard_map(local, mesh, tuple(specs), P(b, None, t))(*args)


def _local(u, h, w2, b2, doc_ids, cache, *, backend, interpret):
    kern = kernel_module(backend)
    B, T, D = u.shape
    G = h.shape[-1]
    width = w2.shape[1] // D
    if cache is not None:  # the cache rows are the first document's earlier tokens; their outputs are dropped
        u = jnp.concatenate([cache.astype(u.dtype), u], axis=1)
        h = jnp.concatenate([jnp.zeros((B, width - 1, G), h.dtype), h], axis=1)
        doc_ids = jnp.concatenate([jnp.broadcast_to(doc_ids[:, :1], (B, width - 1)), doc_ids], axis=1)
    Tc = u.shape[1]
    N, Np, Dp, Gp = B * Tc, _roundup(B * Tc, kern.ROWS), _roundup(D, kern.DIM), kern.padded_generator_dim(G)
    w2t = jnp.transpose(w2.reshape(G, D, width), (2, 0, 1)).astype(h.dtype)
    w2t = jnp.pad(w2t, [(0, 0), (0, Gp - G), (0, Dp - D)])
    b2t = jnp.pad(b2.reshape(D, width).T.astype(jnp.float32), [(0, 0), (0, Dp - D)])
    h = jnp.pad(h.reshape(N, G), [(0, Np - N), (0, Gp - G)])
    u = jnp.pad(u.reshape(N, D), [(kern.U_PAD, Np - N + kern.U_PAD), (0, Dp - D)])
    pos = jnp.pad(positions_in_documents(doc_ids).reshape(N), [(kern.PAD, Np - N + kern.PAD)])
    y = _core(h, w2t, b2t, u, pos, backend, interpret)
    return y[:N, :D].reshape(B, Tc, D)[:, Tc - T:]
