"""The dynamic conv kernels lower for real hardware from this CPU host: Triton for CUDA (jax.export, no GPU
needed) and Mosaic for a TPU topology (libtpu ahead-of-time compile). A jitted forward and backward of the
fused op at the 2B JetBlock's channel and generator sizes (short sequences keep it fast)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jetnemo_jax.ops import pallas_conv
from tests.pallas_kernels import triton_resources

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _loss(backend):  # "hopper": the Mosaic GPU kernels (chosen on an sm_90 device; named here)
    def loss(u, h, w2, b2, doc_ids, cache):
        y = pallas_conv.generated_conv(u, h, w2, b2, doc_ids, cache, backend=backend)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 5))


def _args(B, T, G, D, dtype, sharding=None):
    s = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    return (s((B, T, D)), s((B, T, G)), s((G, 4 * D)), s((4 * D,)), s((B, T), jnp.int32), s((B, 3, D)))


@pytest.mark.parametrize("dtype,G,D", [(jnp.bfloat16, 384, 3072), (jnp.float32, 40, 200)])
def test_triton_lowering_for_cuda(dtype, G, D):
    exported = export.export(jax.jit(_loss("gpu")), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*_args(2, 100, G, D, dtype))
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") >= 4, "expected the forward and the three backward Triton kernels"


@pytest.mark.parametrize("G,D", [(384, 3072), (512, 4096)])
def test_mosaic_gpu_lowering_for_cuda(G, D):
    """The four Mosaic GPU kernels lower for CUDA at the 2B and 4B sizes, clustered as on the GPU (the CPU tests
    interpret them unclustered): their layouts resolve and their shared memory fits an H100 (checked while
    lowering)."""
    text = jax.jit(_loss("hopper")).trace(*_args(2, 100, G, D, jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 4
    for kernel in ("fwd", "grad_u", "grad_h", "grad_w2"):
        assert f"dynamic_conv_{kernel}" in text, kernel


def test_default_blocks_fit_h100_shared_memory():
    """Compiled for sm_90 (the triton package, a proxy of XLA's Triton; see triton_resources.py), each kernel
    at its default blocks and launch options fits an H100's shared memory and runs its dots on HGMMA."""
    if sys.platform != "linux":
        pytest.skip("the triton package (the test extra's sm_90 compiler) ships for Linux only")
    report = triton_resources.conv_resources()
    assert all(r["shared_kib"] <= triton_resources.H100_SHARED_KIB and r["wgmma"] for r in report.values()), report


_TPU = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from tests.pallas_kernels.test_dynamic_conv_lowering import _args, _loss

    topo = topologies.get_topology_desc(topology_name=sys.argv[1], platform="tpu")
    mesh = Mesh(np.array(topo.devices), ("data",))
    n = mesh.size
    for dtype, G, D in ((jnp.bfloat16, 384, 3072), (jnp.float32, 40, 200)):
        args = _args(n, 300, G, D, dtype)
        batch, rep = P("data"), P()
        specs = (batch, batch, rep, rep, batch, batch)
        fn = jax.shard_map(_loss("tpu"), mesh=mesh, in_specs=specs, out_specs=(rep, (batch,) * 2 + (rep,) * 2
                           + (batch,)), check_vma=False)
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)) for a, s in zip(args, specs)]
        compiled = jax.jit(fn).lower(*args).compile()
        kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
        assert kernels >= 2, kernels
        print(sys.argv[1], jnp.dtype(dtype).name, G, D, "ok", kernels, "Mosaic kernels")
""")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_mosaic_compiles_for_tpu():
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost",
               TPU_WORKER_ID="0", TPU_ACCELERATOR_TYPE="v5litepod-4", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _TPU, "v5e:2x2"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=500)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr[-5000:]
