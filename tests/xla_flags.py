"""XLA flags of the suite's processes (this one, set in conftest, and every child it starts).

On a CPU-only install XLA's LLVM backend runs at -O0: the suite is compile-bound (tiny models, hundreds of
programs), and -O0 took a compile-heavy test from 85 to 50 s on 2 cores; both sides of every comparison compile
alike. With a CUDA plugin installed (the suite on a GPU) nothing is added."""

import importlib.util

_CUDA = any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
BASE = "" if _CUDA else "--xla_backend_optimization_level=0"


def with_host_devices(n: int) -> str:
    """BASE and `n` simulated CPU devices."""
    return f"{BASE} --xla_force_host_platform_device_count={n}".strip()
