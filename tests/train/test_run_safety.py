"""No lost work and no silent nonsense on restart, Ctrl-C and small data (the real CLI)."""

import json
import signal
import subprocess
import time

import pytest

from tests.train.runs import ROOT, env, run_train, small_flags, train_cmd


def _tree(directory):
    return sorted((p.name, p.stat().st_mtime_ns) for p in directory.iterdir())


def _metric_steps(workdir):
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.mark.slow
def test_restart_with_another_config_is_refused_and_keeps_every_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    first = run_train(small_flags(workdir, **{"train.steps": 3}), JAX_PLATFORMS="cpu")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts, final = _tree(workdir / "checkpoints"), _tree(workdir / "final")

    changed = run_train(small_flags(workdir, **{"train.steps": 3, "model.hidden_size": 64}), JAX_PLATFORMS="cpu")
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert "model.hidden_size: 128 -> 64" in changed.stderr and "Traceback" not in changed.stderr
    assert "Event loop is closed" not in changed.stderr + changed.stdout
    # More steps change the schedule: they need consent, then the run resumes where it was.
    longer = run_train(small_flags(workdir, **{"train.steps": 6}), JAX_PLATFORMS="cpu")
    assert longer.returncode == 2 and "--config.checkpoint.allow_changes=train.steps" in longer.stderr, longer.stderr
    assert _tree(workdir / "checkpoints") == ckpts and _tree(workdir / "final") == final

    # Without the saved run config, the checkpoint's own shapes still tell a different model from corruption.
    saved = (workdir / "run_config.json").read_text()
    (workdir / "run_config.json").unlink()
    shapes = run_train(small_flags(workdir, **{"train.steps": 3, "model.hidden_size": 64}), JAX_PLATFORMS="cpu")
    assert shapes.returncode == 2 and "written by a different model config" in shapes.stderr, shapes.stderr[-3000:]
    assert _tree(workdir / "checkpoints") == ckpts
    (workdir / "run_config.json").write_text(saved)

    resumed = run_train(small_flags(workdir, **{"train.steps": 6, "checkpoint.allow_changes": "train.steps"}),
                        JAX_PLATFORMS="cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'}/3" in resumed.stdout and "train.steps: 3 -> 6" in resumed.stdout
    assert _metric_steps(workdir) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_ctrl_c_saves_then_exits_130_and_the_resume_has_each_step_once(tmp_path):
    workdir = tmp_path / "run"
    flags = small_flags(workdir, **{"train.steps": 16, "checkpoint.every": 1000})
    proc = subprocess.Popen(train_cmd(flags), env=env(JAX_PLATFORMS="cpu"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and len(_metric_steps(workdir)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "SIGINT: saved step" in out, out[-2000:]
    saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    # A row the interrupted run logged after its save is replayed by the resume: metrics hold it once.
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": saved + 1, "loss": 99.0}) + "\n")
    resumed = run_train(flags, JAX_PLATFORMS="cpu")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _metric_steps(workdir) == list(range(1, 17))


def test_small_data_warns_and_validation_is_logged_everywhere(tmp_path):
    ref = tmp_path / "ref"
    first = run_train(small_flags(ref, **{"train.steps": 4, "train.eval_every": 2, "train.eval_batches": 2}),
                      JAX_PLATFORMS="cpu")
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_loss"] > 0 and r["eval_tokens"] > 0 for r in evals)
    assert "validation loss" in first.stdout and (ref / "loss.png").is_file()
    assert any(p.name.startswith("events") for p in (ref / "tensorboard").iterdir())
    final_config = json.loads((ref / "final" / "config.json").read_text())
    assert final_config["eos_token_id"] is not None and "auto_map" not in final_config

    small = tmp_path / "small.txt"
    small.write_text("a few words of text")
    out = run_train(small_flags(tmp_path / "small", **{"data.source": str(small), "data.tokenizer": str(ref / "final"),
                                                       "train.steps": 1, "checkpoint.every": 1}),
                    JAX_PLATFORMS="cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fewer than one batch (8 x 32 = 256)" in out.stdout, out.stdout


def test_a_crash_before_the_first_checkpoint_restarts_with_the_same_command(tmp_path):
    """Everything written before training (run config, frozen weights) is atomic or reused on restart."""
    workdir = tmp_path / "run"
    flags = small_flags(workdir, **{"train.steps": 4, "checkpoint.every": 1000, "train.frozen": "/mlp/"})
    proc = subprocess.Popen(train_cmd(flags), env=env(JAX_PLATFORMS="cpu"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (workdir / "frozen").is_dir():
        time.sleep(0.02)
    proc.kill()  # SIGKILL after the frozen weights are written, before any checkpoint
    proc.wait()
    assert (workdir / "frozen").is_dir() and not list((workdir / "checkpoints").glob("[0-9]*"))
    again = run_train(flags, JAX_PLATFORMS="cpu")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already exists" not in again.stderr and (workdir / "final" / "config.json").is_file()
    assert _metric_steps(workdir) == [1, 2, 3, 4]
