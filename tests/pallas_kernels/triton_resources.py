"""Shared memory, registers, spills and instruction mix of the Pallas GPU kernels, without a GPU.

The Pallas-Triton lowering emits a Triton module per kernel; XLA compiles it on the GPU at load time, and a
kernel that needs more than the card's shared memory (227 KiB on an H100) fails only there. This helper
captures each module (Triton IR text) while exporting an op for CUDA on any host, then compiles it for
sm_90 with the `triton` package in a subprocess (its LLVM and jaxlib's stay apart): shared memory from the
kernel's metadata; registers and spill stack from `cuobjdump --dump-resource-usage` of its cubin; and from
its SASS, whether the dots run on Hopper's warpgroup MMA (HGMMA) and whether loads are asynchronous copies
(LDGSTS: Triton software-pipelined a loop's loads) or synchronous (LDG then STS). A proxy: XLA's pinned
Triton is close to, not the same as, the package's (on the H100 the two agree where both were seen: the
2B shape's kernels at dv blocks of 128 fit, bf16 dk = 256 at blocks of 32 fits, fp32 at dk = 128 fits; the
gated delta rule's input gradients spill least at 8 warps, as they ran fastest there).

    python -m tests.pallas_kernels.triton_resources bfloat16 96 256 128 [num_warps num_stages]  # GDR
    python -m tests.pallas_kernels.triton_resources conv [G DV]   # dynamic conv, 2B sizes by default
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from jetnemo_jax.ops import conv
from pallas_kernels.dynamic_conv import triton as conv_kernels
from pallas_kernels.gated_delta_rule import triton as kernels
from pallas_kernels.gated_delta_rule import triton_forward

H100_SHARED_KIB = 227

_COMPILE = r"""
import collections, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}
for path, warps, stages in json.loads(sys.argv[1]):
    k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        dump = lambda flag: subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True,
                                           check=True).stdout
        usage, sass = dump("--dump-resource-usage"), dump("-sass")
    ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|LDGSTS)\b", sass))
    out[path] = dict(shared=k.metadata.shared, registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                     stack=int(re.search(r"STACK:(\d+)", usage).group(1)), wgmma=ops["HGMMA"], mma=ops["HMMA"],
                     async_copies=ops["LDGSTS"])
print(json.dumps(out))
"""


def _triton_modules(fn, *specs):
    """{kernel name: Triton IR text} of every Pallas kernel in jit(fn)(*specs), exported for CUDA."""
    from jax._src.pallas.triton import pallas_call_registration as registration  # private: the IR hook

    modules, lower = {}, registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        text = result.module.operation.get_asm(enable_debug_info=False)
        modules[text.split("tt.func public @", 1)[1].split("(", 1)[0]] = text
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*specs)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    return modules


def _compile(modules, launch):
    """{kernel name: resources} for sm_90; launch(name) -> (num_warps, num_stages)."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name, text in modules.items():
            path = pathlib.Path(tmp, f"{name}.ttir")
            path.write_text(text)
            jobs.append((str(path), *launch(name)))
        run = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(jobs)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"compiling the Triton modules for sm_90 failed:\n{run.stderr[-3000:]}")
        return {pathlib.Path(p).stem: dict(shared_kib=r["shared"] / 1024, registers=r["registers"],
                                           spill_bytes=r["stack"], wgmma=r["wgmma"], mma=r["mma"],
                                           async_copies=r["async_copies"])
                for p, r in json.loads(run.stdout).items()}


def kernel_resources(dtype, dk, dv, block_v, num_warps=None, num_stages=None):
    """The gated delta rule's 7 kernels (forward and backward): {kernel name: {"shared_kib", "registers",
    "spill_bytes" (per thread), "wgmma", "mma", "async_copies" (SASS instruction counts)}} for sm_90, each
    kernel at its own warps and stages unless given."""
    dtype = jnp.dtype(dtype)
    B, T, H = 1, 128, 1  # sizes other than dk, dv and the dv block do not change a kernel
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)

    def loss(q, k, v, g, beta, h0, starts):
        o, s = kernels.gated_delta_rule(q, k, v, g, beta, dk ** -0.5, h0, starts, l2norm=True, interpret=False,
                                        block_v=block_v)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    # The op's size check refuses what this helper is there to measure (fp32 at dk = 256).
    check, kernels.check_supported = kernels.check_supported, lambda *_: None
    try:
        modules = _triton_modules(
            jax.value_and_grad(loss, argnums=range(6)), spec((B, T, H, dk)), spec((B, T, H, dk)),
            spec((B, T, H, dv)), spec((B, T, H), jnp.float32), spec((B, T, H)), spec((B, H, dk, dv), jnp.float32),
            spec((B, T), jnp.bool_))
    finally:
        kernels.check_supported = check
    if len(modules) != 7:
        raise RuntimeError(f"expected the op's 7 Triton kernels, captured {sorted(modules)}")
    launch = lambda name: triton_forward.INPUT_GRADS_LAUNCH if name.startswith("_grads") else triton_forward.LAUNCH
    return _compile(modules, lambda name: (
        num_warps or launch(name).num_warps,
        num_stages or (launch(name).num_stages if dtype == jnp.bfloat16 else 1)))


def shared_memory_kib(dtype, dk, dv, block_v):
    """{kernel name: KiB of shared memory} at the kernels' own launch options."""
    return {k: r["shared_kib"] for k, r in kernel_resources(dtype, dk, dv, block_v).items()}


def conv_resources(G=384, D=3072, dtype=jnp.bfloat16):
    """The dynamic conv's 4 kernels (forward, grad_u, grad_h, grad_w2) at their default blocks and launch
    options (`pallas_kernels.dynamic_conv.triton`), as `kernel_resources`; sizes of the 2B model by default."""
    B, T = 1, 4096  # enough rows that grad_w2's row loop runs several steps (pipelined), as at full size
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)

    def loss(u, h, w2, b2, doc_ids):
        y = conv.generated_conv(conv_kernels, u, h, w2, b2, doc_ids, None)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    modules = _triton_modules(jax.value_and_grad(loss, argnums=range(4)), spec((B, T, D)), spec((B, T, G)),
                              spec((G, 4 * D)), spec((4 * D,)), spec((B, T), jnp.int32))
    tables = {"dynamic_conv_fwd": conv_kernels.FWD, "dynamic_conv_grad_u": conv_kernels.GRAD_U,
              "dynamic_conv_grad_h": conv_kernels.GRAD_H, "dynamic_conv_grad_w2": conv_kernels.GRAD_W2}
    if sorted(modules) != sorted(tables):
        raise RuntimeError(f"expected the conv's 4 Triton kernels, captured {sorted(modules)}")
    return _compile(modules, lambda name: (tables[name].num_warps, tables[name].num_stages))


if __name__ == "__main__":
    if sys.argv[1] == "conv":
        report = conv_resources(*map(int, sys.argv[2:]))
    else:
        dt, (dk_, dv_, bv_, *launch) = sys.argv[1], map(int, sys.argv[2:])
        report = kernel_resources(dt, dk_, dv_, bv_, *launch)
    print(f"{'kernel':28s} {'shared KiB':>10s} {'registers':>9s} {'spill B':>7s} {'HGMMA':>6s} {'HMMA':>5s} "
          f"{'LDGSTS':>6s}")
    for kernel, r in report.items():
        print(f"{kernel:28s} {r['shared_kib']:10.1f} {r['registers']:9d} {r['spill_bytes']:7d} {r['wgmma']:6d} "
              f"{r['mma']:5d} {r['async_copies']:6d}")
