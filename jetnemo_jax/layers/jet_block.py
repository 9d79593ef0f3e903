"""JetBlock: gated delta rule with SiLU q/k and a dynamically generated causal conv on the values.

Follows the official block (NVlabs/Jet-Nemotron `jet_block.py`) and its state-dict names. Gates and the
recurrent state are float32; the output norm is float32 and gated by silu(g_proj(x)).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jetnemo_jax import ops
from jetnemo_jax.layers.norms import RMSNorm
from jetnemo_jax.layers.params import EMBED, JET_HEADS, init_a_log, init_dt_bias, linear, param

# Mamba2-style initialisation of the decay parametrisation (as the official block).


class JetCache(NamedTuple):
    """Decode cache of one JetBlock: the last W-1 raw value projections and the recurrent state."""
    conv: jax.Array  # [B, W-1, Dv] in the activation dtype
    state: jax.Array  # [B, H, dk, dv] float32


class KernelGenerator(nnx.Module):
    """x -> per-token conv kernels, flat [.., Dv * W] channel-major (index d * W + w)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        j = cfg.jet
        # w2 = 0 and b2 ~ N(0, initializer_range): training starts from a static convolution. The official
        # module also zeroes w1, but silu(0) = 0 makes w1 = w2 = 0 a saddle where neither ever gets a
        # gradient (the generator stays dead); w1 ~ N(0, initializer_range) keeps the static start and
        # lets w2 learn from the first step.
        self.w1 = linear(cfg.hidden_size, j.generator_dim, (EMBED, None), rngs=rngs, cfg=cfg)
        self.w2 = linear(j.generator_dim, j.value_dim * j.conv_size, (None, JET_HEADS), rngs=rngs, cfg=cfg,
                         zero_init=True, use_bias=True, bias_std=cfg.initializer_range)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)))


