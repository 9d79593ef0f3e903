"""impl="fla" (fla-core's own Triton kernels launched through jax-triton) against the float64 recurrence.

The kernel tests need an NVIDIA GPU and the `[fla]` extra and skip with the reason elsewhere (CPU CI). The bf16
tolerances are the other GPU kernels' (fla's dots are bf16 as theirs), shapes include the 2B and 4B JetBlocks'
(dk 96 / dv 256, dk 128 / dv 256), odd T, zero and strong gates, packed documents (fla's varlen mode) and initial
states. Kernels compile with fla's first config (`autotune=False`) to keep the call short; the benchmark tunes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetnemo_jax import ops
from jetnemo_jax.ops import backends, delta_rule
from jetnemo_jax.ops import mesh as kernel_mesh
from pallas_kernels.gated_delta_rule import fla as fla_kernels
from tests.ops.test_delta_rule import check_forward, check_gradients, make_inputs, packed_segments
from tests.oracles import gdr_numpy, rel_err


def _unavailable():
    if jax.default_backend() != "gpu":
        return "fla's kernels run on NVIDIA GPUs only (this host: %s)" % jax.default_backend()
    return fla_kernels._versions()


needs_fla = pytest.mark.skipif(bool(_unavailable()), reason=str(_unavailable()))
TOL_BF16 = {"g": 4e-2, "beta": 4e-2}
AUTOTUNED = fla_kernels.gated_delta_rule


@pytest.fixture(autouse=True)
def _first_config(monkeypatch):
    monkeypatch.setattr(fla_kernels, "gated_delta_rule", lambda *a, **kw: AUTOTUNED(*a, **{**kw, "autotune": False}))


def test_never_chosen_by_auto(monkeypatch):
    """Named only: "auto" on a GPU takes our kernels (or XLA), never fla's, whatever it supports."""
    monkeypatch.setattr(kernel_mesh, "platform", lambda mesh: "gpu")
    monkeypatch.setattr(delta_rule, "_fla_supports", lambda call, interpret: None)
    call = delta_rule.Call(96, 256, (jnp.bfloat16,) * 3, 64)
    for dk in (96, 320):
        row, _ = backends.select("gated_delta_rule", delta_rule.BACKENDS, "auto", call._replace(dk=dk), None)
        assert row.name != "fla"


def test_refuses_cpu_in_one_line(rng):
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU refusal")
    with pytest.raises(ValueError, match="impl='fla': fla's kernels run through jax-triton on NVIDIA GPUs only"):
        ops.gated_delta_rule(**make_inputs(rng, 1, 10, 1, 16, 16, dtype="bfloat16"), impl="fla")


def test_document_capacity():
    assert fla_kernels.max_documents_per_row(4096) == 256 and fla_kernels.max_documents_per_row(37) == 8
    assert fla_kernels.max_documents_per_row(5) == 5


@needs_fla
@pytest.mark.parametrize("B,T,H,dk,dv,gates", [  # packed documents (fla's varlen mode) where T > 66
    (2, 300, 3, 96, 256, "normal"),  # the 2B JetBlock's heads
    (1, 300, 3, 128, 256, "normal"),  # the 4B JetBlock's heads
    (2, 130, 2, 96, 256, "strong"),
    (1, 37, 3, 128, 64, "zero"),
])
def test_forward_matches_float64_recurrence(rng, B, T, H, dk, dv, gates):
    check_forward(rng, "fla", "bfloat16", B, T, H, dk, dv, gates)


@needs_fla
@pytest.mark.parametrize("B,T,H,dk,dv,gates,packed", [  # T and H cut: the float64 torch oracle runs on the host
    (1, 256, 3, 96, 256, "normal", False),  # the 2B JetBlock's heads, fla's plain mode
    (2, 200, 2, 96, 256, "normal", True),  # the 2B heads, varlen
    (1, 256, 2, 128, 256, "normal", True),  # the 4B JetBlock's heads, varlen
    (2, 100, 2, 96, 256, "strong", True),
    (1, 70, 2, 128, 128, "zero", False),
])
def test_gradients_match_float64(rng, B, T, H, dk, dv, gates, packed):
    seg = packed_segments(rng, B, T) if packed else None
    tol = {**TOL_BF16, "g": 0.15} if gates == "strong" else TOL_BF16  # as the Triton kernels' bf16 dg
    check_gradients(rng, "fla", "bfloat16", B, T, H, dk, dv, gates, seg, tol=tol)


