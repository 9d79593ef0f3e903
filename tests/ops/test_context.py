"""jetnemo_jax.ops.context: the gated delta rule and the generated conv with each sequence split over 4 and 8
context shards and fsdp x 4 context shards (there every backend, kernels interpreted) equal one device: outputs, final
state / cache, and the gradient of every input (initial state and cache included), with packed documents
whose boundaries fall inside shards, on their edges and one token after them, zero gates and strong decay,
and shards that are no multiple of the 64-token chunks. Bad splits fail in one line."""

import pytest

from tests.train.runs import run_child


@pytest.mark.slow
def test_ops_split_over_context_shards_match_one_device(rng):
    out = run_child("tests.ops._context_ops", rng, JAX_PLATFORMS="cpu")
    assert out["hand_off_in_program"]  # the split ran through the hand-off, not XLA's own partitioning
    for op in ("gdr", "conv"):
        for mesh, rows in out[op].items():
            for impl, (value_rel, grad_rel) in rows.items():
                assert value_rel <= 1e-6 and grad_rel <= 1e-5, (op, mesh, impl, value_rel, grad_rel)
    assert "does not split into 8 context shards" in out["errors"]["T"]
    assert "of at least 3 tokens each" in out["errors"]["halo"]
