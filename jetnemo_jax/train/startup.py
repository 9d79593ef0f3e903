"""Time to first step: from the process's start to the end of the run's first step, in phases.

    imports  process start -> the run begins (interpreter, JAX and the project's imports, flags, config)
    init     mesh, program, checkpoints: model initialisation or checkpoint restore, and the rest of set-up
    data     tokenizer, sources and pipeline opened, and the first batch read
    compile  the first step: tracing, compiling (or reading the persistent cache) and running it

with what compiling cost since the process started (JAX's own measure: tracing, lowering and XLA, or the
cache's read) and what the persistent compilation cache served.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from jetnemo_jax import compilation_cache

_IMPORTED = time.time()


def process_start() -> float:
    """The process's start as a time.time() value: Linux's start time (10 ms ticks since boot), else psutil's,
    else when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started_after_boot
        if 0 <= age < time.time() - _IMPORTED + 3600:  # sane (no clock or namespace surprise)
            return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:
        return _IMPORTED


PHASES = ("imports", "init", "data", "compile")


class StartupClock:
    """Started where the run begins; `phase("data")` / `phase("compile")` time those regions, finish() at the end
    of the first step; init is the rest."""

    def __init__(self):
        self.process_start = process_start()
        self.run_start = time.time()
        self.seconds = {"data": 0.0, "compile": 0.0}
        self.result: dict | None = None
        compilation_cache.counters()  # its listeners, if the command line did not set the cache up

    @contextmanager
    def phase(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t0

    def finish(self) -> dict:
        """The first step ended: metrics.jsonl's fields (every value a number, except compile_cache)."""
        if self.result is not None:
            return self.result
        now = time.time()
        total = now - self.process_start
        imports = self.run_start - self.process_start
        init = max(0.0, now - self.run_start - self.seconds["data"] - self.seconds["compile"])
        c = compilation_cache.since({})
        directory = compilation_cache.active()
        self.result = {
            "time_to_first_step_s": total, "startup_imports_s": imports, "startup_init_s": init,
            "startup_data_s": self.seconds["data"], "startup_compile_s": self.seconds["compile"],
            "compile_s": c["compile_s"], "compile_cache_hits": c["hits"], "compile_cache_misses": c["misses"],
            "compile_cache": directory if directory is not None else "off"}
        return self.result


def line(r: dict) -> str:
    """One line for the console."""
    cache = r["compile_cache"]
    if cache == "off":
        served = "persistent compilation cache off"
    elif r["compile_cache_hits"] + r["compile_cache_misses"] == 0:
        served = f"persistent compilation cache {cache}: not asked"
    elif r["compile_cache_misses"] == 0:
        served = f"all {r['compile_cache_hits']} programs from the persistent cache {cache}"
    else:
        served = (f"{r['compile_cache_misses']} programs compiled, {r['compile_cache_hits']} from the persistent "
                  f"cache {cache}")
    return (f"time to first step {r['time_to_first_step_s']:.1f} s: imports {r['startup_imports_s']:.1f} s, init "
            f"{r['startup_init_s']:.1f} s, data {r['startup_data_s']:.1f} s, first step {r['startup_compile_s']:.1f} s"
            f" (JAX compile time {r['compile_s']:.1f} s; {served})")
