"""Decode and prefill throughput: Jet-Nemotron-2B vs the Qwen2.5-1.5B shape, random weights, same code.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python bench/decode.py --out decode.json [--deadline-s 300]  # one GPU
    python bench/decode.py --smoke                                                     # tiny preset on CPU

For each model and context (4K, 16K, 64K, then doubling while batch 1 still fits, up to --max-context):
- the largest decode batch that fits (from XLA's memory analysis of the compiled decode loop, starting at
  the cache estimate; nothing is allocated until it fits), and decode tokens/s at that batch: caches filled with a
  synthetic state (only the positions matter for the work done), `--steps` steps of the jitted decode loop of
  jetnemo_jax.generate (greedy) after a warm-up run, timed with block_until_ready;
- bytes moved per decode step (every weight once, the tied embedding again as the LM head, every cache
  read in full and the JetBlock states written back) and the fraction of the HBM roofline that implies;
- prefill tokens/s at batch 1 through the chunked prefill (--prefill-chunk tokens per call; smaller at long
  contexts so the chunk x context attention scores stay under ~2 GiB).
Prints a table with the device name and ratios Jet / Qwen, writes --out JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jetnemo_jax import config
from jetnemo_jax.cache import cache_bytes
from jetnemo_jax.generate import Sampling, decode, prefill_chunk
from jetnemo_jax.layers.attention import KVCache
from jetnemo_jax.model import JetNemotronForCausalLM

HBM_SPEC, HBM_MEASURED = 3.35e12, 3.0e12  # H100 SXM: datasheet and measured copy bandwidth, bytes/s


def is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def synthetic_caches(model, batch: int, context: int, slots: int):
    """Caches as if `context` tokens had been prefilled: every attention slot up to `context` holds a
    position, JetBlock states are random. Built on device, one layer at a time (donated) so that no more
    than one layer's cache is ever held twice."""
    def fill(cache):
        if isinstance(cache, KVCache):
            S = cache.pos.shape[1]
            # Slot s holds the latest position < context that maps to it (empty if none).
            last = context - 1 - (context - 1 - jnp.arange(S)) % S
            pos = jnp.where(last >= 0, last, -1).astype(jnp.int32)
            return cache._replace(pos=jnp.broadcast_to(pos, cache.pos.shape))
        return cache._replace(state=jax.random.normal(jax.random.key(0), cache.state.shape, cache.state.dtype) * 0.1)

    caches = jax.jit(lambda: model.init_cache(batch, slots))()
    fill = jax.jit(fill, donate_argnums=0)
    return [fill(caches.pop(0)) for _ in range(len(caches))]


def step_bytes(model, cfg, batch: int, context: int) -> int:
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    head = cfg.vocab_size * cfg.hidden_size * jnp.dtype(cfg.param_dtype).itemsize if cfg.tie_word_embeddings else 0
    cache = cache_bytes(cfg, context, batch)
    jet_state = cfg.layer_types.count("jet") * batch * cfg.jet.num_heads * cfg.jet.head_dim * cfg.jet.head_v_dim * 4 \
        if cfg.jet else 0
    return params + head + cache["total"] + jet_state


def decode_args(model, batch: int, steps: int):
    logits = jnp.zeros((batch, model.config.vocab_size), jnp.float32)
    kw = dict(out_len=steps, sampling=Sampling(), stop_tokens=(), pad_id=0)
    return logits, jax.random.key(0), kw


def compile_decode(model, batch: int, context: int, steps: int):
    """Ahead-of-time compile of generate.decode at this batch -> (compiled, bytes it needs on top of the
    weights: caches, outputs and temporaries, from XLA's own memory analysis, before anything is allocated)."""
    graphdef, state = nnx.split(model)
    caches = jax.eval_shape(lambda: model.init_cache(batch, context + steps + 1))
    logits, key, kw = decode_args(model, batch, steps)
    pos = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = decode.lower(graphdef, state, caches, logits, pos, key, jnp.int32(steps), **kw).compile()
    m = compiled.memory_analysis()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    need = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return compiled, need - weights


