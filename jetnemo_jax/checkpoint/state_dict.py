"""The PyTorch state-dict view of a model: official names, `[out, in]` Linear weights.

The NNX module tree mirrors the PyTorch one, so a parameter path maps to its name by joining with dots;
only the leaf differs (`kernel` is a transposed `weight`, `embedding` is `weight`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_FLOAT_DTYPES = frozenset({"BF16", "F16", "F32", "F64", "bfloat16", "float16", "float32", "float64"})
# Buffers some exporters write that carry no parameters (recomputed here).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint is missing tensors, has extra or mis-shaped ones, or cannot be read (message names it)."""


def torch_name(path: tuple) -> str:
    parts = [str(p) for p in path]
    if parts[-1] in ("kernel", "embedding"):
        parts[-1] = "weight"
    return ".".join(parts)


def _transposed(path: tuple) -> bool:
    return path[-1] == "kernel"


def param_entries(model: nnx.Module) -> Iterator[tuple[str, tuple, nnx.Variable]]:
    """(torch name, path, variable) for every parameter, in module order."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield torch_name(path), path, var


def to_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Host copies of every parameter under its official name (lm_head absent when tied)."""
    out = {}
    for name, path, var in param_entries(model):
        x = np.asarray(jax.device_get(var[...]))
        out[name] = np.ascontiguousarray(x.T) if _transposed(path) else x
    return out


def load_state_dict(model: nnx.Module, get_tensor: Callable[[str], np.ndarray],
                    names: Mapping[str, tuple[tuple[int, ...], str]], *, where: str = "checkpoint") -> None:
    """Fill `model`'s parameters in place from a checkpoint.

    `names` maps each available tensor name to (shape, dtype name) without reading it; `get_tensor`
    reads one. Missing, extra and mis-shaped tensors raise CheckpointError naming them; nothing is
    assigned unless every check passes. Tensors are cast to the parameter's dtype.
    """
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    entries = list(param_entries(model))
    expected = {name for name, _, _ in entries}
    available = {n for n in names if not n.endswith(_IGNORED_SUFFIXES)}
    if tied:
        available.discard("lm_head.weight")  # tied: the output projection is the embedding
    missing = sorted(expected - available)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]}{more}")
    extra = sorted(available - expected)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]}{more} for this model config")
    for name, path, var in entries:
        shape, dtype = names[name]
        want = tuple(var.shape[::-1] if _transposed(path) else var.shape)
        if tuple(shape) != want:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(shape)}, expected {want}")
        if str(dtype) not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where}: tensor {name} has dtype {dtype}, expected a floating-point dtype")
    for name, path, var in entries:
        x = get_tensor(name)
        if _transposed(path):
            x = x.T
        var.set_value(jnp.asarray(x, dtype=var.dtype))  # A_log and dt_bias are float32 parameters
