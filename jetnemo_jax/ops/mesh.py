"""The mesh a kernel call runs on, and running it per shard of that mesh.

XLA cannot partition a Pallas call, so on a mesh the ops wrap a kernel (with its layout code and custom_vjp) in
`jax.shard_map`: batch over the mesh axes of the active sharding rules' batch rule, heads (or channels, which
are head-major) over the axes of their `jet_heads` rule, so the kernels split the activations the way the
rules split the weights (`jetnemo_jax.sharding`; `DEFAULT_RULES` outside a training step).
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jetnemo_jax import sharding

HEADS = "jet_heads"  # the logical axis of JetBlock heads (layers.params.JET_HEADS)


def context_mesh():
    """The mesh set with `jax.set_mesh`, unless absent or already manual (inside a shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(mesh.axis_names) - set(mesh.manual_axes):
        return None
    return mesh


def resolve(mesh=None):
    """The mesh a kernel call runs per shard of: `mesh`, else the training step's (`sharding.activation_sharding`),
    else the `jax.set_mesh` one; None for one device (or XLA's own partitioning)."""
    for candidate in (mesh, sharding.active_mesh(), context_mesh()):
        if candidate is not None:
            return candidate
    return None


def platform(mesh) -> str:
    """Where kernels will run: a concrete mesh's devices (a TPU topology compiles ahead of time from a CPU
    host), else the default backend."""
    return mesh.devices.flat[0].platform if isinstance(mesh, jax.sharding.Mesh) else jax.default_backend()


def device(mesh):
    """The first device kernels will run on (`platform`'s device)."""
    return mesh.devices.flat[0] if isinstance(mesh, jax.sharding.Mesh) else jax.devices()[0]


def layout_known(mesh) -> bool:
    """Whether kernels can run on the resolved `mesh`: one device, or a mesh to shard_map over (XLA would
    otherwise fail to partition the kernels of a sharded jit)."""
    return mesh is not None or jax.device_count() == 1


def kernel_axes(mesh):
    """-> (the mesh axes the batch splits over, or None; those heads split over: one name, several, or None),
    from the active sharding rules, limited to the mesh's axes; an axis the batch takes is not the heads'."""
    rules, names = sharding.active_rules(), set(mesh.axis_names)
    batch = tuple(a for a in rules.get(sharding.BATCH, ()) if a in names)
    heads = tuple(a for a in rules.get(HEADS, ()) if a in names and a not in batch)
    return batch or None, heads[0] if len(heads) == 1 else (heads or None)


def shard_map(fn, mesh, in_specs, out_specs):
    """`jax.shard_map(fn)` with check_vma off (pallas_call has no varying-axis rules). With it off,
    shard_map's transpose psums the cotangent of an input over the axes its spec leaves out, so weights
    replicated over the batch axes still get whole gradients. Inputs on Explicit axes are resharded to
    `in_specs` first (shard_map reshards Auto axes itself)."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    used = {a for spec in jax.tree.leaves(in_specs, is_leaf=lambda x: isinstance(x, P)) for part in spec
            for a in ((part,) if isinstance(part, str) else (part or ()))}
    if not any(t == AxisType.Explicit for a, t in zip(mesh.axis_names, mesh.axis_types) if a in used):
        return mapped

    def resharded(*args):
        return mapped(*(jax.reshard(x, NamedSharding(mesh, spec)) for x, spec in zip(args, in_specs)))

    return resharded