def time_decode(model, compiled, batch: int, context: int, steps: int):
    """-> seconds per decode step of the compiled loop at this batch and context (raises on OOM)."""
    _, state = nnx.split(model)
    caches = synthetic_caches(model, batch, context, context + steps + 1)
    logits, key, _ = decode_args(model, batch, steps)
    pos = jnp.full((batch,), context, jnp.int32)
    out, _, caches = compiled(state, caches, logits, pos, key, jnp.int32(2))  # warm-up
    out.block_until_ready()
    # Same positions again: the caches' contents do not change the work.
    t = time.perf_counter()
    out, n, caches = compiled(state, caches, logits, pos, key, jnp.int32(steps))
    out.block_until_ready()
    dt = time.perf_counter() - t
    assert int(n) == steps
    del caches
    return dt / (steps - 1)  # the loop runs steps - 1 model steps (the first token comes from the logits)


def max_batch(model, cfg, context: int, steps: int, cap: int, log):
    """Largest batch <= cap whose decode fits, chosen by XLA's memory analysis of the compiled loop: start
    from the cache estimate, rescale by what the compiler says the loop needs (no out-of-memory retries,
    which cost minutes on a GPU), then run; shrink by 10% if the run still fails to allocate."""
    stats = jax.devices()[0].memory_stats() or {}
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0) if "bytes_limit" in stats else None
    per_seq = cache_bytes(cfg, context + steps + 1)["total"] + 4 * cfg.vocab_size * 4
    b = cap if free is None else max(1, min(cap, int(0.9 * free // per_seq)))
    for _ in range(4):
        compiled, need = compile_decode(model, b, context, steps)
        log(f"  batch {b}: compiled, needs {need / 2**30:.1f} GiB" + (f" of {free / 2**30:.1f} free" if free else ""))
        if free is None or 0.85 * free <= need <= 0.95 * free or (need < 0.85 * free and b == cap):
            break
        new = max(1, min(cap, int(b * 0.92 * free / need)))
        if new == b:
            break
        b = new
    if free is not None and need > free:
        return None
    for _ in range(3):
        try:
            t = time_decode(model, compiled, b, context, steps)
            log(f"  batch {b}: {b / t:,.0f} tok/s")
            return b, t
        except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
            if not is_oom(e) or b == 1:
                raise
            log(f"  batch {b}: out of memory at run time")
            gc.collect()
            b = max(1, int(b * 0.9))
            compiled, _ = compile_decode(model, b, context, steps)
    return None


def time_prefill(model, context: int, chunk: int):
    graphdef, state = nnx.split(model)
    heads = model.config.num_attention_heads
    while chunk > 64 and heads * chunk * context * 4 > 2 << 30:
        chunk //= 2
    chunk = min(chunk, context)
    caches = model.init_cache(1, context)
    ids = jnp.zeros((1, chunk), jnp.int32)
    valid = jnp.ones((1, chunk), bool)
    pos0 = jnp.arange(chunk, dtype=jnp.int32)[None]
    logits, caches = prefill_chunk(graphdef, state, caches, ids, pos0, valid)  # compile + warm-up
    logits.block_until_ready()
    caches = model.init_cache(1, context)
    t = time.perf_counter()
    for c0 in range(0, context - chunk + 1, chunk):
        logits, caches = prefill_chunk(graphdef, state, caches, ids, pos0 + c0, valid)
    logits.block_until_ready()
    n = (context // chunk) * chunk
    return n / (time.perf_counter() - t), chunk


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny preset and small contexts (CPU test)")
    parser.add_argument("--models", default="jet_nemotron_2b,qwen2_5_1_5b")
    parser.add_argument("--contexts", default="4096,16384,65536")
    parser.add_argument("--max-context", type=int, default=262144, help="keep doubling past the list up to this")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps")
    parser.add_argument("--max-batch-cap", type=int, default=2048)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", help="activations and weights")
    parser.add_argument("--deadline-s", type=float, default=0, help="start no new (model, context) after this")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        models, contexts, args.max_context, args.max_batch_cap, args.steps = ["tiny", "tiny_attn"], [64], 256, 8, 8
        args.prefill_chunk = 64
    else:
        models, contexts = args.models.split(","), [int(c) for c in args.contexts.split(",")]
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    device = jax.devices()[0].device_kind
    log = lambda msg: print(msg, flush=True)
    log(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}, dtype {args.dtype}")

    def build(name):
        if name == "tiny_attn":  # the smoke run's stand-in for the all-attention baseline
            cfg = config.tiny(layer_types=("attn",) * 6, dtype=args.dtype, param_dtype=args.dtype)
        else:
            cfg = config.preset(name, dtype=args.dtype, param_dtype=args.dtype)
        return cfg, JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(0))

    built = {name: build(name) for name in models}
    ctxs = list(contexts)
    while ctxs[-1] * 2 <= args.max_context:
        ctxs.append(ctxs[-1] * 2)
    rows, start = [], time.perf_counter()
    # Contexts outside, models inside: a run cut short by --deadline-s still has both models at each context.
    for ctx in ctxs:
        for name, (cfg, model) in list(built.items()):
            if args.deadline_s and time.perf_counter() - start > args.deadline_s:
                log(f"{name} @ {ctx}: skipped, past --deadline-s {args.deadline_s}")
                continue
            log(f"{name} @ {ctx}:")
            found = max_batch(model, cfg, ctx, args.steps, args.max_batch_cap, log)
            if found is None:
                log("  batch 1 does not fit: no longer contexts for this model")
                del built[name]
                gc.collect()
                continue
            batch, dt = found
            moved = step_bytes(model, cfg, batch, ctx)
            row = dict(model=name, context=ctx, batch=batch, decode_tok_s=batch / dt, step_ms=dt * 1e3,
                       cache_mib_per_seq=cache_bytes(cfg, ctx)["total"] / 2**20, bytes_per_step=moved,
                       hbm_tb_s=moved / dt / 1e12, roofline_spec=moved / dt / HBM_SPEC,
                       roofline_measured=moved / dt / HBM_MEASURED)
            if not args.no_prefill:
                try:
                    row["prefill_tok_s"], row["prefill_chunk"] = time_prefill(model, ctx, args.prefill_chunk)
                except Exception as e:  # noqa: BLE001
                    if not is_oom(e):
                        raise
                    row["prefill_tok_s"] = None
                    log("  prefill: out of memory")
            rows.append(row)
            log(f"  -> {row['decode_tok_s']:,.0f} tok/s decode at batch {batch}, "
                f"prefill {row.get('prefill_tok_s') or 0:,.0f} tok/s ({time.perf_counter() - start:.0f} s in)")
            gc.collect()

    by = {(r["model"], r["context"]): r for r in rows}
    print(f"\n{device}: decode at the largest batch that fits; prefill at batch 1; {args.dtype}, random weights")
    header = (f"{'model':<16} {'context':>8} {'batch':>6} {'decode tok/s':>13} {'step ms':>8} {'cache MiB/seq':>13} "
              f"{'GB/step':>8} {'HBM TB/s':>9} {'roofline':>9} {'prefill tok/s':>14}")
    print(header)
    for r in rows:
        pf = r.get("prefill_tok_s")
        print(f"{r['model']:<16} {r['context']:>8} {r['batch']:>6} {r['decode_tok_s']:>13,.0f} {r['step_ms']:>8.2f} "
              f"{r['cache_mib_per_seq']:>13,.1f} {r['bytes_per_step'] / 1e9:>8.2f} {r['hbm_tb_s']:>9.2f} "
              f"{r['roofline_spec']:>8.0%} {pf if pf is None else f'{pf:,.0f}':>14}")
    ratios = []
    if len(models) == 2:
        a, b = models
        for ctx in sorted({r["context"] for r in rows}):
            if (a, ctx) in by and (b, ctx) in by:
                ra, rb = by[a, ctx], by[b, ctx]
                ratio = dict(context=ctx, decode=ra["decode_tok_s"] / rb["decode_tok_s"],
                             cache=rb["cache_mib_per_seq"] / ra["cache_mib_per_seq"])
                if ra.get("prefill_tok_s") and rb.get("prefill_tok_s"):
                    ratio["prefill"] = ra["prefill_tok_s"] / rb["prefill_tok_s"]
                ratios.append(ratio)
                print(f"{a} / {b} @ {ctx}: decode {ratio['decode']:.1f}x, prefill "
                      f"{ratio.get('prefill', float('nan')):.2f}x, cache {ratio['cache']:.1f}x smaller")
    print("roofline: bytes per step / step time against the 3.35 TB/s H100 SXM datasheet (x1.12 for ~3.0 "
          "measured); paper at 64K: Jet-Nemotron-2B 2,885 tok/s, Qwen2.5-1.5B 241 (12x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device, backend=jax.default_backend(), jax=jax.__version__, dtype=args.dtype,
                           steps=args.steps, rows=rows, ratios=ratios), f, indent=2)


if __name__ == "__main__":
    main()
