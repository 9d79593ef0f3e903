"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jetnemo_jax.layers.params import EMBED, linear
from jetnemo_jax.layers.params import MLP as MLP_AXIS

# gate and up as one matmul over weights stacked on a new axis (the mlp axis keeps its sharding): one GEMM and,
# in the backward, one element-wise pass writing both input gradients for one GEMM back to x. False: two Linears.
STACK_GATE_UP = True


class MLP(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(d, f, (EMBED, MLP_AXIS), rngs=rngs, cfg=cfg)
        self.up_proj = linear(d, f, (EMBED, MLP_AXIS), rngs=rngs, cfg=cfg)
        self.down_proj = linear(f, d, (MLP_AXIS, EMBED), rngs=rngs, cfg=cfg)

    def __call__(self, x):
        if not STACK_GATE_UP:
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        dtype = self.gate_proj.dtype
        w = jnp.stack([self.gate_proj.kernel[...], self.up_proj.kernel[...]], axis=1).astype(dtype)  # [d, 2, f]
        gate_up = jnp.einsum("...d,dkf->...kf", x.astype(dtype), w)
        return self.down_proj(jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :])