class DynamicConv(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.conv_size, self.impl = cfg.jet.conv_size, cfg.conv_impl
        self.kernel_generator = KernelGenerator(cfg, rngs=rngs)

    def kernels(self, x):
        flat = self.kernel_generator(x)
        return flat.reshape(*flat.shape[:-1], flat.shape[-1] // self.conv_size, self.conv_size)

    def __call__(self, u, x, *, segment_ids=None, cache=None, return_cache=False):
        """u: raw value projections [B,T,Dv]; x: the generator input. Returns (v, final conv cache or None).
        The second projection goes to the op unapplied, so a fused kernel can generate the taps itself."""
        gen = self.kernel_generator
        h = jax.nn.silu(gen.w1(x))
        w2, b2 = (p[...].astype(gen.w2.dtype) for p in (gen.w2.kernel, gen.w2.bias))
        return ops.generated_dynamic_conv(u, h, w2, b2, segment_ids=segment_ids, cache=cache,
                                          output_final_cache=return_cache, impl=self.impl)

    def step(self, u, x, cache):
        """One token: u [B,Dv], x [B,hidden], cache [B,W-1,Dv] -> (v [B,Dv], new cache)."""
        return ops.dynamic_conv_step(u, self.kernels(x), cache)


class JetBlock(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        j = cfg.jet
        self.num_heads, self.head_k_dim, self.head_v_dim = j.num_heads, j.head_dim, j.head_v_dim
        self.gdr_impl = cfg.gdr_impl
        d = cfg.hidden_size
        lin = lambda i, o, axes: linear(i, o, axes, rngs=rngs, cfg=cfg)
        self.q_proj = lin(d, j.key_dim, (EMBED, JET_HEADS))
        self.k_proj = lin(d, j.key_dim, (EMBED, JET_HEADS))
        self.v_proj = lin(d, j.value_dim, (EMBED, JET_HEADS))
        self.g_proj = lin(d, j.value_dim, (EMBED, JET_HEADS))
        self.a_proj = lin(d, j.num_heads, (EMBED, None))
        self.b_proj = lin(d, j.num_heads, (EMBED, None))
        self.o_proj = lin(j.value_dim, d, (JET_HEADS, EMBED))
        self.A_log = param(init_a_log(rngs.params(), (j.num_heads,)), (None,))
        self.dt_bias = param(init_dt_bias(rngs.params(), (j.num_heads,)), (None,))
        self.o_norm = RMSNorm(j.head_v_dim, j.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))
        self.dynamic_conv1d = DynamicConv(cfg, rngs=rngs)

    def gates(self, x):
        """beta in (0, 1) and the log decay g <= 0, both float32 [.., H]."""
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...]
        g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(a)
        return g, beta

    def output(self, o, x):
        """Gated RMSNorm per head (weight shared by heads), then o_proj. o [.., H, dv]."""
        gate = self.g_proj(x).reshape(o.shape).astype(jnp.float32)
        y = self.o_norm(o, out_dtype=jnp.float32) * jax.nn.silu(gate)
        return self.o_proj(y.reshape(*o.shape[:-2], -1).astype(x.dtype))

    def __call__(self, x, *, segment_ids=None, cache: JetCache | None = None, return_cache: bool = False,
                 valid=None):
        """x [B,T,hidden] (normalised). With `cache`, continue from it (prefill in pieces); with
        `return_cache`, also return the JetCache after the last token. valid [B,T] bool: False marks left
        padding, which leaves the conv taps and the state exactly as they were."""
        B, T, _ = x.shape
        H, dk, dv = self.num_heads, self.head_k_dim, self.head_v_dim
        with jax.named_scope("jet_proj"):  # scopes label the ops for the step's profile
            q = jax.nn.silu(self.q_proj(x)).reshape(B, T, H, dk)
            k = jax.nn.silu(self.k_proj(x)).reshape(B, T, H, dk)
            u = self.v_proj(x)
            g, beta = self.gates(x)
            if valid is not None:
                # Padding enters the conv as the zeros a sequence start sees, and with g = 0, beta = 0 the
                # delta rule carries the state through it unchanged.
                u = jnp.where(valid[..., None], u, 0)
                g, beta = jnp.where(valid[..., None], g, 0.0), jnp.where(valid[..., None], beta, 0.0)
        with jax.named_scope("jet_conv"):
            v, conv = self.dynamic_conv1d(u, x, segment_ids=segment_ids,
                                          cache=None if cache is None else cache.conv, return_cache=return_cache)
        with jax.named_scope("jet_gdr"):
            o, state = ops.gated_delta_rule(q, k, v.reshape(B, T, H, dv), g, beta, segment_ids=segment_ids,
                                            initial_state=None if cache is None else cache.state,
                                            output_final_state=return_cache, impl=self.gdr_impl)
        with jax.named_scope("jet_proj"):
            y = self.output(o, x)
        return (y, JetCache(conv, state)) if return_cache else y

    def init_cache(self, batch: int, dtype) -> JetCache:
        conv_size = self.dynamic_conv1d.conv_size
        value_dim = self.num_heads * self.head_v_dim
        return JetCache(jnp.zeros((batch, conv_size - 1, value_dim), dtype),
                        jnp.zeros((batch, self.num_heads, self.head_k_dim, self.head_v_dim), jnp.float32))

    def step(self, x, cache: JetCache):
        """One decode token: x [B, hidden] -> (y [B, hidden], new JetCache)."""
        B = x.shape[0]
        H, dk, dv = self.num_heads, self.head_k_dim, self.head_v_dim
        q = jax.nn.silu(self.q_proj(x)).reshape(B, H, dk)
        k = jax.nn.silu(self.k_proj(x)).reshape(B, H, dk)
        v, conv = self.dynamic_conv1d.step(self.v_proj(x), x, cache.conv)
        g, beta = self.gates(x)
        o, state = ops.gated_delta_rule_step(q, k, v.reshape(B, H, dv), g, beta, cache.state)
        return self.output(o, x), JetCache(conv, state)
