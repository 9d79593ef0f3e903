"""The persistent compilation cache (on by default) and the time to first step: a second run of the same config,
pointed at the same cache directory, compiles nothing and logs its start-up in metrics.jsonl."""

import json

import jax
import jax.numpy as jnp
import pytest

from jetnemo_jax import compilation_cache
from jetnemo_jax.train.config import default_config
from tests.train.runs import run_train, small_flags

PHASES = ("startup_imports_s", "startup_init_s", "startup_data_s", "startup_compile_s")


def _first_row(workdir):
    return json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])


def test_second_run_is_served_by_the_cache_and_logs_its_time_to_first_step(tmp_path):
    cache = tmp_path / "cache"
    flags = {"train.steps": 1, "checkpoint.every": 1, "compilation_cache.dir": cache}
    rows, outs = [], []
    for name in ("cold", "warm"):
        out = run_train(small_flags(tmp_path / name, **flags))
        assert out.returncode == 0, out.stderr[-3000:]
        rows.append(_first_row(tmp_path / name))
        outs.append(out.stdout)
    cold, warm = rows
    for r, out in zip(rows, outs):
        assert r["step"] == 1 and "loss" in r and r["compile_cache"] == str(cache)
        assert all(r[k] >= 0 for k in PHASES) and r["startup_imports_s"] > 0 and r["startup_compile_s"] > 0
        assert abs(sum(r[k] for k in PHASES) - r["time_to_first_step_s"]) < 0.01
        assert out.count(f"time to first step {r['time_to_first_step_s']:.1f} s") == 2  # at step 1 and the end
    assert cold["compile_cache_hits"] == 0 and cold["compile_cache_misses"] > 0
    # The second process compiles nothing: every program the first compiled comes from the cache.
    assert warm["compile_cache_misses"] == 0 and warm["compile_cache_hits"] == cold["compile_cache_misses"]
    assert f"all {warm['compile_cache_hits']} programs from the persistent cache {cache}" in outs[1]
    assert warm["compile_s"] < cold["compile_s"]  # reading a program back costs less than compiling it


@pytest.fixture
def restore_jax_cache_settings():
    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    compilation_cache._reset()
    compilation_cache._active = None


def test_config_key_turns_the_cache_off(tmp_path, restore_jax_cache_settings):
    on = default_config().compilation_cache
    on.dir = str(tmp_path / "cache")
    assert compilation_cache.setup_from_config(on) == on.dir
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).block_until_ready()
    written = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert written  # every program is cached, the smallest too

    off = default_config().compilation_cache
    off.dir, off.enabled = str(tmp_path / "cache"), False
    assert compilation_cache.setup_from_config(off) is None and compilation_cache.active() is None
    assert jax.config.jax_compilation_cache_dir is None
    before = compilation_cache.counters()
    jax.jit(lambda x: x * 5 - 2)(jnp.arange(7.0)).block_until_ready()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == written  # off: nothing written
    assert compilation_cache.since(before)["requests"] == 0  # nor asked


def test_where_the_cache_lives(tmp_path, monkeypatch):
    monkeypatch.delenv(compilation_cache.ENV_DIR, raising=False)
    monkeypatch.delenv(compilation_cache.ENV_ENABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.resolve() == str(tmp_path / "xdg" / "jetnemo_jax" / "jax_compilation_cache")
    monkeypatch.setenv(compilation_cache.ENV_DIR, str(tmp_path / "env"))  # the user's JAX setting
    assert compilation_cache.resolve() == str(tmp_path / "env")
    assert compilation_cache.resolve(str(tmp_path / "key")) == str(tmp_path / "key")  # the config key wins
    assert compilation_cache.resolve("gs://bucket/cache") == "gs://bucket/cache"  # shared storage, as given
    assert compilation_cache.resolve("off") is None
    assert compilation_cache.resolve(str(tmp_path / "key"), enabled=False) is None
    monkeypatch.setenv(compilation_cache.ENV_ENABLE, "false")  # JAX's own off switch
    assert compilation_cache.resolve() is None
