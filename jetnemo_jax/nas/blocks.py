"""Candidate linear-attention blocks for PostNAS step 2, all sized by the model's JetBlock config.

Every block has nh heads with key dim dk and value dim dv (`cfg.jet`), so every candidate carries the
same recurrent state (nh * dk * dv per layer) and the comparison is between mechanisms, not state sizes.
Shared frame (as the fla layers): projections, a token mixer, per-head RMSNorm gated by silu(g_proj(x)),
o_proj. Mixers:
  gated_deltanet  silu(short conv) on q, k, v; gated delta rule, g = -exp(A_log) softplus(a + dt_bias)
  deltanet        the same without decay (g = 0)
  gla             q, k plain; per-key-dim decay g = logsigmoid(low-rank(x)) / 16 (GLA's normaliser)
  retnet          q, k plain; a fixed per-head decay 1 - 2^-(5..) (RetNet-style retention, without xPos)
  mamba2          silu(short conv) on x=v, B=k, C=q; per-head decay g = -exp(A_log) dt, input scaled by
                  dt, a D skip (Mamba2-style SSD; per-head B and C instead of Mamba2's shared groups)
  jet             the JetBlock itself (jetnemo_jax.layers.jet_block)
All expose `__call__(x, segment_ids=None)`, `init_cache(batch, dtype)` and `step(x, cache)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jetnemo_jax import ops
from jetnemo_jax.layers.jet_block import JetBlock
from jetnemo_jax.layers.norms import RMSNorm
from jetnemo_jax.layers.params import EMBED, JET_HEADS, init_a_log, init_dt_bias, linear, param
from jetnemo_jax.ops.linear_attention import (
    gated_linear_attention,
    gated_linear_attention_step,
)

BLOCKS = ("jet", "gated_deltanet", "deltanet", "gla", "retnet", "mamba2")
_CONV = {"gated_deltanet", "deltanet", "mamba2"}  # blocks with a short conv on q, k, v
_DELTA = {"gated_deltanet", "deltanet"}  # blocks that use the delta rule
_GLA_RANK, _GLA_NORMALISER = 16, 16.0


class MixerCache(NamedTuple):
    conv: jax.Array | None  # [B, W-1, 2*Dk + Dv]: the last raw q, k, v projections (short-conv blocks)
    state: jax.Array  # [B, H, dk, dv] float32


def _conv_init(key, shape, dtype=jnp.float32):
    """Short-conv taps [D, W]: identity (the current token) plus noise, so the block starts from its inputs."""
    return jnp.zeros(shape, dtype).at[:, -1].set(1.0) + 0.1 * jax.random.normal(key, shape, dtype)


class LinearMixer(nnx.Module):
    def __init__(self, cfg, kind: str, *, rngs: nnx.Rngs):
        if kind not in BLOCKS or kind == "jet":
            raise ValueError(f"unknown linear block {kind!r}; LinearMixer builds {BLOCKS[1:]}")
        j = cfg.jet
        self.kind, self.gdr_impl = kind, cfg.gdr_impl
        self.num_heads, self.head_k_dim, self.head_v_dim = j.num_heads, j.head_dim, j.head_v_dim
        self.conv_size = j.conv_size
        d, H = cfg.hidden_size, j.num_heads
        lin = lambda i, o, axes, **kw: linear(i, o, axes, rngs=rngs, cfg=cfg, **kw)
        self.q_proj = lin(d, j.key_dim, (EMBED, JET_HEADS))
        self.k_proj = lin(d, j.key_dim, (EMBED, JET_HEADS))
        self.v_proj = lin(d, j.value_dim, (EMBED, JET_HEADS))
        self.g_proj = lin(d, j.value_dim, (EMBED, JET_HEADS))
        self.o_proj = lin(j.value_dim, d, (JET_HEADS, EMBED))
        self.o_norm = RMSNorm(j.head_v_dim, j.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))
        if kind in _CONV:
            self.conv = param(_conv_init(rngs.params(), (2 * j.key_dim + j.value_dim, j.conv_size)), (None, None))
        if kind in _DELTA:
            self.b_proj = lin(d, H, (EMBED, None))
        if kind in ("gated_deltanet", "mamba2"):
            self.a_proj = lin(d, H, (EMBED, None))
            self.A_log = param(init_a_log(rngs.params(), (H,)), (None,))
            self.dt_bias = param(init_dt_bias(rngs.params(), (H,)), (None,))
        if kind == "mamba2":
            self.D = param(jnp.ones((H,), jnp.float32), (None,))
        if kind == "gla":
            self.gk_down = lin(d, _GLA_RANK, (EMBED, None))
            self.gk_up = lin(_GLA_RANK, j.key_dim, (None, JET_HEADS), use_bias=True)

    def _features(self, x, qkv):
        """qkv: the (short-convolved) projections [.., 2*Dk + Dv] -> q, k [.., H, dk], v [.., H, dv] and the
        mixer's gates: (g, beta) for delta-rule blocks, (g, dt) for mamba2, (g, None) otherwise."""
        H, dk, dv = self.num_heads, self.head_k_dim, self.head_v_dim
        lead = x.shape[:-1]
        q, k, v = jnp.split(qkv, [H * dk, 2 * H * dk], axis=-1)
        q, k, v = q.reshape(*lead, H, dk), k.reshape(*lead, H, dk), v.reshape(*lead, H, dv)
        f32 = jnp.float32
        if self.kind in _DELTA:
            beta = jax.nn.sigmoid(self.b_proj(x).astype(f32))
            g = jnp.zeros_like(beta) if self.kind == "deltanet" else self._decay(x)[0]
            return q, k, v, g, beta
        if self.kind == "mamba2":
            g, dt = self._decay(x)
            return q, k, v, g, dt
        if self.kind == "gla":
            g = jax.nn.log_sigmoid(self.gk_up(self.gk_down(x)).astype(f32)) / _GLA_NORMALISER
            return q, k, v, g.reshape(*lead, H, dk), None
        # retnet: gamma_h = 1 - 2^-(5 + 4h/(H-1)), the retention decays spread over heads
        exps = 5.0 + 4.0 * jnp.arange(H) / max(H - 1, 1)
        g = jnp.broadcast_to(jnp.log1p(-jnp.exp2(-exps)), (*lead, H)).astype(f32)
        return q, k, v, g, None

    def _decay(self, x):
        dt = jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...])
        return -jnp.exp(self.A_log[...]) * dt, dt

    def _projections(self, x):
        return jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

    def _conv_kernels(self, lead):
        return jnp.broadcast_to(self.conv[...], (*lead, *self.conv.shape))

    def _output(self, o, x, v):
        if self.kind == "mamba2":
            o = o + self.D[...][:, None] * v.astype(o.dtype)
        gate = self.g_proj(x).reshape(o.shape).astype(jnp.float32)
        y = self.o_norm(o, out_dtype=jnp.float32) * jax.nn.silu(gate)
        return self.o_proj(y.reshape(*o.shape[:-2], -1).astype(x.dtype))

    def __call__(self, x, *, segment_ids=None):
        """x [B,T,hidden] (normalised) -> [B,T,hidden]."""
        qkv = self._projections(x)
        if self.kind in _CONV:
            qkv, _ = ops.dynamic_conv(qkv, self._conv_kernels(qkv.shape[:2]), segment_ids=segment_ids)
        q, k, v, g, extra = self._features(x, qkv)
        if self.kind in _DELTA:
            o, _ = ops.gated_delta_rule(q, k, v, g, extra, segment_ids=segment_ids, impl=self.gdr_impl)
        else:
            k_in = k * extra[..., None].astype(k.dtype) if self.kind == "mamba2" else k
            o, _ = gated_linear_attention(q, k_in, v, g, segment_ids=segment_ids)
        return self._output(o.astype(jnp.float32), x, v)

    def init_cache(self, batch: int, dtype) -> MixerCache:
        width = self.num_heads * (2 * self.head_k_dim + self.head_v_dim)
        conv = jnp.zeros((batch, self.conv_size - 1, width), dtype) if self.kind in _CONV else None
        return MixerCache(conv, jnp.zeros((batch, self.num_heads, self.head_k_dim, self.head_v_dim), jnp.float32))

    def step(self, x, cache: MixerCache):
        """One decode token: x [B, hidden] -> (y [B, hidden], new cache)."""
        qkv, conv = self._projections(x), cache.conv
        if self.kind in _CONV:
            qkv, conv = ops.dynamic_conv_step(qkv, self._conv_kernels(qkv.shape[:1]), conv)
        q, k, v, g, extra = self._features(x, qkv)
        if self.kind in _DELTA:
            o, state = ops.gated_delta_rule_step(q, k, v, g, extra, cache.state)
        else:
            k_in = k * extra[..., None].astype(k.dtype) if self.kind == "mamba2" else k
            o, state = gated_linear_attention_step(q, k_in, v, g, cache.state)
        return self._output(o.astype(jnp.float32), x, v), MixerCache(conv, state)


def make_block(kind: str, cfg, *, rngs: nnx.Rngs):
    """A linear-attention block of `kind` (one of BLOCKS) for a model config with a `jet` section."""
    if cfg.jet is None:
        raise ValueError("the model config needs a jet section: it sizes every candidate block")
    return JetBlock(cfg, rngs=rngs) if kind == "jet" else LinearMixer(cfg, kind, rngs=rngs)


def state_size(cfg) -> int:
    """Recurrent state values per layer, nh * dk * dv (the hardware-aware search holds it fixed)."""
    return math.prod((cfg.jet.num_heads, cfg.jet.head_dim, cfg.jet.head_v_dim))
