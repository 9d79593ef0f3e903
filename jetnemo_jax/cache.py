"""Decode-cache accounting: bytes per layer type at a context length, from the caches' own shapes."""

from __future__ import annotations

import collections

import jax
from flax import nnx

from jetnemo_jax.config import ModelConfig
from jetnemo_jax.model import JetNemotronForCausalLM


def cache_bytes(cfg: ModelConfig, context: int, batch: int = 1) -> dict[str, int]:
    """{"attn": .., "swa": .., "jet": .., "total": ..} bytes of the decode caches holding `context` tokens.

    Computed abstractly (no memory allocated) from `init_cache`, so it is exactly what decoding holds:
    K/V in the activation dtype, W slots for sliding-window layers, fp32 states and conv taps for JetBlocks.
    """
    model = nnx.eval_shape(lambda: JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(0)))
    caches = jax.eval_shape(lambda: model.init_cache(batch, context))
    out = collections.Counter()
    for layer_type, cache in zip(cfg.layer_types, caches):
        out[layer_type] += sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    out["total"] = sum(out.values())
    return dict(out)
