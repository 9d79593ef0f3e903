"""Context parallelism (issue 25): every sequence split over a `context` mesh axis gives the one-device train
step: loss and the gradient of every parameter, for the hybrid (jet, attn, swa), packed documents whose
boundaries fall inside shards and on their edges, a window longer than a shard and T = 72 (no multiple of the
64-token chunks), and with the blocked attention (no [T, T] mask). Ops-level checks of the hand-off:
tests/ops/test_context.py."""

import json

import pytest

from tests.train.runs import run_child
from tests.xla_flags import with_host_devices


@pytest.mark.slow
def test_context_4_8_and_fsdp_x_context_match_one_device(rng):
    out = run_child("tests.train._context_step", rng)
    assert out["min_grad"] > 1e-8  # every parameter has a gradient: comparing them means something
    for name in ("context8", "fsdp2_context4", "context4_blocked"):
        assert out[name]["token_spec"] == "P(('data', 'fsdp'), 'context')"
        assert out[name]["loss_rel"] <= 1e-5, (name, out[name])
        assert out[name]["grad_rel"] <= 1e-4, (name, out[name])  # every parameter's gradient


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "step" in r]


@pytest.mark.slow
def test_train_py_with_context_4_follows_context_1(tmp_path):
    """The README's command on 4 simulated devices: the tiny default run (bf16 compute) on one layer of each
    kind, 4 steps, with every sequence in 4 shards, against the same devices without context (FSDP over 4)."""
    from tests.train.runs import run_train

    flags = ["--config.train.steps=4", "--config.train.log_every=1", "--config.train.sample_tokens=0",
             "--config.train.eval_every=0", "--config.model.layer_types=jet,swa,attn"]
    four = dict(XLA_FLAGS=with_host_devices(4), JAX_PLATFORMS="cpu")
    runs = {}
    for context in (1, 4):
        workdir = tmp_path / f"context{context}"
        out = run_train([f"--config.workdir={workdir}", f"--config.mesh.context={context}", *flags], **four)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[context] = _losses(workdir)
    assert "'context': 4" in out.stdout  # the mesh line
    assert len(runs[1]) == len(runs[4]) == 4
    for a, b in zip(runs[4], runs[1]):
        assert abs(a / b - 1) <= 1e-4, (runs[4], runs[1])

    bad = run_train([f"--config.workdir={tmp_path / 'bad'}", "--config.mesh.context=4", "--config.data.seq_len=126",
                     *flags], **four)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
    assert "data.seq_len=126 must be a multiple of the context-parallel devices (4)" in lines[0]
