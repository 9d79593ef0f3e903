"""The run's resolved config, saved in its workdir (`run_config.json`) and compared on every restart.

A workdir belongs to one run: restarting it with a config that changes the model, the data or the
optimisation would resume checkpoints into a different run (or fail on their shapes), so such a restart is
refused with one line per differing key, unless `checkpoint.allow_changes` lists the keys. What cannot
change the trained numbers (logging, checkpoint cadence, workers, mesh, kernel choice) may always differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

FILE = "run_config.json"

# Keys (or prefixes ending in ".") that may differ between a run and its restart without being listed.
ALWAYS_CHANGEABLE = (
    "workdir", "train.log_every", "train.sample_prompt", "train.sample_tokens", "train.eval_every",
    "train.eval_batches", "checkpoint.keep", "checkpoint.async_save", "checkpoint.allow_changes",
    "data.worker_count", "distributed.", "mesh.", "sharding_rules", "model.gdr_impl", "model.conv_impl",
    "model.scan_layers", "compilation_cache.",
)


class RunConfigMismatch(ValueError):
    """A restart whose config differs from the one the workdir was started with."""


def flatten(config, model_config) -> dict:
    """{dotted key: JSON value} of the run config, with the model section as resolved (every field)."""
    d = config.to_dict()
    d["model"] = dataclasses.asdict(model_config)
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = json.loads(json.dumps(value, default=list))  # tuples -> lists, as saved

    walk("", d)
    return out


def _matches(key: str, patterns) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in patterns)


def differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> now' for every key that differs (and is not always changeable)."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}" for k in keys
            if saved.get(k) != current.get(k) and not _matches(k, ALWAYS_CHANGEABLE)]


def check(workdir: Path, config, model_config, *, has_checkpoint: bool) -> list[str]:
    """Compare with the config the workdir's checkpoints were written under: RunConfigMismatch, or the
    differences that `checkpoint.allow_changes` accepts. With no checkpoint there is nothing to resume."""
    path = Path(workdir) / FILE
    if not (has_checkpoint and path.is_file()):
        return []
    diff = differences(json.loads(path.read_text()), flatten(config, model_config))
    allowed = tuple(filter(None, (p.strip() for p in config.checkpoint.allow_changes.split(","))))
    refused = [d for d in diff if not _matches(d.split(":", 1)[0], allowed)]
    if refused:
        keys = ",".join(d.split(":", 1)[0] for d in refused)
        raise RunConfigMismatch(
            f"{workdir} was started with a different config; its checkpoints are kept as they are.\n  "
            + "\n  ".join(refused)
            + f"\nUse another workdir, or resume with these changes: --config.checkpoint.allow_changes={keys}")
    return diff


def save(workdir: Path, config, model_config) -> None:
    """Record the config the run continues under (atomically: a whole file or the previous one)."""
    path = Path(workdir) / FILE
    tmp = path.with_name(f".{FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(flatten(config, model_config), indent=1, sort_keys=True))
    os.replace(tmp, path)
