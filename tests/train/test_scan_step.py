"""The train step of a scanned model (model.scan_layers) equals the unrolled one's: plain, accumulated, stage-1
distillation with hidden-state MSE, on a 2x2x2 mesh; and a checkpoint written by either form resumes in the
other, to the same weights."""

import json
import shutil

import jax
import numpy as np
import pytest

from jetnemo_jax import sharding
from jetnemo_jax.checkpoint.auto import load_model
from jetnemo_jax.train.config import model_section
from jetnemo_jax.train.loop import initial_params, run
from jetnemo_jax.train.program import build
from jetnemo_jax.train.recipes import STAGE1_FROZEN
from tests.train.runs import run_child, small_config
from tests.train.test_distill import qwen_dir  # noqa: F401 (a fixture)

# Runs of 2 JetBlocks, 1 attention, 2 sliding-window layers.
LAYERS = ("jet", "jet", "attn", "swa", "swa")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _steps(c, batches):
    program = build(c, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    trainable, frozen, teacher = initial_params(c, program)
    state = program.init_state(trainable)
    metrics = []
    for batch in batches:
        state, m = program.step_fn(state, frozen, teacher, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    return metrics, {n: np.asarray(a) for n, a in state["params"].items()}


def _batches(rng, n=2):
    return [{"tokens": rng.integers(0, 512, (8, 32)).astype(np.int32),
             "segment_ids": (np.cumsum(rng.random((8, 32)) < 0.08, axis=1) + 1).astype(np.int32)}
            for _ in range(n)]


def _compare(runs):
    (m0, p0), (m1, p1) = runs[False], runs[True]
    assert set(p1) == set(p0)
    for a, b in zip(m1, m0):
        assert a.keys() == b.keys()
        for k in b:
            assert abs(a[k] - b[k]) <= 1e-5 * max(abs(b[k]), 1e-6), (k, a[k], b[k])
    worst = max((_rel(p1[n], p0[n]), n) for n in p0)
    assert worst[0] <= 1e-5, worst


def test_scanned_train_step_with_accumulation_equals_unrolled(tmp_path, rng):
    batches = _batches(rng)
    runs = {}
    for scan in (False, True):
        c = small_config(tmp_path, **{"train.frozen": "/mlp/|embed_tokens", "train.microbatches": 2,
                                      "train.remat": "jet:full,attn:none,swa:dots", "optim.eps": 1.0,
                                      "optim.warmup_steps": 0})
        c.model = model_section("tiny", layer_types=LAYERS, dtype="float32", scan_layers=scan)
        runs[scan] = _steps(c, batches)
    _compare(runs)


def test_scanned_stage1_distillation_equals_unrolled(tmp_path, qwen_dir, rng):  # noqa: F811
    """The teacher (all attention) scans too; distill.hidden_layers end their runs in student and teacher."""
    batches = _batches(rng, 1)
    runs = {}
    for scan in (False, True):
        c = small_config(tmp_path / str(scan), **{
            "train.frozen": STAGE1_FROZEN, "init.mode": "qwen2", "init.path": str(qwen_dir), "distill.enabled": True,
            "distill.ce_weight": 0.5, "distill.mse_weight": 1.0, "distill.hidden_layers": (1, 3),
            "train.remat": "full", "optim.eps": 1.0, "optim.warmup_steps": 0})
        c.model = model_section("tiny", layer_types=("jet", "jet", "jet", "attn"), dtype="float32",
                                scan_layers=scan)
        runs[scan] = _steps(c, batches)
    assert runs[True][0][0]["mse"] > 1e-4 and runs[True][0][0]["kl"] > 1e-3
    _compare(runs)


def test_scanned_steps_on_a_2x2x2_mesh_match_unrolled_on_one_device(rng):
    out = run_child("tests.train._scanned_sharded_step", rng, timeout=600)
    assert out["sharded_params"] > out["n_params"] // 2, out
    assert out["min_param_change"][0] > 1e-6
    assert out["loss_rel_8"] <= 1e-5
    assert out["param_rel_8"] <= 1e-5


def _final_params(workdir) -> dict:
    from flax import nnx

    from jetnemo_jax.train.partition import path_name

    model = load_model(workdir / "final")
    return {path_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("first", [False, True], ids=["unrolled_then_scanned", "scanned_then_unrolled"])
def test_a_checkpoint_of_either_form_resumes_in_the_other(tmp_path, capsys, first):
    """6 steps, checkpoints at 3 and 6. The run is repeated from its step-3 checkpoint with the other form:
    the restart is accepted without checkpoint.allow_changes and ends on the uninterrupted run's weights."""
    def config(scan):
        c = small_config(tmp_path / "run", **{"train.frozen": "/mlp/", "optim.eps": 1.0})
        c.model = model_section("tiny", layer_types=LAYERS, dtype="float32", scan_layers=scan)
        return c

    run(config(first))
    expected = _final_params(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    shutil.rmtree(tmp_path / "run" / "final")
    capsys.readouterr()
    result = run(config(not first))
    said = capsys.readouterr().out
    assert result["steps"] == 6
    assert "(step 3)" in said and "resumed from" in said and "changed config" not in said, said
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "loss" in r) == list(range(1, 7))  # steps 4-6 once each
    got = _final_params(tmp_path / "run")
    assert set(got) == set(expected)
    worst = max((_rel(got[n], expected[n]), n) for n in expected)
    assert worst[0] <= 1e-5, worst
