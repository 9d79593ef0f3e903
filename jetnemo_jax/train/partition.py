"""Trainable/frozen split of the model's parameters, by a regex on their paths.

Parameters live in flat dicts keyed by path ("model/layers/3/mlp/up_proj/kernel"). The train step
differentiates only the trainable dict, so frozen weights get no gradient, no optimizer state and are
checkpointed once; `merge` rebuilds the NNX model from both for the forward pass.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx


def path_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


class ParamSplit:
    def __init__(self, graphdef, abstract_state: nnx.State, frozen_regex: str = ""):
        self.graphdef = graphdef
        self._flat = [(path_name(p), p, v) for p, v in nnx.to_flat_state(abstract_state)]
        pattern = re.compile(frozen_regex) if frozen_regex else None
        self.frozen_names = frozenset(n for n, _, _ in self._flat if pattern and pattern.search(n))
        if pattern and not self.frozen_names:
            raise ValueError(f"train.frozen={frozen_regex!r} matches no parameter; paths look like "
                             f"{self._flat[0][0]!r}")
        if len(self.frozen_names) == len(self._flat):
            raise ValueError(f"train.frozen={frozen_regex!r} freezes every parameter")

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self._flat]

    def abstract(self) -> tuple[dict, dict]:
        """(trainable, frozen) dicts of the abstract values (ShapeDtypeStructs, logical-axis metadata)."""
        return self.split_flat({n: v for n, _, v in self._flat})

    def split_flat(self, flat: dict) -> tuple[dict, dict]:
        trainable = {n: x for n, x in flat.items() if n not in self.frozen_names}
        frozen = {n: x for n, x in flat.items() if n in self.frozen_names}
        return trainable, frozen

    def split(self, state: nnx.State) -> tuple[dict, dict]:
        return self.split_flat({path_name(p): v[...] for p, v in nnx.to_flat_state(state)})

    def state(self, trainable: dict, frozen: dict) -> nnx.State:
        return nnx.from_flat_state([(p, v.replace(trainable[n] if n in trainable else frozen[n]))
                                    for n, p, v in self._flat])

    def merge(self, trainable: dict, frozen: dict):
        return nnx.merge(self.graphdef, self.state(trainable, frozen))


# nnx.Linear (kernel, bias) and nnx.Embed (embedding, also the tied LM head) cast these to the compute dtype
# before every use; norm weights, A_log and dt_bias are read in float32.
_CAST_AT_USE = ("/kernel", "/bias", "/embedding")


def in_compute_dtype(abstract: dict, compute_dtype) -> dict:
    """Frozen weights that the layers only use in the compute dtype, held in it: bit-exact, half the memory
    and no per-step cast of them (about 8 ms of the 2B stage-1 step on an H100, BENCHMARKS.md)."""
    dt = jnp.dtype(compute_dtype)
    return {n: jax.ShapeDtypeStruct(a.shape, dt) if n.endswith(_CAST_AT_USE) and jnp.dtype(a.dtype).itemsize
            > dt.itemsize else a for n, a in abstract.items()}
