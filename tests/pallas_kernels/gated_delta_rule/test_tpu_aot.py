"""Ahead-of-time compilation of impl="tpu" for TPU topologies on this CPU host (libtpu, no TPU needed).

A jitted value-and-grad of the op inside `jax.shard_map` (batch over "data", heads over "tensor") must
compile with Mosaic for v5e, v5p and v6e: this proves the kernels lower, fit VMEM under the default scoped
limit, and partition. Each topology compiles in its own process, because libtpu's environment must be set
before it loads.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install 'jax[tpu]')")

_COMPILE = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jetnemo_jax import ops

    topo = topologies.get_topology_desc(topology_name=sys.argv[1], platform="tpu")
    devices = np.array(topo.devices)
    mesh = Mesh(devices.reshape(devices.size // 2, 2), ("data", "tensor"))
    B, H = 2 * mesh.shape["data"], 8
    # Odd T, the padded head sizes (96 -> 128), both input dtypes; "auto" must pick the kernels for a TPU mesh.
    for T, dk, dv, dtype, impl in ((300, 128, 128, jnp.bfloat16, "auto"), (333, 96, 256, jnp.float32, "tpu"),
                                   (130, 64, 64, jnp.bfloat16, "tpu"), (200, 256, 256, jnp.bfloat16, "auto")):
        tok = NamedSharding(mesh, P("data", None, "tensor"))  # also fits [B, T, H]
        spec = lambda shape, dt, s: jax.ShapeDtypeStruct(shape, dt, sharding=s)
        args = (spec((B, T, H, dk), dtype, tok), spec((B, T, H, dk), dtype, tok), spec((B, T, H, dv), dtype, tok),
                spec((B, T, H), jnp.float32, tok), spec((B, T, H), dtype, tok),
                spec((B, H, dk, dv), jnp.float32, NamedSharding(mesh, P("data", "tensor"))),
                spec((B, T), jnp.int32, NamedSharding(mesh, P("data"))))

        def loss(q, k, v, g, beta, h0, seg):
            o, s = ops.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                        segment_ids=seg, impl=impl, mesh=mesh)
            return jnp.sum(jnp.square(o.astype(jnp.float32))) + jnp.sum(s)

        start = time.perf_counter()
        compiled = jax.jit(jax.value_and_grad(loss, argnums=range(6))).lower(*args).compile()
        seconds = time.perf_counter() - start
        kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
        assert kernels >= 3, f"expected the forward, state and backward Mosaic kernels, found {kernels}"
        mem = compiled.memory_analysis()
        print(f"{sys.argv[1]} T={T} dk={dk} dv={dv} {jnp.dtype(dtype).name} {impl}: compiled in {seconds:.1f} s, "
              f"{kernels} Mosaic kernels, per chip args {mem.argument_size_in_bytes} B, "
              f"temp {mem.temp_size_in_bytes} B")
""")


# v5e's Mosaic lowering is compiled by tests/train/test_compile_only.py's sharded tiny step (kernel calls > 0)
@pytest.mark.parametrize("topology", ["v5p:2x2x2", "v6e:4x4"])
def test_tpu_kernels_compile_for_tpu(topology):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost",
               TPU_WORKER_ID="0", TPU_ACCELERATOR_TYPE="v5litepod-4",
               # libtpu takes a machine-wide lock; compiling needs no TPU, so other processes may hold it.
               ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _COMPILE, topology], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=500)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr[-5000:]
