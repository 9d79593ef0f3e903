"""ops/attention.py: splash attention (interpreted on CPU) equals the materialised [T, T] mask's attention,
forward and gradients, with packed documents, sliding windows and grouped-query heads; it refuses what it
does not run in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetnemo_jax.layers.attention import attention_core
from tests.layers.test_attention import _doc_ids, _rel


@pytest.mark.parametrize("window,dtype,T", [(None, "float32", 256), (1, "float32", 128), (200, "float32", 384),
                                            (37, "bfloat16", 256)])
def test_splash_equals_the_materialised_mask(rng, window, dtype, T):
    B, H, kv, hd = 2, 4, 2, 64
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    q, k, v, do = f(B, T, H, hd), f(B, T, kv, hd), f(B, T, kv, hd), f(B, T, H, hd)
    doc = _doc_ids(rng, B, T)
    ref = lambda q, k, v: attention_core(q, k, v, doc, window, hd ** -0.5, "xla")  # noqa: E731
    splash = lambda q, k, v: attention_core(q, k, v, doc, window, hd ** -0.5, "splash")  # noqa: E731
    (o0, vjp0), (o1, vjp1) = jax.vjp(ref, q, k, v), jax.vjp(splash, q, k, v)
    tol = 1e-6 if dtype == "float32" else 2e-2  # bf16: q is scaled and rounded before the kernel
    assert o1.dtype == q.dtype and _rel(o1, o0) <= tol
    for g1, g0 in zip(vjp1(do), vjp0(do)):  # window 1: dq is exactly 0 (each query sees itself alone)
        assert _rel(g1, g0) <= tol or (not np.any(g0) and float(jnp.max(jnp.abs(g1))) <= 1e-5)


def test_splash_refuses_in_one_line():
    x = jnp.zeros((1, 100, 2, 8))
    with pytest.raises(ValueError, match="multiple of 128, got 100"):
        attention_core(x, x, x, None, None, 1.0, "splash")
    y = jnp.zeros((1, 256, 2, 8))
    with pytest.raises(ValueError, match="context parallelism"):
        attention_core(y, y, y, None, None, 1.0, "splash", shards=2)
    assert np.all(np.isfinite(attention_core(y, y, y, None, None, 1.0, "splash")))
