"""What the tests of each backend of the fused generated conv share: running a backend's kernels (interpreted)
with their vjp, the check against the float64 oracle, and the abstract arguments of the lowering tests.

Tolerances: float32 inputs 1e-5 relative (interpret mode computes the kernels' float32 arithmetic exactly;
measured ~5e-7); 16-bit inputs 2e-2 on the output, 3e-2 on gradients (bf16 rounding of v and of the
regenerated taps in the backward, as the XLA path rounds its kernels).
"""

import jax
import jax.numpy as jnp

from jetnemo_jax import ops
from jetnemo_jax.ops import conv
from tests.ops.test_conv import inputs
from tests.oracles import generated_conv_torch, rel_err

TOL = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 3e-2)}


def run(kernels, u, h, w2, b2, seg, cache):
    """y and the vjp through `conv.generated_conv` with the backend module `kernels`, interpreted."""
    B, T, _ = u.shape
    doc_ids = ops.doc_ids_from_segments(None if seg is None else jnp.asarray(seg), (B, T))
    f = lambda u, h, w2, b2, cache: conv.generated_conv(kernels, u, h, w2, b2, doc_ids, cache, interpret=True)
    if cache is None:
        return jax.vjp(lambda u, h, w2, b2: f(u, h, w2, b2, None), u, h, w2, b2)
    return jax.vjp(f, u, h, w2, b2, cache)


def check_matches_float64(rng, kernels, dtype, B, T, G, D, W, packed, with_cache, tol=None):
    """Forward and the gradients of every input against the float64 torch oracle."""
    u, h, w2, b2, seg, cache = inputs(rng, B, T, G, D, W, dtype, packed, with_cache)
    y, vjp = run(kernels, u, h, w2, b2, seg, cache)
    dy = jnp.asarray(rng.standard_normal(y.shape), dtype)
    grads = vjp(dy)
    y_ref, grads_ref = generated_conv_torch(u, h, w2, b2, seg, cache, dy)
    tol_y, tol_g = tol or TOL[dtype]
    assert y.dtype == jnp.dtype(dtype) and rel_err(y, y_ref) <= tol_y
    for name, g, g_ref in zip(("du", "dh", "dw2", "db2", "dcache"), grads, grads_ref):
        assert g.dtype == jnp.dtype(dtype), name
        assert rel_err(g, g_ref) <= tol_g, name


def loss(kernels):
    """value_and_grad of a loss on the fused op with the backend module `kernels` (compiled, not interpreted)."""
    def f(u, h, w2, b2, doc_ids, cache):
        y = conv.generated_conv(kernels, u, h, w2, b2, doc_ids, cache)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 5))


def abstract_args(B, T, G, D, dtype, sharding=None):
    s = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    return (s((B, T, D)), s((B, T, G)), s((G, 4 * D)), s((4 * D,)), s((B, T), jnp.int32), s((B, 3, D)))
