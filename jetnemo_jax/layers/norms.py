"""RMSNorm in float32 (weight applied in float32, then cast back), as Jet-Nemotron's RMSNorm does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jetnemo_jax.layers.params import NORM, param


def rms_normalize(x, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), param_dtype), (NORM,))

    def __call__(self, x, out_dtype=None):
        y = rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
        return y.astype(out_dtype or x.dtype)
