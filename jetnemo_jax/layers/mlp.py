"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from jetnemo_jax.layers.params import EMBED, linear
from jetnemo_jax.layers.params import MLP as MLP_AXIS


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up, differentiated as JAX would (the same ops in the same order) but keeping only gate and
    up for the backward (the projections' outputs, kept anyway) and recomputing sigmoid(gate) there: autodiff
    also keeps sigmoid(gate) and silu(gate), two more [tokens, intermediate] tensors written per layer."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dh):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    d_silu = dh * up
    # silu = gate * sig, and sigmoid's derivative as JAX's logistic JVP: sig * (1 - sig)
    d_gate = d_silu * sig + (gate * d_silu) * (sig * (1 - sig))
    return d_gate, (gate * sig) * dh


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(d, f, (EMBED, MLP_AXIS), rngs=rngs, cfg=cfg)
        self.up_proj = linear(d, f, (EMBED, MLP_AXIS), rngs=rngs, cfg=cfg)
        self.down_proj = linear(f, d, (MLP_AXIS, EMBED), rngs=rngs, cfg=cfg)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
