"""jetnemo_jax.ops.mesh: the kernels split batch and heads over the axes the active sharding rules name."""

import jax

from jetnemo_jax import sharding
from jetnemo_jax.ops import mesh as kernel_mesh


def test_kernel_axes_follow_the_active_rules():
    mesh = jax.make_mesh((1, 1, 1, 1), sharding.MESH_AXES)
    assert kernel_mesh.kernel_axes(mesh) == (("data", "fsdp"), "tensor")  # DEFAULT_RULES outside a step
    rules = dict(sharding.DEFAULT_RULES)
    custom = {**rules, sharding.BATCH: ("data",), "jet_heads": ("fsdp", "tensor")}
    with sharding.activation_sharding(mesh, tuple(custom.items())):
        assert kernel_mesh.kernel_axes(mesh) == (("data",), ("fsdp", "tensor"))
        assert kernel_mesh.resolve() is mesh
    with sharding.activation_sharding(mesh, tuple({**rules, "jet_heads": None}.items())):
        assert kernel_mesh.kernel_axes(mesh) == (("data", "fsdp"), None)
    with sharding.activation_sharding(mesh, tuple({**rules, "jet_heads": "fsdp"}.items())):
        assert kernel_mesh.kernel_axes(mesh) == (("data", "fsdp"), None)  # the batch took fsdp
    data_only = jax.make_mesh((1,), ("data",))
    assert kernel_mesh.kernel_axes(data_only) == (("data",), None)  # axes the mesh lacks are dropped
    assert kernel_mesh.resolve() is None and kernel_mesh.resolve(data_only) is data_only
