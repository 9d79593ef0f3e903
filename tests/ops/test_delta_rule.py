"""jetnemo_jax.ops.delta_rule: gated_delta_rule (impl "xla", the chunked XLA path, and "reference") against the
float64 token recurrence, and how "auto" reads the table of backends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetnemo_jax import ops
from jetnemo_jax.ops import backends, delta_rule
from jetnemo_jax.ops import mesh as kernel_mesh
from tests.oracles import gdr_numpy, gdr_torch_grads, rel_err

# fla's tolerances (relative RMS) for 16-bit inputs; float32 runs must match to 1e-5.
TOL = {"bfloat16": {"o": 5e-3, "state": 5e-3, "q": 8e-3, "k": 8e-3, "v": 8e-3, "initial_state": 8e-3,
                    "g": 2e-2, "beta": 2e-2},
       "float32": dict.fromkeys(["o", "state", "q", "k", "v", "initial_state", "g", "beta"], 1e-5)}


def make_inputs(rng, B, T, H, dk, dv, *, gates="normal", dtype="float32"):
    q = rng.standard_normal((B, T, H, dk))
    k = rng.standard_normal((B, T, H, dk))
    v = rng.standard_normal((B, T, H, dv))
    beta = rng.uniform(0.05, 1.0, (B, T, H))
    if gates == "zero":
        g = np.zeros((B, T, H))
    elif gates == "strong":  # down to -150: exp(-G) would overflow if ever formed
        g = -rng.uniform(0.0, 150.0, (B, T, H))
    else:
        g = np.log(rng.uniform(0.8, 1.0, (B, T, H)))
    cast = lambda x: jnp.asarray(x, dtype)
    return dict(q=cast(q), k=cast(k), v=cast(v), g=jnp.asarray(g, jnp.float32), beta=cast(beta))


def packed_segments(rng, B, T):
    """Documents that start at a chunk boundary, mid-chunk, and one of length 1."""
    seg = np.zeros((B, T), np.int32)
    cuts = sorted({64, 65, int(rng.integers(2, T - 1)), T - 1})
    for i, c in enumerate(cuts):
        if c < T:
            seg[:, c:] = i + 1
    seg[-1, :] = 7  # the last row stays one document, with an arbitrary id
    return seg


CASES = [  # (B, T, H, dk, dv, gates)
    (2, 130, 2, 96, 256, "normal"),
    (1, 77, 3, 64, 64, "zero"),
    (2, 100, 2, 128, 128, "strong"),
    (1, 64, 2, 256, 64, "normal"),
    (1, 5, 1, 32, 48, "normal"),
]


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("B,T,H,dk,dv,gates", CASES)
def test_forward_fp32_matches_float64_recurrence(rng, impl, B, T, H, dk, dv, gates):
    x = make_inputs(rng, B, T, H, dk, dv, gates=gates)
    h0 = jnp.asarray(rng.standard_normal((B, H, dk, dv)), jnp.float32)
    seg = packed_segments(rng, B, T) if T > 66 else None
    o, s = ops.gated_delta_rule(**x, initial_state=h0, output_final_state=True, segment_ids=seg, impl=impl)
    o_ref, s_ref = gdr_numpy(**x, initial_state=h0, segment_ids=seg)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel_err(o, o_ref) <= TOL["float32"]["o"]
    assert rel_err(s, s_ref) <= TOL["float32"]["state"]


@pytest.mark.parametrize("impl,dtype,B,T,H,dk,dv,gates", [
    *[("xla", dtype, *case) for dtype in ("bfloat16", "float32")
      for case in (CASES[0], CASES[2], (1, 70, 2, 64, 128, "zero"))],
    ("reference", "float32", 1, 70, 2, 96, 64, "normal"),
])
def test_gradients_match_float64(rng, impl, dtype, B, T, H, dk, dv, gates):
    check_gradients(rng, impl, dtype, B, T, H, dk, dv, gates, packed_segments(rng, B, T))


def kernel_segments(rng, B, T):
    """Packed documents for the kernel tests where T allows: starting exactly at a chunk boundary (64),
    mid-chunk and of length 1 needs T > 66."""
    return packed_segments(rng, B, T) if T > 66 else None


def check_forward(rng, impl, dtype, B, T, H, dk, dv, gates):
    """o and the final state (jitted, with an initial state and packed documents) against the float64
    recurrence."""
    x = make_inputs(rng, B, T, H, dk, dv, gates=gates, dtype=dtype)
    h0 = jnp.asarray(rng.standard_normal((B, H, dk, dv)), jnp.float32)
    seg = kernel_segments(rng, B, T)
    run = jax.jit(lambda x, h0: ops.gated_delta_rule(**x, initial_state=h0, output_final_state=True,
                                                     segment_ids=seg, impl=impl))
    o, s = run(x, h0)
    o_ref, s_ref = gdr_numpy(**x, initial_state=h0, segment_ids=seg)
    assert o.dtype == jnp.dtype(dtype) and s.dtype == jnp.float32
    assert rel_err(o, o_ref) <= TOL[dtype]["o"]
    assert rel_err(s, s_ref) <= TOL[dtype]["state"]


def check_gradients(rng, impl, dtype, B, T, H, dk, dv, gates, seg, tol=None):
    """o, final state and every gradient (of a loss on both) against the float64 recurrence and torch.
    `tol` overrides entries of TOL[dtype]."""
    x = make_inputs(rng, B, T, H, dk, dv, gates=gates, dtype=dtype)
    h0 = jnp.asarray(rng.standard_normal((B, H, dk, dv)), jnp.float32)
    # The cotangent of a bf16 output is bf16 (as in fla's tests): the oracle gets the same rounded values.
    do = np.asarray(jnp.asarray(rng.standard_normal((B, T, H, dv)), dtype), np.float64)
    dS = rng.standard_normal((B, H, dk, dv))

    def loss(q, k, v, g, beta, initial_state):
        o, s = ops.gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, output_final_state=True,
                                    segment_ids=seg, impl=impl)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s * dS), (o, s)

    grads, (o, s) = jax.jit(jax.grad(loss, argnums=range(6), has_aux=True))(*x.values(), h0)
    o_ref, s_ref = gdr_numpy(**x, initial_state=h0, segment_ids=seg)
    ref = gdr_torch_grads(**x, do=do, initial_state=h0, segment_ids=seg, dS=dS)
    tol = {**TOL[dtype], **(tol or {})}
    assert rel_err(o, o_ref) <= tol["o"]
    assert rel_err(s, s_ref) <= tol["state"]
    for name, grad in zip(["q", "k", "v", "g", "beta", "initial_state"], grads):
        assert grad.dtype == (x[name].dtype if name in x else jnp.float32)
        assert rel_err(grad, ref[name]) <= tol[name], name


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_xla_and_reference_agree(rng, dtype):
    x = make_inputs(rng, 2, 150, 2, 96, 256, dtype=dtype)
    seg = packed_segments(rng, 2, 150)
    o1, s1 = ops.gated_delta_rule(**x, segment_ids=seg, output_final_state=True, impl="xla")
    o2, s2 = ops.gated_delta_rule(**x, segment_ids=seg, output_final_state=True, impl="reference")
    assert o1.dtype == o2.dtype == jnp.dtype(dtype)
    assert rel_err(o1, o2) <= (5e-3 if dtype == "bfloat16" else 1e-5)
    assert rel_err(s1, s2) <= 1e-5


def test_documents_are_independent(rng):
    """A packed row equals its documents run one by one (the state resets at every document start)."""
    x = make_inputs(rng, 1, 140, 2, 64, 64)
    seg = np.array([[0] * 50 + [1] * 90], np.int32)
    o, _ = ops.gated_delta_rule(**x, segment_ids=seg, impl="xla")
    for lo, hi in ((0, 50), (50, 140)):
        part = {n: a[:, lo:hi] for n, a in x.items()}
        o_part, _ = ops.gated_delta_rule(**part, impl="xla")
        assert rel_err(o[:, lo:hi], o_part) <= 1e-6


def test_decode_steps_reproduce_the_sequence(rng):
    B, T, H, dk, dv = 2, 70, 2, 96, 128
    x = make_inputs(rng, B, T, H, dk, dv)
    h0 = jnp.asarray(rng.standard_normal((B, H, dk, dv)), jnp.float32)
    o_full, s_full = ops.gated_delta_rule(**x, initial_state=h0, output_final_state=True, impl="xla")
    step = jax.jit(ops.gated_delta_rule_step)
    state, outs = h0, []
    for t in range(T):
        o_t, state = step(*(x[n][:, t] for n in ("q", "k", "v", "g", "beta")), state)
        outs.append(o_t)
    assert rel_err(jnp.stack(outs, 1), o_full) <= 1e-5
    assert rel_err(state, s_full) <= 1e-5


def test_prefill_then_continue_with_state(rng):
    """Splitting a sequence and carrying the final state gives the same outputs (also across chunk edges)."""
    x = make_inputs(rng, 1, 200, 2, 64, 64)
    o_full, _ = ops.gated_delta_rule(**x, impl="xla")
    first = {n: a[:, :90] for n, a in x.items()}
    rest = {n: a[:, 90:] for n, a in x.items()}
    o1, s = ops.gated_delta_rule(**first, output_final_state=True, impl="xla")
    o2, _ = ops.gated_delta_rule(**rest, initial_state=s, impl="xla")
    assert rel_err(jnp.concatenate([o1, o2], 1), o_full) <= 1e-5


def test_bad_inputs_name_the_problem(rng):
    x = make_inputs(rng, 1, 10, 2, 16, 16)
    with pytest.raises(ValueError, match="k has shape"):
        ops.gated_delta_rule(x["q"], x["k"][:, :5], x["v"], x["g"], x["beta"])
    with pytest.raises(ValueError, match="beta has shape"):
        ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"][..., :1])
    with pytest.raises(ValueError, match="initial_state has shape"):
        ops.gated_delta_rule(**x, initial_state=jnp.zeros((1, 2, 16, 8)))
    with pytest.raises(ValueError, match="segment_ids has shape"):
        ops.gated_delta_rule(**x, segment_ids=jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="impl="):
        ops.gated_delta_rule(**x, impl="pallas_typo")


def test_auto_reads_the_table_of_backends(rng, monkeypatch):
    """"auto" takes the first row of BACKENDS that this platform runs (kernels only where a mesh or one device
    makes the layout known) and that supports the call; a name the op has no row for fails."""
    call = delta_rule.Call(64, 64, (jnp.float32,) * 3, 64)
    pick = lambda call: backends.select("gated_delta_rule", delta_rule.BACKENDS, "auto", call, None)[0].name
    monkeypatch.setattr(kernel_mesh, "platform", lambda mesh: "cpu")  # also when the tests run on a GPU
    assert pick(call) == "xla"
    monkeypatch.setattr(kernel_mesh, "platform", lambda mesh: "tpu")
    assert pick(call) == "tpu" and pick(call._replace(dk=320)) == "xla" and pick(call._replace(chunk_size=32)) == "xla"
    monkeypatch.setattr(kernel_mesh, "layout_known", lambda mesh: False)
    assert pick(call) == "xla"
    with pytest.raises(ValueError, match="no such backend"):
        ops.gated_delta_rule(**make_inputs(rng, 1, 10, 1, 16, 16), impl="mosaic_gpu")


@pytest.mark.parametrize("C", [1, 2, 16, 64])
def test_unit_lower_inverse(rng, C):
    from jetnemo_jax.ops.delta_rule import unit_lower_inverse

    k = rng.standard_normal((3, C, 32))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = rng.uniform(0, 1, (3, C, 1))
    A = np.tril(beta * (k @ np.swapaxes(k, -1, -2)), -1)  # the matrix the chunked op inverts
    inv = unit_lower_inverse(jnp.asarray(A, jnp.float32))
    assert rel_err(inv, np.linalg.inv(np.eye(C) + A)) <= 1e-5

    # The hand-written gradient against autodiff of forward substitution, X_i = e_i - A_i X (rows j >= i of X
    # still zero), on the strictly lower entries (the only ones the inverse reads).
    def substitution(A):
        row = lambda i, X: X.at[:, i].set(jnp.eye(C)[i] - jnp.einsum("bj,bjk->bk", A[:, i], X))  # noqa: E731
        return jax.lax.fori_loop(0, C, row, jnp.zeros_like(A))

    cot = jnp.asarray(rng.standard_normal(A.shape), jnp.float32)
    grad = lambda f: jax.jit(jax.grad(lambda a: jnp.sum(f(a) * cot)))(jnp.asarray(A, jnp.float32))  # noqa: E731
    got, expected = grad(unit_lower_inverse), np.tril(grad(substitution), -1)
    assert (rel_err(got, expected) <= 1e-5) if C > 1 else not np.any(got)
    with pytest.raises(ValueError, match="power of two"):
        unit_lower_inverse(jnp.zeros((3, 3)))
