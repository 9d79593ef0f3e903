"""impl="tpu" (the Mosaic TPU kernels, run in interpret mode on CPU) against the float64 recurrence.

Float32 inputs must match the float64 oracle to 1e-5 (measured ~3e-7: interpret mode computes the kernels'
float32 matmuls exactly in float32); 16-bit inputs use fla's tolerances.
"""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from jetnemo_jax import ops
from jetnemo_jax.ops import mesh as kernel_mesh
from tests.ops.test_delta_rule import check_forward, check_gradients, kernel_segments, make_inputs
from tests.xla_flags import with_host_devices

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


# Every dk in {64, 96, 128, 256} and dv in {64, 128, 256} appears in each test; T is never a multiple
# of 64 except once; gates cover zero, ordinary and strong decay (g down to -150).
@pytest.mark.parametrize("dtype,B,T,H,dk,dv,gates", [
    ("float32", 2, 130, 2, 96, 256, "normal"),
    ("bfloat16", 1, 37, 3, 64, 64, "zero"),
    ("float32", 2, 100, 2, 128, 128, "strong"),
    ("bfloat16", 1, 64, 2, 256, 64, "normal"),
])
def test_forward_matches_float64_recurrence(rng, dtype, B, T, H, dk, dv, gates):
    check_forward(rng, "tpu", dtype, B, T, H, dk, dv, gates)


@pytest.mark.parametrize("dtype,B,T,H,dk,dv,gates", [
    ("float32", 2, 100, 2, 64, 128, "normal"),
    ("bfloat16", 2, 130, 1, 96, 256, "strong"),
    ("float32", 1, 37, 2, 256, 64, "zero"),
    ("bfloat16", 1, 70, 2, 128, 128, "normal"),
])
def test_gradients_match_float64(rng, dtype, B, T, H, dk, dv, gates):
    check_gradients(rng, "tpu", dtype, B, T, H, dk, dv, gates, kernel_segments(rng, B, T))


def test_auto_stays_xla_off_tpu(rng, monkeypatch):
    monkeypatch.setattr(kernel_mesh, "platform", lambda mesh: "cpu")  # also when the tests run on a GPU
    x = make_inputs(rng, 1, 20, 1, 64, 64)
    jaxpr = str(jax.make_jaxpr(lambda x: ops.gated_delta_rule(**x))(x))
    assert "pallas_call" not in jaxpr
    assert "pallas_call" in str(jax.make_jaxpr(lambda x: ops.gated_delta_rule(**x, impl="tpu"))(x))


def test_unsupported_shapes_raise(rng):
    x = make_inputs(rng, 1, 20, 1, 320, 64)
    with pytest.raises(ValueError, match="dk up to 256"):
        ops.gated_delta_rule(**x, impl="tpu")
    x = make_inputs(rng, 1, 20, 1, 64, 64)
    with pytest.raises(ValueError, match="chunk_size=64"):
        ops.gated_delta_rule(**x, impl="tpu", chunk_size=32)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jetnemo_jax import ops
    from tests.oracles import rel_err

    rng = np.random.default_rng({seed})
    B, T, H, dk, dv = 4, 80, 4, 64, 128
    x = dict(q=rng.standard_normal((B, T, H, dk)), k=rng.standard_normal((B, T, H, dk)),
             v=rng.standard_normal((B, T, H, dv)), g=np.log(rng.uniform(0.8, 1.0, (B, T, H))),
             beta=rng.uniform(0.05, 1.0, (B, T, H)))
    x = {{n: jnp.asarray(a, jnp.float32) for n, a in x.items()}}
    h0 = jnp.asarray(rng.standard_normal((B, H, dk, dv)), jnp.float32)
    seg = jnp.asarray(np.repeat(np.arange(T)[None] // 50, B, 0), jnp.int32)
    explicit = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    auto = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)

    def loss(x, h0, mesh):
        o, s = ops.gated_delta_rule(**x, initial_state=h0, output_final_state=True, segment_ids=seg,
                                    impl="{impl}", mesh=mesh)
        return jnp.sum(o * o) + jnp.sum(s), (o, s)

    step = lambda: jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    ref = step()(x, h0, None)  # one device, no shard_map
    tok, state = NamedSharding(explicit, P("data", None, "tensor")), NamedSharding(explicit, P("data", "tensor"))
    xs = {{n: jax.device_put(a, tok) for n, a in x.items()}}
    assert "shard_map" in str(jax.make_jaxpr(lambda x, h0: loss(x, h0, explicit))(xs, h0))
    runs = [step()(xs, jax.device_put(h0, state), explicit)]  # the mesh passed in
    with jax.set_mesh(auto):  # the mesh from the context
        assert "shard_map" in str(jax.make_jaxpr(lambda x, h0: loss(x, h0, None))(x, h0))
        runs.append(step()(x, h0, None))
    errs = [rel_err(a, b) for run in runs for a, b in zip(jax.tree.leaves(run), jax.tree.leaves(ref))]
    print("max rel err", max(errs))
    assert max(errs) <= 1e-6, errs
""")


def run_sharded_check(rng, impl):
    """Batch over "data", heads over "tensor" on 4 host devices; same values and gradients as one device."""
    env = dict(os.environ, XLA_FLAGS=with_host_devices(4), JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = _SHARDED.format(seed=int(rng.integers(2**31)), impl=impl)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_runs_under_shard_map_on_a_mesh(rng):
    run_sharded_check(rng, "tpu")
