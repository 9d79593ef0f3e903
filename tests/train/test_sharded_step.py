"""Train steps on a 2x2x2 (data, fsdp, tensor) mesh of 8 simulated devices equal the one-device steps."""

import pytest

from tests.train.runs import run_child


@pytest.mark.slow
def test_mesh_2x2x2_and_accumulation_match_one_device(rng):
    out = run_child("tests.train._sharded_step", rng, timeout=600)
    assert out["sharded_params"] > out["n_params"] // 2, out  # the mesh really shards the weights
    assert out["embedding_spec"] == ["tensor", "fsdp"]
    assert out["min_param_change"][0] > 1e-6  # every parameter moved: the comparison below means something
    assert out["loss_rel_8"] <= 1e-5  # loss and grad norm of each of 3 steps
    assert out["loss_rel_accum"] <= 1e-5
    assert out["param_rel_8"] <= 1e-5
    assert out["param_rel_accum"] <= 1e-5
