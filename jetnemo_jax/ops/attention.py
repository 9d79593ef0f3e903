"""Splash attention (jax.experimental.pallas.ops.tpu.splash_attention, the TPU flash-attention kernel MaxText
uses) for the attention layers' core on TPU: causal or sliding-window masks as the kernel's own block-sparse
masks, packed documents as its segment ids, so neither a [T, T] mask nor [T, T] scores reach HBM. Grouped-query
heads run as its multi-query kernel once per key/value head. On a mesh it runs per shard (`ops.mesh`): batch
over the batch axes, key/value heads over the head axes where they divide. On CPU it runs interpreted (tests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jetnemo_jax.ops import mesh as kernel_mesh

BLOCK = 512  # query and key tokens per kernel block (MaxText's default), fewer for shorter sequences
MIN_BLOCK = 128  # the TPU lane width: the sequence must be a multiple of it


def check_supported(T: int, shards: int = 1):
    if shards != 1:
        raise ValueError("splash attention does not split the sequence (context parallelism): use "
                         "attn_impl='blocked' with a context axis")
    if T % MIN_BLOCK:
        raise ValueError(f"splash attention needs the sequence length to be a multiple of {MIN_BLOCK}, got {T}")


def _kernel(T, groups, window, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    mask = sm.CausalMask((T, T)) if window is None else sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    b = next(b for b in (BLOCK, 256, MIN_BLOCK) if T % b == 0)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    kernel = sk.make_splash_mqa(sm.MultiHeadMask([mask] * groups), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
    return lambda q, k, v, seg: kernel(q, k, v, segment_ids=sk.SegmentIds(seg, seg))


def splash_attention(q, k, v, doc_ids, window: int | None, scale: float, *, shards: int = 1, mesh=None):
    """q [B,T,H,hd] over k, v [B,T,kv,hd]: causal (key j seen by query i iff i - window < j <= i when `window`),
    inside each document of doc_ids [B,T] (None: one per row). Returns [B,T,H,hd] in q's dtype. `shards`: the
    context-parallel split of the sequence, which it refuses."""
    B, T, H, hd = q.shape
    kv = k.shape[2]
    check_supported(T, shards)
    mesh = kernel_mesh.resolve(mesh)
    interpret = kernel_mesh.platform(mesh) != "tpu"
    docs = jnp.zeros((B, T), jnp.int32) if doc_ids is None else doc_ids.astype(jnp.int32)

    def local(q, k, v, docs):
        b, t, h, d = q.shape
        n = k.shape[2]
        run = _kernel(t, h // n, window, interpret)
        # the kernel takes no scale: q is scaled in float32 and rounded once to its dtype
        qg = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(b, t, n, h // n, d).transpose(0, 2, 3, 1, 4)
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, n, t, d]
        per_head = jax.vmap(run, in_axes=(0, 0, 0, None))
        out = jax.vmap(per_head)(qg, kt, vt, docs)  # [b, n, g, t, d]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)

    if mesh is None:
        return local(q, k, v, docs)
    batch, heads = kernel_mesh.kernel_axes(mesh)
    size = math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads or ()))
    heads = heads if kv % size == 0 else None  # else each shard runs every head of its rows
    tok = P(batch, None, heads, None)
    return kernel_mesh.shard_map(local, mesh, (tok, tok, tok, P(batch, None)), tok)(q, k, v, docs)
