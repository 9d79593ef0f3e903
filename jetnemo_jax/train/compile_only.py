"""Compile the train step ahead of time for a TPU topology on this (CPU) machine (MaxText's train_compile).

Proves that the sharding, the step and its kernels lower for a pod, multi-host and multislice included,
and reports per-chip memory before any TPU is used. Needs libtpu (`pip install 'jax[tpu]'`).

Compile times: cold (the first compile) and, with `warm=True`, warm (the same program again after JAX's
in-memory caches are cleared: what the persistent compilation cache serves, as a restart would get it). JAX
0.10 writes a topology-compiled program to the persistent cache but cannot load it back without the TPU
client ("PjRtCompiler must be constructed with a Client"): the warm compile then compiles again, and the
report says so. Without `warm` the persistent cache is off here (nothing could read what it would write).
"""

from __future__ import annotations

import re
import time
import warnings

import jax
from jax.experimental import topologies

from jetnemo_jax import compilation_cache, sharding
from jetnemo_jax.cli import UserError
from jetnemo_jax.train.config import check_keys
from jetnemo_jax.train.program import build

GiB = 1 << 30


def topology_devices(topology: str, num_slices: int = 1):
    if not re.fullmatch(r"[A-Za-z0-9_ ]+[:=_][0-9]+(x[0-9]+)*", topology):
        raise UserError(f"--compile_only={topology!r}: expected a TPU topology as chip:dims, e.g. v5p:4x4x4 or "
                        "v5e:4x4")
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                            **({"num_slices": num_slices} if num_slices > 1 else {}))
    except Exception as e:  # libtpu missing, or a chip or shape it does not know
        cause = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise UserError(f"--compile_only={topology!r} x{num_slices} slices: cannot describe this TPU topology "
                        f"({cause}); check the chip name and shape, and that libtpu is installed "
                        "(pip install 'jax[tpu]')") from e
    return topo.devices


def timed_compile(lower) -> tuple[object, float, dict]:
    """(compiled, seconds, what compiling did: compilation_cache.since, plus "read_error": JAX's warning when
    it found the program in the persistent cache but could not load it) of lower().compile()."""
    before = compilation_cache.counters()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = lower().compile()
    seconds = time.perf_counter() - t0
    delta = compilation_cache.since(before)
    delta["read_error"] = None
    for w in caught:
        text = str(w.message)
        if "persistent compilation cache" in text and "Error reading" in text:
            delta["read_error"] = text.split(": ", 1)[-1].splitlines()[0]
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return compiled, seconds, delta


def served(delta: dict) -> str:
    if not delta["requests"]:
        return "persistent cache off"
    if delta["misses"] == 0:
        return "from the persistent cache"
    if delta["read_error"]:
        return f"compiled: the persistent cache holds it but JAX could not load it ({delta['read_error']})"
    return "compiled: not in the persistent cache"


def compile_for_topology(config, topology: str, *, num_slices: int = 1, verbose: bool = True,
                         warm: bool = False) -> dict:
    check_keys(config)
    if not warm:
        compilation_cache.setup(enabled=False)
    devices = topology_devices(topology, num_slices)
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    program = build(config, mesh)
    d = config.data
    args = (program.abstract_state, program.abstract_frozen, program.abstract_teacher,
            program.abstract_batch(d.global_batch, d.seq_len))
    try:
        compiled, seconds, cold = timed_compile(lambda: program.step_fn.lower(*args))
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        reason = str(e).split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0].rstrip(".")
        raise UserError(f"the train step does not fit {topology} (mesh {dict(mesh.shape)}, global batch "
                        f"{d.global_batch} x {d.seq_len}): {reason}; try model.scan_layers, train.remat=full, "
                        "more chips or mesh.context") from e
    warm_s, warm_d = None, None
    if warm:
        jax.clear_caches()  # in-memory: the second compile goes to the persistent cache (or XLA again)
        _, warm_s, warm_d = timed_compile(lambda: program.step_fn.lower(*args))
    mem = compiled.memory_analysis()
    per_chip = {k: getattr(mem, f"{k}_size_in_bytes") for k in ("argument", "output", "temp", "alias",
                                                                 "generated_code")}
    per_chip["total"] = per_chip["argument"] + per_chip["output"] + per_chip["temp"] - per_chip["alias"]
    hosts = len({dev.process_index for dev in devices})
    report = {"topology": topology, "slices": num_slices, "chips": len(devices), "hosts": hosts,
              "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "compile_s": seconds,
              "compile_s_cold": seconds, "cold_from_cache": cold["requests"] > 0 and cold["misses"] == 0,
              "compile_s_warm": warm_s, "warm_from_cache": None if warm_d is None else
              (warm_d["requests"] > 0 and warm_d["misses"] == 0), "compilation_cache": compilation_cache.active(),
              "per_chip_bytes": per_chip, "pallas_calls": compiled.as_text().count("tpu_custom_call")}
    if verbose:
        print(f"compiled the train step for {topology} x{num_slices} slice(s): {len(devices)} chips "
              f"({devices[0].device_kind}) on {hosts} hosts, mesh {dict(mesh.shape)}, in {seconds:.1f} s")
        print(f"compile cold {seconds:.1f} s ({served(cold)})" + ("" if warm_d is None else
              f", warm {warm_s:.1f} s ({served(warm_d)})") + f"; cache {compilation_cache.active() or 'off'}")
        print("per chip: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in per_chip.items()))
        print(f"Pallas (Mosaic) kernel calls in the step: {report['pallas_calls']}")
    return report
