"""jetnemo_jax.ops.linear_attention (chunked and reference) against a float64 numpy recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetnemo_jax.ops.linear_attention import (
    gated_linear_attention,
    gated_linear_attention_step,
)
from tests.oracles import rel_err


def gla_numpy(q, k, v, g, initial_state, segment_ids):
    q, k, v, g, S = (np.asarray(x, np.float64) for x in (q, k, v, g, initial_state))
    T, dk = q.shape[1], q.shape[-1]
    g = np.broadcast_to(g[..., None], q.shape) if g.ndim == 3 else g
    o = np.zeros(v.shape)
    S = S.copy()
    for t in range(T):
        if segment_ids is not None and t > 0:
            S[segment_ids[:, t] != segment_ids[:, t - 1]] = 0.0
        S = S * np.exp(g[:, t])[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = dk ** -0.5 * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def make_inputs(rng, B, T, H, dk, dv, gate, dtype):
    shape = (B, T, H, dk) if gate.startswith("key") else (B, T, H)
    low = 150.0 if gate.endswith("strong") else 0.3  # strong: exp(-cumsum g) would overflow if ever formed
    g = -rng.uniform(0.0, low, shape)
    cast = lambda x: jnp.asarray(x, dtype)
    return (cast(rng.standard_normal((B, T, H, dk))), cast(rng.standard_normal((B, T, H, dk))),
            cast(rng.standard_normal((B, T, H, dv))), jnp.asarray(g, jnp.float32))


def segments(rng, B, T):
    seg = np.ones((B, T), np.int32)
    for c in sorted(rng.choice(np.arange(1, T), size=min(3, T - 1), replace=False)):
        seg[0, c:] += 1
    return seg


CASES = [  # B, T, H, dk, dv, gate, chunk
    (2, 37, 2, 8, 12, "head", 16),
    (1, 50, 3, 16, 8, "key", 16),
    (2, 33, 1, 8, 8, "key_strong", 8),
    (1, 7, 2, 4, 6, "head_strong", 16),
]


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,T,H,dk,dv,gate,chunk", CASES)
def test_matches_float64_recurrence(rng, impl, dtype, B, T, H, dk, dv, gate, chunk):
    q, k, v, g = make_inputs(rng, B, T, H, dk, dv, gate, dtype)
    h0 = jnp.asarray(rng.standard_normal((B, H, dk, dv)), jnp.float32)
    seg = segments(rng, B, T)
    o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, segment_ids=seg,
                                  impl=impl, chunk_size=chunk)
    # The oracle sees the same (rounded) inputs, so bf16 differs only by the output rounding.
    o_ref, s_ref = gla_numpy(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), g, h0, seg)
    tol = 1e-5 if dtype == "float32" else 8e-3  # bf16: one output rounding (2^-8 relative)
    assert o.dtype == jnp.dtype(dtype) and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < tol
    assert rel_err(s, s_ref) < 1e-5


def test_gradients_chunked_match_reference(rng):
    q, k, v, g = make_inputs(rng, 2, 29, 2, 8, 6, "key", "float32")
    seg = segments(rng, 2, 29)

    def loss(impl, *xs):
        o, s = gated_linear_attention(*xs, output_final_state=True, segment_ids=seg, impl=impl, chunk_size=8)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s ** 2)

    want = jax.grad(lambda *xs: loss("reference", *xs), argnums=(0, 1, 2, 3))(q, k, v, g)
    got = jax.grad(lambda *xs: loss("xla", *xs), argnums=(0, 1, 2, 3))(q, k, v, g)
    for name, a, b in zip("qkvg", got, want):
        assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("gate", ["head", "key"])
def test_decode_steps_continue_the_sequence(rng, gate):
    B, T, H, dk, dv = 2, 20, 2, 8, 4
    q, k, v, g = make_inputs(rng, B, T, H, dk, dv, gate, "float32")
    _, s = gated_linear_attention(q[:, :T - 3], k[:, :T - 3], v[:, :T - 3], g[:, :T - 3], output_final_state=True)
    outs = []
    for t in range(T - 3, T):
        o_t, s = gated_linear_attention_step(q[:, t], k[:, t], v[:, t], g[:, t], s)
        outs.append(o_t)
    o_full, _ = gated_linear_attention(q, k, v, g, impl="reference")
    assert rel_err(jnp.stack(outs, 1), o_full[:, T - 3:]) < 1e-5
