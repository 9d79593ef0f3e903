"""Public entry points: input checks, then the implementation `impl` names.

`impl="auto"` picks the fastest implementation that supports the call on the current backend and logs
the choice once; an explicit `impl` is honoured or fails loudly, never replaced by another one.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jetnemo_jax.ops import chunked, pallas_conv, pallas_gdr, reference, triton_gdr
from jetnemo_jax.sharding import active_mesh

log = logging.getLogger(__name__)

GDR_IMPLS = ("auto", "pallas", "pallas_triton", "chunked", "reference")
CONV_IMPLS = ("auto", "pallas", "reference")
_logged: set[tuple[str, str]] = set()


def _announce(op: str, impl: str, platform: str | None = None) -> None:
    platform = platform or jax.default_backend()
    if (op, impl, platform) not in _logged:
        _logged.add((op, impl, platform))
        log.info("%s: using the %r implementation on %s", op, impl, platform)


def l2_normalize(x, eps=1e-6):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def doc_ids_from_segments(segment_ids, shape):
    """Monotone document index per token: +1 wherever the segment id changes."""
    B, T = shape
    if segment_ids is None:
        return jnp.zeros((B, T), jnp.int32)
    if segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids has shape {segment_ids.shape}, expected {(B, T)}")
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((B, 1), jnp.int32), jnp.cumsum(change, axis=1)], axis=1)


def _check_gdr_shapes(q, k, v, g, beta):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, dk], got shape {q.shape}")
    B, T, H, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k has shape {k.shape}, expected q's shape {q.shape}")
    if v.ndim != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v has shape {v.shape}, expected [{B}, {T}, {H}, dv]")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} has shape {x.shape}, expected {(B, T, H)}")
    return B, T, H, dk, v.shape[-1]


# impl -> (the platform its kernels compile for, their name in messages); on CPU they run interpreted (tests).
_KERNEL_PLATFORMS = {"pallas": ("tpu", "Pallas TPU"), "pallas_triton": ("gpu", "Pallas GPU")}


def _kernel_interpret(impl, mesh) -> bool:
    """Whether impl's kernels run interpreted (on CPU); an error on any platform but theirs and CPU."""
    platform, name = _KERNEL_PLATFORMS[impl]
    backend = pallas_gdr.platform(mesh)
    if backend not in (platform, "cpu"):
        raise ValueError(f"impl={impl!r} runs the {name} kernels, on {platform.upper()}s only (not on {backend}); "
                         f"impl='auto' picks what this platform has")
    if backend == "cpu" and (impl, "interpret") not in _logged:
        _logged.add((impl, "interpret"))
        log.info("gated_delta_rule: running the %s kernels in interpret mode on CPU", name)
    return backend == "cpu"


