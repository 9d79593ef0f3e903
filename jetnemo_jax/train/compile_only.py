"""Compile the train step ahead of time for a TPU topology on this (CPU) machine (MaxText's train_compile).

Proves that the sharding, the step and its kernels lower for a pod, multi-host and multislice included,
and reports per-chip memory before any TPU is used. Needs libtpu (`pip install 'jax[tpu]'`).
"""

from __future__ import annotations

import time

from jax.experimental import topologies

from jetnemo_jax import sharding
from jetnemo_jax.train.config import check_keys
from jetnemo_jax.train.program import build

GiB = 1 << 30


def topology_devices(topology: str, num_slices: int = 1):
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                            **({"num_slices": num_slices} if num_slices > 1 else {}))
    except Exception as e:  # libtpu missing, or a name it does not know
        raise RuntimeError(f"cannot describe TPU topology {topology!r} x{num_slices} ({type(e).__name__}: {e}); "
                           "is libtpu installed (pip install 'jax[tpu]')?") from e
    return topo.devices


def compile_for_topology(config, topology: str, *, num_slices: int = 1, verbose: bool = True) -> dict:
    check_keys(config)
    devices = topology_devices(topology, num_slices)
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    program = build(config, mesh)
    d = config.data
    args = (program.abstract_state, program.abstract_frozen, program.abstract_teacher,
            program.abstract_batch(d.global_batch, d.seq_len))
    t0 = time.perf_counter()
    compiled = program.step_fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_chip = {k: getattr(mem, f"{k}_size_in_bytes") for k in ("argument", "output", "temp", "alias",
                                                                 "generated_code")}
    per_chip["total"] = per_chip["argument"] + per_chip["output"] + per_chip["temp"] - per_chip["alias"]
    hosts = len({dev.process_index for dev in devices})
    report = {"topology": topology, "slices": num_slices, "chips": len(devices), "hosts": hosts,
              "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "compile_s": seconds,
              "per_chip_bytes": per_chip, "pallas_calls": compiled.as_text().count("tpu_custom_call")}
    if verbose:
        print(f"compiled the train step for {topology} x{num_slices} slice(s): {len(devices)} chips "
              f"({devices[0].device_kind}) on {hosts} hosts, mesh {dict(mesh.shape)}, in {seconds:.1f} s")
        print("per chip: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in per_chip.items()))
        print(f"Pallas (Mosaic) kernel calls in the step: {report['pallas_calls']}")
    return report
