"""Two processes on localhost (jax.distributed, gloo collectives), one CPU device each, train the same
global batches as one process does (data.num_shards=2 fixes the batch composition) and match its losses."""

import json
import socket
import subprocess

import pytest

from tests.train.runs import ROOT, env, run_train, small_flags, train_cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_run_matches_one_process(tmp_path):
    common = {"data.num_shards": 2, "train.steps": 4, "checkpoint.every": 2}
    one = run_train(small_flags(tmp_path / "one", **common), JAX_PLATFORMS="cpu")
    assert one.returncode == 0, one.stderr[-3000:]

    port = _free_port()
    procs = [subprocess.Popen(
        train_cmd(small_flags(tmp_path / "two", **common, **{
            "distributed.mode": "on", "distributed.coordinator_address": f"127.0.0.1:{port}",
            "distributed.num_processes": 2, "distributed.process_id": i})),
        env=env(JAX_PLATFORMS="cpu"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outs[0][0]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
    assert a[-1] < a[0]
