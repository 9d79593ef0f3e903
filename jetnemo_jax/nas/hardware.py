"""PostNAS step 4, hardware-aware search: (dk, dv, heads) at a fixed recurrent-state size, ranked by
decode throughput measured on this machine and an accuracy proxy; plus the decode timers the block
comparison uses.

Long-context decode is bound by the state and KV-cache traffic, not by parameter count, so the grid holds
nh * dk * dv fixed and lets the projections' shapes vary; what each point costs is measured, not modelled.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from jetnemo_jax.config import JetBlockConfig, ModelConfig
from jetnemo_jax.generate import Sampling, decode
from jetnemo_jax.model import JetNemotronForCausalLM


def grid(state_size: int, head_dims, value_dims, heads, generator_reduction: int = 8) -> list[tuple[int, int, int]]:
    """Every (num_heads, dk, dv) from the candidate lists with num_heads * dk * dv == state_size (and a
    value dim the kernel generator's reduction divides)."""
    points = [(h, dk, dv) for h in heads for dk in head_dims for dv in value_dims
              if h * dk * dv == state_size and (h * dv) % generator_reduction == 0]
    if not points:
        raise ValueError(f"no (heads, dk, dv) in the grid has a state of {state_size} values")
    return sorted(points)


def _timed(fn, *args) -> float:
    """Seconds of one call after a compiling call."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def model_decode_tokens_per_s(cfg: ModelConfig, *, batch: int, context: int, steps: int, seed: int = 0) -> float:
    """Greedy decode tokens/s of the whole model (random weights) at `context` tokens of cache, through
    jetnemo_jax.generate's decode loop. The caches are empty but sized for the context: attention reads
    every slot whatever it holds, so the work is that of a filled cache."""
    model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    pos = jnp.full((batch,), context, jnp.int32)
    logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    kw = dict(out_len=steps, sampling=Sampling(), stop_tokens=(), pad_id=0)

    def run():
        caches = model.init_cache(batch, context + steps + 1)
        return decode(graphdef, state, caches, logits, pos, jax.random.key(0), jnp.int32(steps), **kw)[0]

    return batch * (steps - 1) / _timed(run)  # the loop runs steps - 1 model steps


def block_decode_tokens_per_s(block, hidden_size: int, *, batch: int, steps: int, dtype) -> float:
    """Decode tokens/s of one linear-attention block alone (its `step` in a `lax.scan`)."""
    graphdef, state = nnx.split(block)
    x = jax.random.normal(jax.random.key(0), (steps, batch, hidden_size), dtype)

    @jax.jit
    def run(state, x):
        blk = nnx.merge(graphdef, state)
        cache = blk.init_cache(batch, dtype)
        return jax.lax.scan(lambda c, x_t: blk.step(x_t, c)[::-1], cache, x)[1]

    return batch * steps / _timed(run, state, x)


def pareto(rows: list[dict], maximise: tuple[str, ...]) -> list[bool]:
    """Per row: True if no other row is at least as good on every key of `maximise` and better on one."""
    def dominates(a, b):
        return all(a[k] >= b[k] for k in maximise) and any(a[k] > b[k] for k in maximise)
    return [not any(dominates(o, r) for o in rows if o is not r) for r in rows]


def jet_config(base: JetBlockConfig, point: tuple[int, int, int]) -> JetBlockConfig:
    h, dk, dv = point
    return JetBlockConfig(num_heads=h, head_dim=dk, head_v_dim=dv, conv_size=base.conv_size,
                          generator_reduction=base.generator_reduction, norm_eps=base.norm_eps)