def _auto_impl(dk, dv, dtypes, chunk_size, mesh) -> str:
    """The platform's kernels where they apply (chunk 64, head sizes and dtypes they support, a known
    layout): "pallas" on TPU, "pallas_triton" on GPU (on an H100 4.7x the XLA op's forward+backward speed at
    the 2B shape: BENCHMARKS.md); else the pure-XLA chunked op."""
    if chunk_size != 64 or not pallas_gdr.layout_known(mesh):
        return "chunked"
    backend = pallas_gdr.platform(mesh)
    if backend == "tpu" and max(dk, dv) <= pallas_gdr.MAX_HEAD_DIM:
        return "pallas"
    if backend == "gpu":
        try:
            triton_gdr.check_supported(dk, dv, dtypes)
            return "pallas_triton"
        except ValueError:
            return "chunked"
    return "chunked"


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     segment_ids=None, use_qk_l2norm=True, impl="auto", chunk_size=64, mesh=None):
    """Gated delta rule over a sequence (fla's conventions).

    q, k [B,T,H,dk]; v [B,T,H,dv]; g (log decay, <= 0) and beta (in (0, 1]) [B,T,H];
    initial_state [B,H,dk,dv] float32; segment_ids [B,T] int (a change of id starts a new document,
    which starts from a zero state). Returns (o [B,T,H,dv] in v's dtype, final_state float32 or None).
    impl="pallas" (Mosaic TPU kernels) and "pallas_triton" (Pallas GPU kernels), chunk 64 only, run per
    shard of `mesh` (else of the training step's mesh, `sharding.activation_sharding`, else of the
    `jax.set_mesh` mesh), batch over the data axes and heads over the tensor axis; XLA partitions the
    other impls by itself. "auto" picks "pallas" on TPU and "pallas_triton" on GPU when one device or a
    mesh makes the layout known, else "chunked".
    """
    B, T, H, dk, dv = _check_gdr_shapes(q, k, v, g, beta)
    mesh = mesh if mesh is not None else active_mesh()
    if initial_state is not None and initial_state.shape != (B, H, dk, dv):
        raise ValueError(f"initial_state has shape {initial_state.shape}, expected {(B, H, dk, dv)}")
    if impl not in GDR_IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {GDR_IMPLS}")
    if impl == "auto":
        impl = _auto_impl(dk, dv, (q.dtype, k.dtype, v.dtype), chunk_size, mesh)
    if impl in ("pallas", "pallas_triton") and chunk_size != 64:
        raise ValueError(f"impl={impl!r} uses chunk_size=64, got {chunk_size}")
    if impl == "pallas":
        pallas_gdr.check_supported(dk, dv)
        interpret = _kernel_interpret(impl, mesh)
    elif impl == "pallas_triton":
        interpret = _kernel_interpret(impl, mesh)
        triton_gdr.check_supported(dk, dv, (q.dtype, k.dtype, v.dtype), interpret)
    _announce("gated_delta_rule", impl, pallas_gdr.platform(mesh))
    scale = dk ** -0.5 if scale is None else scale
    state = (jnp.zeros((B, H, dk, dv), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    doc_ids = doc_ids_from_segments(segment_ids, (B, T))
    if impl == "pallas_triton":  # the kernels take the inputs as they are and L2-normalise q, k themselves
        o, final_state = triton_gdr.gated_delta_rule(q, k, v, g, beta, scale, state, doc_ids,
                                                     l2norm=use_qk_l2norm, interpret=interpret, mesh=mesh)
        return o, (final_state if output_final_state else None)
    f32 = lambda x: x.astype(jnp.float32)
    qf, kf = (l2_normalize(q), l2_normalize(k)) if use_qk_l2norm else (f32(q), f32(k))
    args = (qf, kf, f32(v), f32(g), f32(beta), scale, state, doc_ids)
    if impl == "pallas":  # v goes in its own dtype: the kernels read it as is and compute in float32
        o, final_state = pallas_gdr.gated_delta_rule(qf, kf, v, *args[3:], interpret=interpret, mesh=mesh)
    elif impl == "chunked":
        o, final_state = chunked.gated_delta_rule(*args, chunk_size=chunk_size)
    else:
        o, final_state = reference.gated_delta_rule(*args)
    return o.astype(v.dtype), (final_state if output_final_state else None)


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=True):
    """One decode token: q, k [B,H,dk]; v [B,H,dv]; g, beta [B,H]; state [B,H,dk,dv] fp32.

    Returns (o [B,H,dv] in v's dtype, new state float32).
    """
    B, H, dk = q.shape
    if state.shape != (B, H, dk, v.shape[-1]):
        raise ValueError(f"state has shape {state.shape}, expected {(B, H, dk, v.shape[-1])}")
    scale = dk ** -0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)
    qf, kf = (l2_normalize(q), l2_normalize(k)) if use_qk_l2norm else (f32(q), f32(k))
    # reference.delta_rule_step rearranged so that decoding, which is bound by the state's bytes, reads S
    # twice and writes it once (XLA otherwise reads the decayed S for k, again for the update and the new S
    # for q): with a = exp(g), S^T k and S^T q come from one pass, then
    # S' = a S + k (beta (v - a S^T k))^T and o = scale (a S^T q + (q.k) beta (v - a S^T k)).
    S, a, b = f32(state), jnp.exp(f32(g))[..., None], f32(beta)[..., None]
    sk, sq = jnp.unstack(jnp.einsum("...jk,...kv->...jv", jnp.stack([kf, qf], -2), S,
                                    precision=jax.lax.Precision.HIGHEST), axis=-2)
    delta = b * (f32(v) - a * sk)
    new_state = a[..., None] * S + kf[..., :, None] * delta[..., None, :]
    o = scale * (a * sq + jnp.sum(qf * kf, -1, keepdims=True) * delta)
    return o.astype(v.dtype), new_state