@needs_fla
@pytest.mark.parametrize("B,T,H,dk,dv", [(2, 4096, 12, 96, 256), (1, 8192, 16, 128, 256)])  # the 2B, 4B JetBlocks
def test_full_shapes_match_our_triton_kernels(rng, B, T, H, dk, dv):
    """At the whole 2B and 4B shapes (packed documents, an initial state), fla's kernels against our Triton
    kernels (themselves checked against the float64 recurrence): outputs, final state and every gradient."""
    x = make_inputs(rng, B, T, H, dk, dv, dtype="bfloat16")
    h0 = jnp.asarray(rng.standard_normal((B, H, dk, dv)), jnp.float32)
    seg = packed_segments(rng, B, T)
    do = jnp.asarray(rng.standard_normal((B, T, H, dv)), jnp.bfloat16)

    def run(impl):
        def loss(q, k, v, g, beta, h0):
            o, s = ops.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                        segment_ids=seg, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s), (o, s)
        return jax.jit(jax.grad(loss, argnums=range(6), has_aux=True))(*x.values(), h0)

    (g1, (o1, s1)), (g0, (o0, s0)) = run("fla"), run("triton")
    assert rel_err(o1, o0) <= 5e-3 and rel_err(s1, s0) <= 5e-3
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], g1, g0):
        assert rel_err(a, b) <= (4e-2 if name in ("g", "beta") else 1e-2), name


@needs_fla
def test_packed_documents_over_capacity_give_nan(rng):
    """More documents than `max_documents_per_row` allows: NaN, not another function."""
    x = make_inputs(rng, 1, 40, 2, 96, 64, dtype="bfloat16")
    seg = np.arange(40, dtype=np.int32)[None]  # 40 documents, capacity 8 per row at T = 40
    o, s = jax.jit(lambda x: ops.gated_delta_rule(**x, segment_ids=seg, output_final_state=True, impl="fla"))(x)
    assert bool(jnp.all(jnp.isnan(o.astype(jnp.float32)))) and bool(jnp.all(jnp.isnan(s)))


@needs_fla
def test_autotuned_matches_float64(rng, monkeypatch):
    """fla's configs timed by jax-triton's autotuner on the first run (the benchmark's mode)."""
    monkeypatch.setattr(fla_kernels, "gated_delta_rule", AUTOTUNED)
    x = make_inputs(rng, 2, 300, 4, 96, 256, dtype="bfloat16")
    o = jax.jit(lambda x: ops.gated_delta_rule(**x, impl="fla"))(x)[0]
    assert rel_err(o, gdr_numpy(**x)[0]) <= 5e-3


def test_varlen_layout_matches_fla_index_rules(rng):
    """The rows laid end to end: cu_seqlens over every document, fla's (sequence, chunk) pairs in order, the
    unused slots on the zero-length last sequence; each row's first and last documents."""
    seg = packed_segments(rng, 2, 150)
    doc_ids = ops.doc_ids_from_segments(jnp.asarray(seg), (2, 150))
    lay = fla_kernels._Layout(doc_ids, varlen=True)
    ids = np.asarray(doc_ids)
    lens = [n for row in ids for n in np.bincount(row)]  # document lengths, row after row
    cap = 2 * fla_kernels.max_documents_per_row(150)
    cu = np.asarray(lay.cu)
    assert lay.N == cap + 1 and cu.shape == (cap + 2,)
    assert list(np.diff(cu)[:len(lens)]) == lens and not np.diff(cu)[len(lens):].any()
    pairs = [(n, t) for n, length in enumerate(lens) for t in range(-(-length // 64))]
    got = np.asarray(lay.chunk_indices).reshape(-1, 2)
    assert [tuple(p) for p in got[:len(pairs)]] == pairs and (got[len(pairs):] == [cap, 0]).all()
    assert list(np.asarray(lay.chunk_offsets)[:len(lens) + 1]) == [0, *np.cumsum([-(-n // 64) for n in lens])]
    first_row_docs = len(np.bincount(ids[0]))
    assert list(np.asarray(lay.first)) == [0, first_row_docs]
    assert list(np.asarray(lay.last)) == [first_row_docs - 1, len(lens) - 1]
    assert not bool(lay.overflow)
    # a shard of longer sequences (context parallelism) numbers its documents from where the sequence is
    shifted = fla_kernels._Layout(doc_ids + jnp.asarray([[3], [5]], jnp.int32), varlen=True)
    for name in ("cu", "chunk_indices", "chunk_offsets", "first", "last"):
        np.testing.assert_array_equal(getattr(shifted, name), getattr(lay, name))
