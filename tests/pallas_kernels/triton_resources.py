"""Shared memory, registers and spills of the Pallas GPU kernels of the gated delta rule, without a GPU.

The Pallas-Triton lowering emits a Triton module per kernel; XLA compiles it on the GPU at load time, and a
kernel that needs more than the card's shared memory (227 KiB on an H100) fails only there. This helper
captures each module (Triton IR text) while exporting the op for CUDA on any host, then compiles it for
sm_90 with the `triton` package in a subprocess (its LLVM and jaxlib's stay apart): shared memory from the
kernel's metadata, registers and spill stack from `cuobjdump --dump-resource-usage` of its cubin. A proxy:
XLA's pinned Triton is close to, not the same as, the package's (on the H100 the two agree where both were
seen: the 2B shape's kernels at dv blocks of 128 fit, bf16 dk = 256 at blocks of 32 fits; the input
gradients spill least at 8 warps, as they ran fastest there).

    python -m tests.pallas_kernels.triton_resources bfloat16 96 256 128 [num_warps num_stages]
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from jetnemo_jax.ops import triton_gdr
from pallas_kernels.gated_delta_rule import gpu as kernels

H100_SHARED_KIB = 227

_COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}
for path, warps, stages in json.loads(sys.argv[1]):
    k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    out[path] = dict(shared=k.metadata.shared, registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                     stack=int(re.search(r"STACK:(\d+)", usage).group(1)))
print(json.dumps(out))
"""


def _triton_modules(dtype, dk, dv, block_v):
    """{kernel name: Triton IR text} of the op's forward and backward at these sizes."""
    from jax._src.pallas.triton import pallas_call_registration as registration  # private: the IR hook

    modules, lower = {}, registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        text = result.module.operation.get_asm(enable_debug_info=False)
        modules[text.split("tt.func public @", 1)[1].split("(", 1)[0]] = text
        return result

    B, T, H = 1, 128, 1  # sizes other than dk, dv and the dv block do not change a kernel
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)

    def loss(q, k, v, g, beta, h0, seg):
        o, s = triton_gdr.gated_delta_rule(q, k, v, g, beta, dk ** -0.5, h0, seg, l2norm=True, interpret=False,
                                           block_v=block_v)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    # The op's size check refuses what this helper is there to measure (fp32 at dk = 256).
    registration.lowering.lower_jaxpr_to_triton_module, check = capture, triton_gdr.check_supported
    triton_gdr.check_supported = lambda *_: None
    try:
        jax.export.export(
            jax.jit(jax.value_and_grad(loss, argnums=range(6))), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            spec((B, T, H, dk)), spec((B, T, H, dk)), spec((B, T, H, dv)), spec((B, T, H), jnp.float32),
            spec((B, T, H)), spec((B, H, dk, dv), jnp.float32), spec((B, T), jnp.int32))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module, triton_gdr.check_supported = lower, check
    if len(modules) != 7:
        raise RuntimeError(f"expected the op's 7 Triton kernels, captured {sorted(modules)}")
    return modules


def kernel_resources(dtype, dk, dv, block_v, num_warps=None, num_stages=None):
    """{kernel name: {"shared_kib", "registers", "spill_bytes"}} for sm_90 (per thread for the last two),
    each kernel at its own warps and stages unless given."""
    dtype = jnp.dtype(dtype)
    stages = num_stages or (kernels.NUM_STAGES if dtype == jnp.bfloat16 else 1)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name, text in _triton_modules(dtype, dk, dv, block_v).items():
            path = pathlib.Path(tmp, f"{name}.ttir")
            path.write_text(text)
            warps = num_warps or (kernels.WIDE_WARPS if name.startswith("_grads") else kernels.NUM_WARPS)
            jobs.append((str(path), warps, stages))
        run = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(jobs)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"compiling the Triton modules for sm_90 failed:\n{run.stderr[-3000:]}")
        return {pathlib.Path(p).stem: dict(shared_kib=r["shared"] / 1024, registers=r["registers"],
                                           spill_bytes=r["stack"]) for p, r in json.loads(run.stdout).items()}


def shared_memory_kib(dtype, dk, dv, block_v):
    """{kernel name: KiB of shared memory} at the kernels' own launch options."""
    return {k: r["shared_kib"] for k, r in kernel_resources(dtype, dk, dv, block_v).items()}


if __name__ == "__main__":
    dt, (dk_, dv_, bv_, *launch) = sys.argv[1], map(int, sys.argv[2:])
    print(f"{'kernel':28s} {'shared KiB':>10s} {'registers':>9s} {'spill B':>7s}")
    for kernel, r in kernel_resources(dt, dk_, dv_, bv_, *launch).items():
        print(f"{kernel:28s} {r['shared_kib']:10.1f} {r['registers']:9d} {r['spill_bytes']:7d}")
