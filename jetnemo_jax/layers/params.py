"""Parameter helpers: every parameter carries logical axis names (mapped to mesh axes in sharding rules)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axes used on parameters.
EMBED, MLP, VOCAB, Q_HEADS, KV_HEADS, JET_HEADS, NORM = (
    "embed", "mlp", "vocab", "q_heads", "kv_heads", "jet_heads", "norm")

# Decay-gate initialisation of the gated-delta-rule heads (Mamba2 / fla's GatedDeltaNet).
A_INIT_RANGE = (0.0, 16.0)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


def linear(in_dim: int, out_dim: int, axes: tuple, *, rngs: nnx.Rngs, cfg, use_bias: bool = False,
           zero_init: bool = False, bias_std: float = 0.0) -> nnx.Linear:
    """A Linear layer (kernel [in, out]); weights N(0, initializer_range) like the HF models (zeros with
    `zero_init`), biases zero unless `bias_std` > 0."""
    init = jax.nn.initializers.zeros if zero_init else normal(cfg.initializer_range)
    bias_init = normal(bias_std) if bias_std > 0 else jax.nn.initializers.zeros
    return nnx.Linear(
        in_dim, out_dim, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nnx.with_partitioning(init, axes, eager_sharding=False),
        bias_init=nnx.with_partitioning(bias_init, axes[1:], eager_sharding=False),
        rngs=rngs)


def param(value, axes: tuple) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def init_a_log(key, shape, dtype=jnp.float32):
    """A_log = log(A), A ~ U(A_INIT_RANGE)."""
    return jnp.log(jax.random.uniform(key, shape, dtype, *A_INIT_RANGE))


def init_dt_bias(key, shape, dtype=jnp.float32):
    """softplus^-1 of dt, dt log-uniform in [DT_MIN, DT_MAX] and at least DT_FLOOR."""
    u = jax.random.uniform(key, shape, dtype)
    dt = jnp.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
    dt = jnp.maximum(dt, DT_FLOOR)
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus
