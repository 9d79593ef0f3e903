"""Device mesh (data, fsdp, context, tensor) and logical-axis -> mesh-axis rules.

Parameters carry logical axis names (layers/params.py); the rules, kept in the training config, map them
onto mesh axes. Activations [B, T, ...] split their batch over the `batch` rule's axes and their tokens over
the `length` rule's (`context`: every sequence in contiguous shards, for sequences one device cannot hold).
A dimension a mesh axis does not divide stays replicated on that axis (logged once): that
changes memory, never numerics.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH = "batch"  # logical axis of activations' leading dimension
LENGTH = "length"  # logical axis of activations' token dimension (context parallelism)
# MaxText-style defaults: weights sharded over fsdp on the model dim and over tensor on the head/MLP dims.
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, "context"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("jet_heads", "tensor"),
    ("norm", None),
)


def mesh_shape(axes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Sizes for (data, fsdp, context, tensor); one of them may be -1 (takes the remaining devices)."""
    unknown = [k for k in axes if k not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh axes {unknown} unknown; expected {MESH_AXES}")
    sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
                         f"but {n_devices} are present")
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """The (data, fsdp, context, tensor) mesh. Across TPU slices (multislice), `data` spans the slices over
    DCN; context and tensor are the innermost axes (ICI, or NVLink within a host)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axes, len(devices))
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if n_slices > 1:
        if shape[0] % n_slices:
            raise ValueError(f"{n_slices} slices: the data axis ({shape[0]}) must be a multiple of it")
        ici = (shape[0] // n_slices, *shape[1:])
        grid = mesh_utils.create_hybrid_device_mesh(ici, (n_slices, 1, 1, 1), devices)
    else:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(np.asarray(grid), MESH_AXES)


def _rules_dict(rules) -> dict:
    out = {}
    for name, target in rules:
        target = tuple(target) if isinstance(target, (list, tuple)) else ((target,) if target else ())
        bad = [t for t in target if t not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {name!r} -> {bad}: mesh axes are {MESH_AXES}")
        out[name] = target
    return out


_warned: set = set()


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
    """PartitionSpec for an array with these logical axes; mesh axes that don't divide a dim are dropped."""
    table = _rules_dict(rules)
    spec, used = [], set()
    for name, dim in zip(logical, shape):
        if name is not None and name not in table:
            raise ValueError(f"no sharding rule for logical axis {name!r}; rules cover {sorted(table)}")
        axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            if (name, dim, axes) not in _warned:
                _warned.add((name, dim, axes))
                log.info("logical axis %r of size %d is not divisible by mesh axes %s: dropping %r",
                         name, dim, axes, axes[-1])
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> dict[tuple, NamedSharding]:
    """{parameter path: NamedSharding} from each parameter's logical axes (`out_sharding` metadata)."""
    out = {}
    for path, var in nnx.to_flat_state(abstract_state):
        logical = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        out[path] = NamedSharding(mesh, logical_to_spec(logical, var.shape, mesh, rules))
    return out


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Token batches [B, T, ...]: rows over the batch rule's axes, tokens over the length rule's, the rest
    replicated."""
    table = _rules_dict(rules)
    spec = [table.get(BATCH, ()), table.get(LENGTH, ())][:ndim]
    return NamedSharding(mesh, P(*(a if a else None for a in spec), *([None] * (ndim - len(spec)))))


def context_size(mesh: Mesh, rules) -> int:
    """How many shards every sequence is split into (the length rule's mesh axes)."""
    return math.prod(mesh.shape[a] for a in _rules_dict(rules).get(LENGTH, ()))


def batch_divisor(mesh: Mesh, rules) -> int:
    return math.prod(mesh.shape[a] for a in _rules_dict(rules).get(BATCH, ()))


# Activations: the batch dimension over the batch rule's mesh axes, set while a train step is traced. Without
# these constraints XLA may resolve the conflict between FSDP-sharded weights and the batch by gathering
# the batch onto every device. The ops' kernels read the same mesh and rules (`jetnemo_jax.ops.mesh`).
_activation: contextvars.ContextVar = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    token = _activation.set((mesh, _rules_dict(rules)))
    try:
        yield
    finally:
        _activation.reset(token)


def active_mesh() -> Mesh | None:
    """The concrete mesh of the enclosing `activation_sharding` (kernels shard_map over it)."""
    active = _activation.get()
    return None if active is None else active[0]


def active_rules() -> dict[str, tuple[str, ...]]:
    """{logical axis: mesh axes} of the enclosing `activation_sharding`, else of `DEFAULT_RULES`."""
    active = _activation.get()
    return _rules_dict(DEFAULT_RULES) if active is None else active[1]


def constrain_batch(x):
    """Shard an activation [B, T, ...]: rows as the active rules' batch rule says, tokens as their length rule
    (a dim the axes do not divide stays whole); a no-op outside `activation_sharding`."""
    active = _activation.get()
    if active is None:
        return x
    mesh, rules = active
    spec = []
    for dim, name in zip(x.shape, (BATCH, LENGTH)):
        axes = tuple(a for a in rules.get(name, ()) if mesh.shape[a] > 1)
        spec.append(axes if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0 else None)
    if not any(spec):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec, *([None] * (x.ndim - len(spec))))))


def gather_length(x):
    """x [B, T, ...] with its tokens whole on every device, rows still split (the keys and values that every
    query shard of context-parallel attention reads: an all-gather over the context axes, so the scores are
    [T/N, T] per device); a no-op without context axes or outside `activation_sharding`."""
    active = _activation.get()
    if active is None:
        return x
    mesh, rules = active
    if not any(mesh.shape[a] > 1 for a in rules.get(LENGTH, ())):
        return x
    batch = tuple(a for a in rules.get(BATCH, ()) if mesh.shape[a] > 1)
    rows = batch if batch and x.shape[0] % math.prod(mesh.shape[a] for a in batch) == 0 else None
    rest = [P.UNCONSTRAINED] * (x.ndim - 2)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(rows, None, *rest)))


def length_shards(T: int) -> int:
    """How many context shards the active rules split T tokens into (1 outside `activation_sharding`)."""
    active = _activation.get()
    if active is None:
        return 1
    mesh, rules = active
    n = math.prod(mesh.shape[a] for a in rules.get(LENGTH, ()))
    return n if T % n == 0 else 1
