"""JAX's persistent compilation cache, on by default for every command line (train.py, PostNAS, generate,
perplexity), and counters of what compiling cost and what the cache served.

The directory, in order: the config key or flag (`compilation_cache.dir`, `--compilation-cache DIR`), else
$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/jetnemo_jax/jax_compilation_cache (~/.cache/...), shared by
every run of this user. A pod can point it at shared storage (a gs:// path: JAX reads it through etils).
`off` (or `compilation_cache.enabled=False`, or JAX_ENABLE_COMPILATION_CACHE=false) turns it off. Every
program is cached, the small ones too (no minimum compile time or entry size): a restart then compiles
nothing that an earlier run of the same config compiled.

The counters listen to JAX's monitoring events (`jax.monitoring`, the same names in jax 0.10 and 0.11): a
JAX without them leaves the counts at zero, nothing fails.
"""

from __future__ import annotations

import os
import sys
import threading

ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
ENV_ENABLE = "JAX_ENABLE_COMPILATION_CACHE"
OFF = ("off", "none", "false", "0", "no")
_THRESHOLDS = {"jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": -1}

_HIT = "/jax/compilation_cache/cache_hits"
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_DURATIONS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
              "/jax/core/compile/backend_compile_duration": "backend_s"}  # XLA, or the cache's read on a hit


def default_dir() -> str:
    """$JAX_COMPILATION_CACHE_DIR, else the user's cache directory."""
    if os.environ.get(ENV_DIR):
        return os.environ[ENV_DIR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jetnemo_jax", "jax_compilation_cache")


def resolve(directory: str = "", enabled: bool = True) -> str | None:
    """The directory a setting means, or None when the cache is off. `directory`: "" for the default, a path
    (local, or a URL such as gs://bucket/cache), or "off"."""
    directory = (directory or "").strip()
    if not enabled or directory.lower() in OFF:
        return None
    if not directory and os.environ.get(ENV_ENABLE, "").strip().lower() in ("0", "false", "no", "off"):
        return None  # the user turned JAX's cache off
    directory = directory or default_dir()
    return directory if "://" in directory else os.path.abspath(os.path.expanduser(directory))


_active: str | None = None


def setup(directory: str = "", enabled: bool = True) -> str | None:
    """Turn the persistent cache on in `directory` (resolve's meaning) or off; returns the directory in use.
    Call it before the first compilation: a cache set up later still serves the compilations after it."""
    global _active
    import jax

    counters()  # listeners from here on
    path = resolve(directory, enabled)
    if path is not None and "://" not in path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            print(f"warning: compilation cache {path}: {e.strerror or e}; running without it", file=sys.stderr,
                  flush=True)
            path = None
    if path is not None:  # cache every program (a user's JAX_PERSISTENT_CACHE_* settings stay): the small
        for name, value in _THRESHOLDS.items():  # ones are most of a start-up's compilations
            if name.upper() not in os.environ:
                jax.config.update(name, value)
    changed = (jax.config.jax_compilation_cache_dir != path
               or jax.config.jax_enable_compilation_cache != (path is not None))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_enable_compilation_cache", path is not None)  # off: JAX does not even ask it
    if changed:
        _reset()  # JAX decides once per process, at its first compilation: decide again
    _active = path
    return path


def setup_from_config(section) -> str | None:
    """setup() per a config's `compilation_cache` section ({"enabled", "dir"}; None: the defaults)."""
    section = section or {}
    return setup(section.get("dir", "") or "", bool(section.get("enabled", True)))


def active() -> str | None:
    """The directory setup() put in use (None: off, or setup() not called)."""
    return _active


def _reset() -> None:
    try:
        from jax.experimental.compilation_cache import compilation_cache as cc

        cc.reset_cache()
    except Exception:  # an older or newer JAX without it: the setting applies from its next initialisation
        pass


# ------------------------------------------------------------------------------------------------ counters
class _Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.values = {"requests": 0, "hits": 0, "trace_s": 0.0, "lower_s": 0.0, "backend_s": 0.0}

    def on_event(self, event: str, **kwargs) -> None:
        key = "hits" if event == _HIT else "requests" if event == _REQUEST else None
        if key:
            with self.lock:
                self.values[key] += 1

    def on_duration(self, event: str, duration_secs: float, **kwargs) -> None:
        key = _DURATIONS.get(event)
        if key:
            with self.lock:
                self.values[key] += float(duration_secs)


_counters: _Counters | None = None
_install_lock = threading.Lock()


def counters() -> dict:
    """Totals since the first call in this process: {"requests" (compilations that asked the persistent
    cache), "hits", "trace_s", "lower_s", "backend_s" (XLA compiling, or reading the cache on a hit)}."""
    global _counters
    with _install_lock:
        if _counters is None:
            _counters = _Counters()
            try:
                from jax import monitoring

                monitoring.register_event_listener(_counters.on_event)
                monitoring.register_event_duration_secs_listener(_counters.on_duration)
            except Exception:  # no monitoring API: counts stay at zero
                pass
    with _counters.lock:
        return dict(_counters.values)


def since(before: dict) -> dict:
    """What compiling did since `before` (a counters() snapshot): the counts, "misses" (compilations the cache
    did not serve: XLA compiled them) and "compile_s" (tracing + lowering + XLA or the cache's read)."""
    now = counters()
    d = {k: now[k] - before.get(k, 0) for k in now}
    d["misses"] = d["requests"] - d["hits"]
    d["compile_s"] = d["trace_s"] + d["lower_s"] + d["backend_s"]
    return d

