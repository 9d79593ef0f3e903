"""Running Pallas kernels per shard: XLA cannot partition a Pallas call, so on a mesh the ops layer wraps
the kernel (with its layout code and custom_vjp) in `jax.shard_map`, batch over the data axes and heads or
channels over the tensor axis."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def mesh_axes(mesh, batch_axes=BATCH_AXES, head_axis=HEAD_AXIS):
    """-> (the batch axes the mesh has, or None; the head axis if the mesh has it, else None)."""
    names = set(mesh.axis_names)
    return tuple(a for a in batch_axes if a in names) or None, head_axis if head_axis in names else None


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
