"""pallas_kernels/dynamic_conv/tpu.py compiles ahead of time for a TPU topology from this CPU host (libtpu, no TPU
needed): a jitted forward and backward of the fused op at the 2B JetBlock's channel and generator sizes (short
sequences keep it fast), inside `jax.shard_map` over the topology's chips."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


_TPU = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from pallas_kernels.dynamic_conv import tpu
    from tests.pallas_kernels.dynamic_conv.harness import abstract_args, loss

    topo = topologies.get_topology_desc(topology_name=sys.argv[1], platform="tpu")
    mesh = Mesh(np.array(topo.devices), ("data",))
    n = mesh.size
    for dtype, G, D in ((jnp.bfloat16, 384, 3072), (jnp.float32, 40, 200)):
        args = abstract_args(n, 300, G, D, dtype)
        batch, rep = P("data"), P()
        specs = (batch, batch, rep, rep, batch, batch)
        fn = jax.shard_map(loss(tpu), mesh=mesh, in_specs=specs, out_specs=(rep, (batch,) * 2 + (rep,) * 2
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
