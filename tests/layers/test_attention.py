"""layers/attention.py: the flash-attention form of the mask (library causal + window arguments, the document
mask alone) is the materialised [T, T] mask's rule; the cuDNN path passes exactly these arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetnemo_jax.layers.attention import _flash_args, attention_core


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _doc_ids(rng, B, T):
    """Monotone document ids with random boundaries (packed rows), one row a single document."""
    starts = rng.random((B, T)) < 0.08
    starts[:, 0] = False
    starts[0] = False
    return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


@pytest.mark.parametrize("window", [None, 1, 7])
@pytest.mark.parametrize("packed", [False, True])
def test_flash_arguments_equal_the_materialised_mask(rng, window, packed):
    B, T, H, kv, hd = 2, 48, 4, 2, 16
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q, k, v, do = f(B, T, H, hd), f(B, T, kv, hd), f(B, T, kv, hd), f(B, T, H, hd)
    doc = _doc_ids(rng, B, T) if packed else None
    scale = hd ** -0.5
    ref = lambda q, k, v: attention_core(q, k, v, doc, window, scale, "xla")  # noqa: E731
    flash = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, scale=scale, implementation="xla", **_flash_args(doc, window))
    (o0, vjp0), (o1, vjp1) = jax.vjp(ref, q, k, v), jax.vjp(flash, q, k, v)
    assert _rel(o1, o0) <= 1e-6
    for g1, g0 in zip(vjp1(do), vjp0(do)):
        assert _rel(g1, g0) <= 1e-6


def test_unknown_impl_is_refused(rng):
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="expected one of xla, cudnn, blocked"):
        attention_core(x, x, x, None, None, 1.0, "flash")


def test_cudnn_impl_calls_the_library_with_the_flash_arguments(rng, monkeypatch):
    """No cuDNN on CPU: run impl="cudnn" with the library call redirected to XLA; it must equal the reference."""
    real = jax.nn.dot_product_attention
    seen = []

    def redirected(*args, implementation=None, **kwargs):
        seen.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", redirected)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 32, h, 8)), jnp.float32) for h in (4, 2, 2))
    doc = _doc_ids(rng, 2, 32)
    out = attention_core(q, k, v, doc, 5, 0.3, "cudnn")
    assert seen == ["cudnn"]
    assert _rel(out, attention_core(q, k, v, doc, 5, 0.3, "xla")) <= 1e-6


@pytest.mark.parametrize("window", [None, 1, 200])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_blocked_equals_the_materialised_mask(rng, window, shards, monkeypatch):
    """impl="blocked" (query blocks, masks from positions, rematerialised) against the [T, T] mask: forward and
    gradients, packed rows, GQA, blocks that do not divide the shard (T = 3 x 2 x 35 tokens)."""
    import jetnemo_jax.layers.attention as attention

    monkeypatch.setattr(attention, "BLOCK", 16)  # several blocks per shard (the shard's 35 or 70 tokens: 7, 14)
    B, T, H, kv, hd = 2, 210, 4, 2, 16
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q, k, v, do = f(B, T, H, hd), f(B, T, kv, hd), f(B, T, kv, hd), f(B, T, H, hd)
    doc = _doc_ids(rng, B, T)
    ref = lambda q, k, v: attention_core(q, k, v, doc, window, 0.25, "xla")  # noqa: E731
    blocked = lambda q, k, v: attention_core(q, k, v, doc, window, 0.25, "blocked", shards=shards)  # noqa: E731
    (o0, vjp0), (o1, vjp1) = jax.vjp(ref, q, k, v), jax.vjp(blocked, q, k, v)
    assert _rel(o1, o0) <= 1e-6
    for g1, g0 in zip(vjp1(do), vjp0(do)):
        assert _rel(g1, g0) <= 1e-6
