"""Batched generation: chunked prefill of left-padded prompts, then a jitted decode loop with sampling.

    python -m jetnemo_jax.generate --checkpoint DIR [--tokenizer DIR] --prompt "Hello" [--prompt ...]
        [--prompt-file FILE] [--max-new-tokens 64] [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0]
        [--dtype bfloat16] [--prefill-chunk 512] [--verbose]

--checkpoint takes a jetnemo_jax checkpoint, an HF export, or a training workdir (its final/); the tokenizer
is the checkpoint's own unless --tokenizer names one.

The library works on token ids (`generate(model, prompts, ...)`); only the CLI touches a tokenizer.

Prompts of different lengths share a batch by padding on the left: each prompt's positions start at 0 at
its first real token, and the padding is masked out of attention and skipped by JetBlocks, so a batch gives
the tokens each prompt gives alone. Prompts are prefilled in chunks of `prefill_chunk` tokens (a 64K prompt
never builds a 64K x 64K attention), then one `lax.while_loop` decodes all new tokens on device.
Compiled shapes are bucketed: the padded prompt length and the new-token budget round up to powers of two,
so new prompt lengths reuse a compilation; each compilation is logged.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jetnemo_jax import cli
from jetnemo_jax.model import JetNemotronForCausalLM

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (top_k / top_p are then irrelevant); top_k 0 and top_p 1 switch those off.
    top_k keeps the k most likely tokens; top_p then keeps the smallest most-likely set whose probability
    (renormalised after top_k) reaches top_p."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


def sample(logits, key, sampling: Sampling):
    """logits [B, V] -> token ids [B] int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if not sampling.top_k and sampling.top_p == 1:
        return jax.random.categorical(key, logits).astype(jnp.int32)
    vals, idx = jax.lax.top_k(logits, sampling.top_k or logits.shape[-1])  # sorted, most likely first
    if sampling.top_p < 1:
        probs = jax.nn.softmax(vals, -1)
        mass_before = jnp.cumsum(probs, -1) - probs  # of the strictly more likely tokens; 0 for the first
        vals = jnp.where(mass_before < sampling.top_p, vals, -jnp.inf)
    choice = jax.random.categorical(key, vals)
    return jnp.take_along_axis(idx, choice[:, None], -1)[:, 0].astype(jnp.int32)


def bucket(n: int, minimum: int = 8) -> int:
    """The power of two >= max(n, minimum): compiled shapes come from a small set."""
    return max(minimum, 1 << (n - 1).bit_length())


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [B, max_new_tokens] int32; after a stop token (kept) or the end: pad_id
    lengths: np.ndarray  # [B] new tokens per row, a stop token included


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("caches",))
def prefill_chunk(graphdef, state, caches, ids, positions, valid):
    """One prompt chunk through the caches -> (last column's logits [B, V], caches)."""
    log.info("compiling prefill: batch %d, chunk %d, cache %s", *ids.shape, _cache_len(caches))
    model = nnx.merge(graphdef, state)
    hidden, caches = model.prefill_hidden(ids, caches, positions=positions, valid=valid)
    # With left padding the last column is every row's last prompt token.
    return model.logits(hidden[:, -1]), caches


@functools.partial(jax.jit, static_argnames=("graphdef", "out_len", "sampling", "stop_tokens", "pad_id"),
                   donate_argnames=("caches",))
def decode(graphdef, state, caches, logits, positions, key, max_new_tokens, *, out_len: int,
           sampling: Sampling, stop_tokens: tuple[int, ...], pad_id: int):
    """Sample from `logits` [B, V] (the prompt's last), then feed each new token back at `positions` [B]
    (the next free position per row) until `max_new_tokens` (traced, <= out_len) or every row has stopped.
    Returns (tokens [B, out_len], steps taken, caches)."""
    log.info("compiling decode: batch %d, cache %s, up to %d new tokens, %s", logits.shape[0],
             _cache_len(caches), out_len, sampling)
    model = nnx.merge(graphdef, state)
    B = logits.shape[0]
    stops = jnp.asarray(stop_tokens, jnp.int32)

    def pick(logits, key, finished):
        """-> (sampled token, fed back even after a stop: any real id will do; the token recorded)."""
        key, sub = jax.random.split(key)
        tok = sample(logits, sub, sampling)
        shown = jnp.where(finished, pad_id, tok)
        return tok, shown, finished | jnp.isin(shown, stops), key

    tok, shown, finished, key = pick(logits, key, jnp.zeros((B,), bool))
    out = jnp.full((B, out_len), pad_id, jnp.int32).at[:, 0].set(shown)

    def cond(carry):
        step, _, _, _, _, finished, _ = carry
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(carry):
        step, out, tok, pos, caches, finished, key = carry
        logits, caches = model.decode_step(tok, pos, caches)
        tok, shown, finished, key = pick(logits, key, finished)
        return step + 1, out.at[:, step].set(shown), tok, pos + 1, caches, finished, key

    step, out, _, _, caches, _, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), out, tok, positions, caches, finished, key))
    return out, step, caches


