"""Wall-clock timing shared by the bench/ scripts (run as `python bench/<script>.py`, so bench/ is on sys.path)."""

from __future__ import annotations

import time

import jax


def synced_times(fn, *args, reps: int = 10, warmup: int = 2, sync=jax.block_until_ready) -> list[float]:
    """Seconds of each of `reps` calls of fn(*args), each waited for with `sync`, after `warmup` calls (the first
    compiles). `sync` is the framework's wait (e.g. torch.cuda.synchronize around a torch call)."""
    for _ in range(warmup):
        sync(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sync(fn(*args))
        times.append(time.perf_counter() - start)
    return times