def dynamic_conv(x, kernels, *, segment_ids=None, cache=None, output_final_cache=False, impl="auto"):
    """silu(causal depthwise conv of x with per-token kernels).

    x [B,T,D]; kernels [B,T,D,W] (tap W-1 multiplies the current token); cache [B,W-1,D]: the W-1
    inputs before x (they continue x's first document); segment_ids [B,T]: taps never cross documents.
    Returns (y [B,T,D] in x's dtype, final cache [B,W-1,D] in x's dtype or None).
    """
    if x.ndim != 3 or kernels.ndim != 4 or kernels.shape[:3] != x.shape:
        raise ValueError(f"x {x.shape} and kernels {kernels.shape} must be [B,T,D] and [B,T,D,W]")
    B, T, D = x.shape
    W = kernels.shape[-1]
    if cache is None:
        cache = jnp.zeros((B, W - 1, D), x.dtype)
    elif cache.shape != (B, W - 1, D):
        raise ValueError(f"cache has shape {cache.shape}, expected {(B, W - 1, D)}")
    if impl not in CONV_IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {CONV_IMPLS}")
    _announce("dynamic_conv", "reference")
    y, new_cache = reference.dynamic_conv(x, kernels, cache, doc_ids_from_segments(segment_ids, (B, T)))
    return y.astype(x.dtype), (new_cache.astype(x.dtype) if output_final_cache else None)


def dynamic_conv_step(x, kernel, cache):
    """One decode token: x [B,D], kernel [B,D,W], cache [B,W-1,D] -> (y [B,D], new cache)."""
    B, D = x.shape
    if kernel.shape[:2] != (B, D) or cache.shape != (B, kernel.shape[-1] - 1, D):
        raise ValueError(f"kernel {kernel.shape} / cache {cache.shape} do not match x {x.shape}")
    y, new_cache = reference.dynamic_conv_step(x, kernel, cache)
    return y.astype(x.dtype), new_cache.astype(cache.dtype)


def generated_dynamic_conv(u, h, w2, b2, *, segment_ids=None, cache=None, output_final_cache=False, impl="auto",
                           mesh=None):
    """dynamic_conv with the kernels generated from the generator's hidden activation: kernels = h @ w2 + b2.

    u [B,T,Dv]; h [B,T,G] = silu(x W1) in the matmul dtype; w2 [G, Dv*W] (channel-major: column d*W + w)
    and b2 [Dv*W], both in h's dtype. impl="pallas" fuses the generation into the conv kernels, so the
    [B,T,Dv,W] kernels never reach HBM (`ops.pallas_conv`): on GPU the forward keeps nothing for the
    backward beyond its inputs (~20x less activation memory than XLA's). It runs per shard of `mesh` (else
    of the training step's mesh, else of the `jax.set_mesh` mesh). "auto" picks it on TPU and GPU (on an
    H100, with the Mosaic GPU kernels that 16-bit inputs get there, its forward+backward is 1.9-2.0x XLA's
    speed at the 2B shape and 1.5x at 4B, its forward 1.9x and 1.5x: BENCHMARKS.md), else "reference" (XLA).
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
    if impl not in CONV_IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {CONV_IMPLS}")
    mesh = next((m for m in (mesh, active_mesh(), pallas_gdr._context_mesh()) if m is not None), None)
    backend = pallas_gdr.platform(mesh)
    if impl == "auto":
        impl = "pallas" if backend in ("tpu", "gpu") else "reference"
    if impl == "reference":
        kernels = (jnp.dot(h, w2, preferred_element_type=jnp.float32) + b2).astype(h.dtype)
        return dynamic_conv(u, kernels.reshape(B, T, D, W), segment_ids=segment_ids, cache=cache,
                            output_final_cache=output_final_cache, impl="reference")
    if backend not in ("gpu", "tpu", "cpu"):
        raise ValueError(f"impl='pallas' has GPU and TPU kernels only, not {backend}")
    kernels = {"cpu": "pallas (GPU kernels interpreted)", "hopper": "pallas (Mosaic GPU kernels)"}.get(
        pallas_conv.kernel_backend(backend, h.dtype, mesh), "pallas")
    _announce("dynamic_conv", kernels, backend)
    doc_ids = doc_ids_from_segments(segment_ids, (B, T))
    y = pallas_conv.generated_conv(u, h, w2, b2, doc_ids, cache, backend=backend, interpret=backend == "cpu",
                                   mesh=mesh)
    new_cache = pallas_conv.final_cache(u, cache, doc_ids, W) if output_final_cache else None
    return y, new_cache
