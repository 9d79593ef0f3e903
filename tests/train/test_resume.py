"""Crash safety: kill -9 mid-run, resume from the same workdir, and the loss trajectory is the uninterrupted
run's, exactly (CPU). The newest checkpoint is corrupted before resuming, so the fallback to the previous
one is exercised too; frozen weights come back from their once-per-run checkpoint."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.runs import ROOT, env, run_train, small_flags, train_cmd

STEPS = 18  # room after the kill at step 6-8 (0.2-0.4 s a step)
FLAGS = {"train.steps": STEPS, "checkpoint.every": 3, "train.frozen": "/mlp/", "checkpoint.keep": 5}


def saved_steps(workdir: Path) -> list[int]:
    """Complete checkpoints (Orbax renames a checkpoint to its step number when it is finalised)."""
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def losses(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_loss_trajectory(tmp_path):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    done = run_train(small_flags(ref, **FLAGS))
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(train_cmd(small_flags(crashed, **FLAGS)), env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if len(saved_steps(crashed)) >= 2:  # two complete checkpoints, and the run goes on
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = saved_steps(crashed)
    assert len(steps) >= 2, steps
    assert max(losses(crashed)) < STEPS
    # Corrupt the newest checkpoint: the resume must report it and use the one before.
    newest = crashed / "checkpoints" / str(max(steps)) / "state"
    shutil.rmtree(newest)
    resumed = run_train(small_flags(crashed, **FLAGS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint step {max(steps)} is unreadable" in resumed.stdout
    said = resumed.stdout + resumed.stderr  # one line, not a TensorStore dump or asyncio noise
    assert said.count("unreadable") == 1 and "Traceback" not in said and "Event loop is closed" not in said, said
    assert f"and resumed from step {steps[-2]}" in resumed.stdout
    assert f"resumed from {crashed / 'checkpoints'}/{steps[-2]}" in resumed.stdout
    assert (crashed / "frozen").is_dir()
    assert losses(crashed) == losses(ref)  # exact: same data stream, same state, same program
    logged = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)), "replayed steps are logged once"
    assert (crashed / "final" / "config.json").is_file() and (crashed / "loss.png").is_file()


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resume_finishes(tmp_path):
    run_dir = tmp_path / "preempted"
    flags = small_flags(run_dir, **{**FLAGS, "checkpoint.every": 1000})  # only SIGTERM and the end save
    proc = subprocess.Popen(train_cmd(flags), env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 3:
            break
        time.sleep(0.02)
    proc.terminate()  # SIGTERM, as a scheduler or a TPU preemption sends
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + 15, out[-2000:]  # 128 + SIGTERM: stopped and resumable, not finished
    step = saved_steps(run_dir)[-1]
    assert f"SIGTERM: saved step {step}" in out and 3 <= step < STEPS
    resumed = run_train(flags)
    assert resumed.returncode == 0 and f"resumed from {run_dir / 'checkpoints'}/{step}" in resumed.stdout
