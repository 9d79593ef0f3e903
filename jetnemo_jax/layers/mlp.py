"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from jetnemo_jax.layers.params import EMBED, linear
from jetnemo_jax.layers.params import MLP as MLP_AXIS


class MLP(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(d, f, (EMBED, MLP_AXIS), rngs=rngs, cfg=cfg)
        self.up_proj = linear(d, f, (EMBED, MLP_AXIS), rngs=rngs, cfg=cfg)
        self.down_proj = linear(f, d, (MLP_AXIS, EMBED), rngs=rngs, cfg=cfg)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
