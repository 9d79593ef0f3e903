"""Small run configs and subprocess helpers shared by the training tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jetnemo_jax.train.config import default_config
from tests import xla_flags

ROOT = Path(__file__).resolve().parents[2]


def small_config(workdir, **overrides):
    """The tiny model in fp32 on short rows, one layer of each kind (each JetBlock adds ~2 s to a step's compile
    on 2 CPU cores): seconds per run."""
    c = default_config()
    c.workdir = str(workdir)
    c.model.layer_types = ("jet", "attn", "swa")
    c.model.dtype = "float32"
    c.data.seq_len = 32
    c.data.global_batch = 8
    c.train.steps = 6
    c.train.log_every = 1
    c.train.sample_tokens = 0
    c.train.eval_every = 0  # validation has its own tests
    c.checkpoint.every = 3
    c.optim.warmup_steps = 2
    for key, value in overrides.items():
        section, field = key.split(".") if "." in key else (None, key)
        (c[section] if section else c)[field] = value
    return c


def cli_flags(**overrides) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def small_flags(workdir, **overrides) -> list[str]:
    """The command-line run of the loop's tests: small_config's run sizes on two layers (a JetBlock and attention),
    since each layer adds to the step's compile and these tests are about the loop."""
    base = {"workdir": workdir, "model.layer_types": "jet,attn", "model.dtype": "float32", "data.seq_len": 32,
            "data.global_batch": 8,
            "train.steps": 6, "train.log_every": 1, "train.sample_tokens": 0, "train.eval_every": 0,
            "checkpoint.every": 3,
            "optim.warmup_steps": 2}
    return cli_flags(**{**base, **overrides})


def env(**extra) -> dict:
    """A child's environment: this one's, with the XLA flags of the suite's runs only (tests/xla_flags.py) unless
    given."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags.RUNS, **extra}


def train_cmd(flags: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"), *flags]


def run_train(flags: list[str], timeout=600, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(flags), env=env(**env_extra), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def run_child(module: str, rng, timeout=900, **env_extra) -> dict:
    """`python -m module SEED` (a child that sets up its own simulated devices) with a fresh seed from `rng`;
    the JSON it prints after "RESULT "."""
    proc = subprocess.run([sys.executable, "-m", module, str(int(rng.integers(1 << 31)))], cwd=ROOT,
                          env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    print(out)
    return out
