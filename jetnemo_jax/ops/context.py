"""Context parallelism of the sequence-mixing ops: every sequence split into contiguous shards over the mesh
axes of the active rules' `length` rule, each op run per shard with what the shards before it hand over.

- Gated delta rule: a shard's effect on the state entering it is affine, S_out = M S_in + U (M [dk, dk],
  U [dk, dv], sizes independent of T): U is the shard run from a zero state, M the shard run with zero values
  from the identity (a document starting inside the shard makes M zero, exactly). The shards' (M, U) are
  all-gathered, every shard combines the earlier ones in order (a few [dk, dk] x [dk, dv] products per shard),
  and reruns its tokens from its own entering state. The state is zeroed where a document starts exactly at
  a shard boundary. Autodiff through the collectives gives the mirror image in the backward pass.
- Generated causal conv: the previous shard's last W-1 values (a halo, `ppermute`), zeroed where they belong
  to another document than the shard's first token; the op takes them as its cache.

Any backend runs inside the shards (its kernels see a plain [B, T/N, ...] problem); `run` is the backend's
function with the op's own signature, called without a mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jetnemo_jax import sharding
from jetnemo_jax.ops import mesh as kernel_mesh


def axes(mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split sequences: the active rules' length rule; () for none."""
    if mesh is None:
        return ()
    names = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return tuple(a for a in sharding.active_rules().get(sharding.LENGTH, ()) if names.get(a, 1) > 1)


def shards(mesh, ctx, T: int, at_least: int = 1) -> int:
    """How many shards the mesh axes `ctx` split T tokens into; ValueError unless they divide T into shards of
    at least `at_least` tokens."""
    n = math.prod(mesh.shape[a] for a in ctx)
    if T % n or T // n < at_least:
        raise ValueError(f"a sequence of {T} tokens does not split into {n} context shards (mesh axes {ctx})"
                         + (f" of at least {at_least} tokens each" if at_least > 1 else ""))
    return n


def gated_delta_rule(run, mesh, ctx, q, k, v, g, beta, state, doc_ids):
    """run(q, k, v, g, beta, state, doc_ids) -> (o, final_state) on one shard; the same for the whole
    sequence split over the mesh axes `ctx`. state [B,H,dk,dv] float32 continues the first document."""
    shards(mesh, ctx, q.shape[1])
    b, h = kernel_mesh.kernel_axes(mesh)
    tok, gate = P(b, ctx, h, None), P(b, ctx, h)
    st, rows = P(b, h, None, None), P(b, ctx)

    def local(q, k, v, g, beta, state, doc_ids):
        B, T, H, dk = q.shape
        _, U = run(q, k, v, g, beta, jnp.zeros_like(state), doc_ids)
        eye = jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (B, H, dk, dk))
        _, M = run(q, k, jnp.zeros((B, T, H, dk), v.dtype), g, beta, eye, doc_ids)
        Ms, Us = jax.lax.all_gather(M, ctx), jax.lax.all_gather(U, ctx)  # [N, B, H, ...]
        first, last = jax.lax.all_gather(doc_ids[:, 0], ctx), jax.lax.all_gather(doc_ids[:, -1], ctx)
        entering = [state]
        for j in range(1, Ms.shape[0]):
            out = jnp.einsum("bhij,bhjv->bhiv", Ms[j - 1], entering[-1]) + Us[j - 1]
            continues = (first[j] == last[j - 1])[:, None, None, None]
            entering.append(jnp.where(continues, out, 0.0))
        final = jnp.einsum("bhij,bhjv->bhiv", Ms[-1], entering[-1]) + Us[-1]
        mine = jnp.stack(entering)[jax.lax.axis_index(ctx)]
        o, _ = run(q, k, v, g, beta, mine, doc_ids)
        return o, final

    return kernel_mesh.shard_map(local, mesh, (tok, tok, tok, gate, gate, st, rows), (tok, st))(
        q, k, v, g, beta, state, doc_ids)


def generated_conv(run, mesh, ctx, width, u, h, w2, b2, doc_ids, cache, output_final_cache):
    """run(u, h, w2, b2, doc_ids, cache, output_final_cache) -> (y, final cache or None) on one shard; the
    same for the whole sequence split over the mesh axes `ctx` (each shard at least width - 1 tokens)."""
    b, t = kernel_mesh.kernel_axes(mesh)
    B, _, D = u.shape
    if cache is None:
        cache = jnp.zeros((B, width - 1, D), u.dtype)
    specs = (P(b, ctx, t), P(b, ctx, None), P(None, t), P(t), P(b, ctx), P(b, None, t))
    n = shards(mesh, ctx, u.shape[1], at_least=width - 1)  # the halo comes from the previous shard alone

    def local(u, h, w2, b2, doc_ids, cache):
        i = jax.lax.axis_index(ctx)
        forward = [(j, j + 1) for j in range(n - 1)]
        prev_u = jax.lax.ppermute(u[:, -(width - 1):], ctx, forward)
        prev_doc = jax.lax.ppermute(doc_ids[:, -(width - 1):], ctx, forward)
        halo = jnp.where((prev_doc == doc_ids[:, :1])[..., None], prev_u, jnp.zeros_like(prev_u))
        halo = jnp.where(i == 0, cache.astype(u.dtype), halo)
        y, final = run(u, h, w2, b2, doc_ids, halo, output_final_cache)
        if final is None:
            return y, jnp.zeros((), u.dtype)
        return y, jax.lax.all_gather(final, ctx)[-1]  # the last shard's, on every shard

    y, final = kernel_mesh.shard_map(local, mesh, specs, (P(b, ctx, t), P(b, None, t) if output_final_cache
                                                          else P()))(u, h, w2, b2, doc_ids, cache)
    return y, (final if output_final_cache else None)
