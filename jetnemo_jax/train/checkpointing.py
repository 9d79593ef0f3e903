"""Orbax checkpoints of a run: the train state and the data iterator's position every N steps (async,
keep-last-N), and the frozen parameters (and the teacher's own) once per run.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a process killed
mid-save leaves only complete checkpoints behind. Restoring tries the newest first and falls back to older
ones, reporting each one that fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """The run's checkpoints were written by a model of other shapes."""


class CheckpointUnreadable(ValueError):
    """No checkpoint of the run restores."""


@contextlib.contextmanager
def _native_noise_to(log: Path):
    """Send file descriptor 2 to `log` while a restore runs (the log is kept if anything was written). When a
    read fails, TensorStore's threads go on completing the other reads into Orbax's closed event loop, each
    printing a traceback ("Event loop is closed"): hundreds of lines the one-line report says better."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        # Abandoned reads finish after the failure: wait until the log stops growing before restoring fd 2.
        size, deadline = -1, time.monotonic() + 20
        while log.stat().st_size and log.stat().st_size != size and time.monotonic() < deadline:
            size = log.stat().st_size
            time.sleep(0.5)
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if log.stat().st_size == 0:
            log.unlink()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class RunCheckpoints:
    def __init__(self, workdir: Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.frozen_directory = Path(workdir).absolute() / "frozen"
        self.every = every
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                                 enable_async_checkpointing=async_save, create=True))

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state, data_iterator):
        """(step, state) of the newest checkpoint that restores, or (None, None) if there is none.

        A checkpoint whose parameter shapes differ from `abstract_state` was written by another config: that
        is an error (CheckpointMismatch), and nothing is touched. A checkpoint that fails to restore while an
        older one restores is corrupt: it is moved aside (renamed, never deleted) and reported in one line.
        If none restores, nothing is moved and the newest one's error is raised.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None, None
        failed, log = [], self.directory.parent / "restore_errors.log"
        with _native_noise_to(log):
            self._check_shapes(steps[0], abstract_state)
        for s in steps:
            try:
                with _native_noise_to(log):
                    out = self.manager.restore(s, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iterator)))
            except Exception as e:  # corrupt, partial, or unreadable: decided once an older one restores
                failed.append((s, e))
                continue
            for bad, err in failed:
                aside = self._move_aside(bad)
                if jax.process_index() == 0:
                    print(f"checkpoint step {bad} is unreadable ({_first_line(err)}); moved it to {aside.name} "
                          f"and resumed from step {s}", flush=True)
            return s, out["state"]
        s, e = failed[0]
        raise CheckpointUnreadable(f"no checkpoint in {self.directory} restores (step {s}: {_first_line(e)}); "
                                   f"nothing was moved (details: {log})")

    def _check_shapes(self, step: int, abstract_state) -> None:
        """CheckpointMismatch naming the trainable parameters whose saved shape differs (or that one side lacks)."""
        try:
            with ocp.StandardCheckpointer() as ckptr:
                saved = ckptr.metadata(self.directory / str(step) / "state").item_metadata.tree
        except Exception:  # noqa: BLE001 - unreadable metadata is corruption, handled by the restore loop
            return
        # The trainable parameters (a flat dict by path name) say it; optimizer state trees follow them.
        want = {n: tuple(a.shape) for n, a in abstract_state["params"].items()}
        have = {n: tuple(a.shape) for n, a in (saved.get("params") or {}).items() if hasattr(a, "shape")}
        diff = [f"{n}: saved {have.get(n, '(absent)')} != model {want.get(n, '(absent)')}"
                for n in sorted(set(want) | set(have)) if want.get(n) != have.get(n)]
        if diff:
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise CheckpointMismatch(f"checkpoint step {step} in {self.directory} was written by a different model "
                                     f"config; nothing was changed: " + "; ".join(diff[:3]) + more)

    def _move_aside(self, step: int) -> Path:
        """Rename a bad checkpoint so the run can save that step again; nothing is deleted."""
        aside = self.directory / f"{step}.failed-{int(time.time())}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()
        return aside

    def has_frozen(self) -> bool:
        return self.frozen_directory.exists()

    def save_frozen(self, tree) -> None:
        """Written at every fresh start (replacing what a run that crashed before its first checkpoint left);
        Orbax writes to a temporary directory and renames it when complete."""
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(self.frozen_directory, tree, force=True)

    def restore_frozen(self, abstract_tree):
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(self.frozen_directory, abstract_tree)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
