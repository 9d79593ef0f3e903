"""impl="pallas": the Mosaic TPU kernels of `pallas_kernels.gated_delta_rule` behind a `jax.custom_vjp`.

This module owns the layout: [B, T, H, d] -> [B*H, Tp, d'] with T padded to a multiple of 64 by tokens
with g = 0, beta = 0 and zero q, k, v (they leave the state untouched), and dk, dv zero-padded to 64 or a
multiple of 128 (zero key columns change no dot product and zero value columns stay zero in the state and
the output, so the padding is exact; the scale comes from the true dk). q and k arrive L2-normalised in
float32 from the ops layer, where the norm fuses with this transpose; v keeps its dtype (the kernels read
it as is and compute in float32).

The backward recomputes the chunk-entry states with a forward state pass (`chunk_states`) rather than
saving them in the forward: the same HBM traffic at backward time, and no activation memory in between.

Mosaic kernels cannot be partitioned by XLA: on a mesh the op runs inside `jax.shard_map`, batch over the
data axes and heads over the tensor axis (`shard_over_mesh`); the recurrence is local to a (batch, head).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jetnemo_jax.ops import shard
from pallas_kernels.gated_delta_rule import tpu as kernels

MAX_HEAD_DIM = 256  # the VMEM budget of the kernels is worked out up to dk = dv = 256


def _padded(d):
    return 64 if d <= 64 else -(-d // 128) * 128


def check_supported(dk, dv):
    for name, size in (("dk", dk), ("dv", dv)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"impl='pallas' supports {name} up to {MAX_HEAD_DIM}, got {name}={size}")


def platform(mesh) -> str:
    """Where the kernels will run: `mesh`'s devices when given (a TPU topology compiles ahead of time from
    a CPU host), else the default backend."""
    return mesh.devices.flat[0].platform if isinstance(mesh, jax.sharding.Mesh) else jax.default_backend()


def layout_known(mesh) -> bool:
    """Whether kernels can run: one device, or a mesh to shard_map over (XLA would otherwise fail to
    partition the kernels of a sharded jit)."""
    return mesh is not None or _context_mesh() is not None or jax.device_count() == 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _core(q, k, v, g, beta, starts, h0, scale, interpret):
    return kernels.forward(q, k, v, g, beta, starts, h0, scale=scale, interpret=interpret)


def _core_fwd(q, k, v, g, beta, starts, h0, scale, interpret):
    return _core(q, k, v, g, beta, starts, h0, scale, interpret), (q, k, v, g, beta, starts, h0)


def _core_bwd(scale, interpret, res, cts):
    q, k, v, g, beta, starts, h0 = res
    do, d_final = cts
    states = kernels.chunk_states(q, k, v, g, beta, starts, h0, interpret=interpret)
    dq, dk, dv, dg, dbeta, dh0 = kernels.backward(q, k, v, g, beta, starts, states, do, d_final,
                                                  scale=scale, interpret=interpret)
    return dq, dk, dv.astype(v.dtype), dg, dbeta, None, dh0


_core.defvjp(_core_fwd, _core_bwd)


def _local(q, k, v, g, beta, initial_state, doc_ids, *, scale, interpret):
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    check_supported(dk, dv)
    dkp, dvp = _padded(dk), _padded(dv)
    Tp = -(-T // kernels.CHUNK) * kernels.CHUNK

    def rows(x, width):  # [B, T, H, d] -> [B*H, Tp, width]
        x = jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0), (0, width - x.shape[-1])])
        return jnp.swapaxes(x, 1, 2).reshape(B * H, Tp, width)

    starts = jnp.concatenate([jnp.zeros((B, 1), bool), doc_ids[:, 1:] != doc_ids[:, :-1]], axis=1)
    starts = jnp.pad(starts.astype(jnp.float32), [(0, 0), (0, Tp - T)])[..., None]
    h0 = jnp.pad(initial_state, [(0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv)]).reshape(B * H, dkp, dvp)
    o, final = _core(rows(q, dkp), rows(k, dkp), rows(v, dvp), rows(g[..., None], 1),
                     rows(beta[..., None], 1), starts, h0, scale, interpret)
    o = jnp.swapaxes(o.reshape(B, H, Tp, dvp)[:, :, :T, :dv], 1, 2)
    return o, final.reshape(B, H, dkp, dvp)[:, :, :dk, :dv]


def shard_over_mesh(fn, mesh):
    """Wrap fn(q, k, v, g, beta, initial_state, doc_ids) -> (o, final_state) in `jax.shard_map` over
    `mesh`: batch split over the mesh's data axes, heads over its tensor axis (`ops.shard`)."""
    b, h = shard.mesh_axes(mesh)
    tok, gate = P(b, None, h, None), P(b, None, h)
    state = P(b, h, None, None)
    return shard.shard_map(fn, mesh, (tok, tok, tok, gate, gate, state, P(b, None)), (tok, state))


def _context_mesh():
    """The mesh set with `jax.set_mesh`, unless absent or already manual (inside a shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(mesh.axis_names) - set(mesh.manual_axes):
        return None
    return mesh


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, doc_ids, *, interpret, mesh=None):
    """q, k [B,T,H,dk] L2-normalised float32; v [B,T,H,dv] any float dtype; g, beta [B,T,H] float32;
    initial_state [B,H,dk,dv] float32; doc_ids [B,T] monotone. On `mesh` (or the `jax.set_mesh` mesh),
    runs per shard. Returns (o [B,T,H,dv] in v's dtype, final state float32)."""
    fn = functools.partial(_local, scale=scale, interpret=interpret)
    mesh = mesh if mesh is not None else _context_mesh()
    if mesh is not None:
        fn = shard_over_mesh(fn, mesh)
    return fn(q, k, v, g, beta, initial_state, doc_ids)
