"""Orbax checkpoints of a run: the train state and the data iterator's position every N steps (async,
keep-last-N), and the frozen parameters (and the teacher's own) once per run.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a process killed
mid-save leaves only complete checkpoints behind. Restoring tries the newest first and falls back to older
ones, reporting each one that fails.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


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
        """(step, state) of the newest checkpoint that restores, or (None, None) if there is none."""
        for s in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator)))
            except Exception as e:  # a corrupt or partial checkpoint: report it, use the previous one
                aside = self._move_aside(s)
                msg = (f"checkpoint step {s} failed to restore ({type(e).__name__}: {e}); moved to {aside}, "
                       "trying the previous one")
                log.error(msg)
                if jax.process_index() == 0:
                    print(msg, flush=True)
                continue
            return s, out["state"]
        return None, None

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
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(self.frozen_directory, tree)

    def restore_frozen(self, abstract_tree):
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(self.frozen_directory, abstract_tree)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
