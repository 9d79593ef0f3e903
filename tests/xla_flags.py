"""XLA flags of the suite's processes (this one, set in conftest, and every child it starts).

On a CPU-only install XLA's LLVM backend runs at -O0 (BASE): the suite is compile-bound (tiny models, hundreds
of programs), and -O0 took a compile-heavy test from 85 to 50 s on 2 cores. train.py's children run at -O1
(RUNS, below). Both sides of every comparison compile alike. With a CUDA plugin installed (the suite on a GPU)
nothing is added."""

import importlib.util

_CUDA = any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
BASE = "" if _CUDA else "--xla_backend_optimization_level=0"
# train.py's children run tens of steps, so their run time counts too: at -O1 a tiny step takes 0.16 s instead of
# 0.4 s at -O0, for the same compile (13-14 s); the kill -9 resume test went from 111 to 80 s.
RUNS = "" if _CUDA else "--xla_backend_optimization_level=1"


def with_host_devices(n: int) -> str:
    """BASE and `n` simulated CPU devices."""
    return f"{BASE} --xla_force_host_platform_device_count={n}".strip()