def _cache_len(caches):
    return sorted({c.pos.shape[1] for c in caches if hasattr(c, "pos")})


def generate(model: JetNemotronForCausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (), pad_id: int = 0, seed: int = 0,
             prefill_chunk_len: int = 512) -> Generation:
    """Generate up to `max_new_tokens` after each prompt (lists of token ids, any lengths) in one batch.

    A row stops after emitting any of `stop_tokens` (the stop token is kept, then `pad_id` follows; pad_id
    only fills the output).
    `prefill_chunk_len` bounds the prompt tokens per prefill call (memory: chunk x cache attention scores).
    """
    cfg = model.config
    if not prompts:
        raise ValueError("no prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside [0, {cfg.vocab_size})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    if prefill_chunk_len < 1:
        raise ValueError(f"prefill_chunk_len={prefill_chunk_len}: must be positive")
    lengths = np.array([len(p) for p in prompts])
    if lengths.max() + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"longest prompt ({lengths.max()}) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_position_embeddings ({cfg.max_position_embeddings})")

    B = len(prompts)
    padded = bucket(int(lengths.max()))
    chunk = min(prefill_chunk_len, padded)
    padded = -(-padded // chunk) * chunk
    out_len = bucket(max_new_tokens)
    ids = np.zeros((B, padded), np.int32)  # the left padding's ids are never seen; 0 is in every vocabulary
    for i, p in enumerate(prompts):
        ids[i, padded - len(p):] = p
    # Position of each column per row: negative over the left padding.
    positions = np.arange(padded)[None] - (padded - lengths)[:, None]

    graphdef, state = nnx.split(model)
    caches = model.init_cache(B, padded + out_len)
    for c0 in range(0, padded, chunk):
        pos = jnp.asarray(positions[:, c0:c0 + chunk], jnp.int32)
        logits, caches = prefill_chunk(graphdef, state, caches, jnp.asarray(ids[:, c0:c0 + chunk]), pos, pos >= 0)
    out, steps, _ = decode(graphdef, state, caches, logits, jnp.asarray(lengths, jnp.int32),
                           jax.random.key(seed), jnp.int32(max_new_tokens), out_len=out_len, sampling=sampling,
                           stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=int(pad_id))
    tokens = np.asarray(out)[:, :max_new_tokens]
    n = int(steps)
    is_stop = np.isin(tokens[:, :n], list(stop_tokens))
    new = np.where(is_stop.any(1), is_stop.argmax(1) + 1, n)
    return Generation(tokens=tokens, lengths=new)


# ------------------------------------------------------------------------------------------------ CLI
def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise cli.UserError(f"--prompt-file {args.prompt_file}: {e}") from e
        if not lines:
            raise cli.UserError(f"--prompt-file {args.prompt_file}: no prompt in it (every line is empty)")
        prompts += lines
    if not prompts:
        raise cli.UserError("no prompt: give --prompt and/or --prompt-file")
    return prompts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jetnemo_jax.generate",
                                     description="Generate text from a Jet-Nemotron / Qwen2 checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="jetnemo_jax checkpoint, HF safetensors directory, or a training workdir (its final/)")
    parser.add_argument("--tokenizer", help="local HF tokenizer directory (default: the checkpoint's own)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    parser.add_argument("--prompt-file", help="a UTF-8 file; every non-empty line is a prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="activation dtype (default: the checkpoint config's)")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill call")
    cli.add_compilation_cache_flag(parser)
    cli.add_verbose_flag(parser)
    cli.run(_main, parser.parse_args(argv))


def _main(args):
    cli.setup_compilation_cache(args)
    prompts = read_prompts(args)
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    if args.max_new_tokens < 1:
        raise cli.UserError(f"--max-new-tokens {args.max_new_tokens}: must be positive")
    checkpoint = cli.resolve_checkpoint(args.checkpoint)
    tokenizer = cli.open_tokenizer(args.tokenizer, args.checkpoint)
    ids = [tokenizer.encode(p).tolist() for p in prompts]
    for i, (p, t) in enumerate(zip(prompts, ids)):
        if not t:
            raise cli.UserError(f"prompt {i} ({p!r}) encodes to no tokens")
    model = cli.open_checkpoint(checkpoint, args.dtype)
    cli.check_tokenizer_fits(tokenizer, model)
    stops = sorted({t for t in (tokenizer.eos_id, model.config.eos_token_id) if t is not None})
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else stops[0] if stops else 0
    try:
        result = generate(model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_tokens=stops,
                          pad_id=pad, seed=args.seed, prefill_chunk_len=args.prefill_chunk)
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    for i, (prompt, toks, n) in enumerate(zip(prompts, result.tokens, result.lengths)):
        text = tokenizer.decode(toks[:n], skip_special_tokens=True)
        print(f"--- {i}: {prompt!r}\n{prompt}{text}")


if __name__ == "__main__":
    main()
