"""Perplexity of a checkpoint on a local text file: sliding windows, token-weighted.

    python -m jetnemo_jax.eval.perplexity --checkpoint DIR [--tokenizer DIR] --text-file FILE
        [--seq-len 2048] [--stride 1024] [--batch-size 1] [--context 1] [--dtype bfloat16] [--verbose]

Windows of `seq_len` tokens start every `stride` (< seq_len) tokens; each token is scored exactly once, in
the window whose new part (after the previous window's end) holds it, so every token after the first window
sees at least seq_len - stride tokens of context. The first token of the text is never scored (nothing
predicts it). Perplexity = exp(total negative log-likelihood / scored tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jetnemo_jax import cli, sharding
from jetnemo_jax.model import JetNemotronForCausalLM


@dataclasses.dataclass
class Perplexity:
    perplexity: float
    nll: float  # summed over scored tokens, nats
    tokens: int  # scored tokens
    windows: int


def windows(n_tokens: int, seq_len: int, stride: int):
    """-> [(begin, end, first scored index)]: window ids[begin:end] scores tokens [first, end)."""
    if not 1 <= stride < seq_len:
        raise ValueError(f"need 1 <= stride < seq_len, got seq_len={seq_len}, stride={stride}")
    out, prev_end = [], 1
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seq_len, n_tokens)
        out.append((begin, end, prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(graphdef, state, ids):
    """ids [B, T] -> log p(ids[:, t+1] | ids[:, :t+1]) [B, T-1] float32."""
    logits = nnx.merge(graphdef, state)(ids)[:, :-1]
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[:, 1:, None], -1)[..., 0]


def perplexity(model: JetNemotronForCausalLM, ids, *, seq_len: int, stride: int, batch_size: int = 1,
               progress=None, context: int = 1) -> Perplexity:
    """Token-weighted perplexity of the token ids [N]. Windows are run `batch_size` at a time, each padded
    on the right to seq_len (one compiled shape; right padding cannot change a causal model's scores).
    `progress(done, total)` is called after every batch. context > 1 splits every window over that many
    devices (context parallelism, as training's `mesh.context`); the weights are replicated on them."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1 or ids.size < 2:
        raise ValueError(f"need at least 2 tokens, got {ids.size}")
    spans = windows(ids.size, seq_len, stride)
    graphdef, state = nnx.split(model)
    scope, place = contextlib.nullcontext, jnp.asarray
    if context > 1:
        if context > jax.device_count() or seq_len % context:
            raise ValueError(f"context={context}: needs that many devices ({jax.device_count()} here) and a "
                             f"--seq-len divisible by it (got {seq_len})")
        mesh = sharding.make_mesh({"context": context, "fsdp": 1}, jax.devices()[:context])
        state = jax.device_put(state, NamedSharding(mesh, P()))
        scope = functools.partial(sharding.activation_sharding, mesh, sharding.DEFAULT_RULES)
        place = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh, sharding.DEFAULT_RULES))
    nll, count = 0.0, 0
    for b0 in range(0, len(spans), batch_size):
        batch = spans[b0:b0 + batch_size]
        x = np.zeros((batch_size, seq_len), np.int32)
        weight = np.zeros((batch_size, seq_len - 1), np.float64)
        for i, (begin, end, first) in enumerate(batch):
            x[i, :end - begin] = ids[begin:end]
            weight[i, first - begin - 1:end - begin - 1] = 1  # logprob column t scores token begin + t + 1
        with scope():
            logp = np.asarray(_token_logprobs(graphdef, state, place(x)), np.float64)
        nll -= float((logp * weight).sum())
        count += int(weight.sum())
        if progress:
            progress(min(b0 + batch_size, len(spans)), len(spans))
    return Perplexity(math.exp(nll / count), nll, count, len(spans))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jetnemo_jax.eval.perplexity", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="jetnemo_jax checkpoint, HF safetensors directory, or a training workdir (its final/)")
    parser.add_argument("--tokenizer", help="local HF tokenizer directory (default: the checkpoint's own)")
    parser.add_argument("--text-file", required=True)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--stride", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context", type=int, default=1,
                        help="split every window over this many devices (context parallelism)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="activation dtype (default: the checkpoint config's)")
    cli.add_compilation_cache_flag(parser)
    cli.add_verbose_flag(parser)
    cli.run(_main, parser.parse_args(argv))


def _main(args):
    cli.setup_compilation_cache(args)
    if not 1 <= args.stride < args.seq_len:
        raise cli.UserError(f"need 1 <= --stride < --seq-len (got --seq-len {args.seq_len}, --stride {args.stride})")
    if args.batch_size < 1:
        raise cli.UserError(f"--batch-size {args.batch_size}: must be positive")
    try:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise cli.UserError(f"--text-file {args.text_file}: {e}") from e
    checkpoint = cli.resolve_checkpoint(args.checkpoint)
    tokenizer = cli.open_tokenizer(args.tokenizer, args.checkpoint)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise cli.UserError(f"--text-file {args.text_file}: {len(ids)} token(s); need at least 2")
    model = cli.open_checkpoint(checkpoint, args.dtype)
    cli.check_tokenizer_fits(tokenizer, model)
    limit = model.config.max_position_embeddings
    if args.seq_len > limit:
        raise cli.UserError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings ({limit})")
    seq_len, stride = args.seq_len, args.stride
    if seq_len > len(ids) and args.context == 1:  # one window holds the whole text: no padding to a longer shape
        seq_len, stride = len(ids), min(stride, len(ids) - 1)
        print(f"note: the text has {len(ids)} tokens, fewer than --seq-len {args.seq_len}: one window of {seq_len}",
              file=sys.stderr)
    start, last = time.time(), [0.0]
    tty = sys.stderr.isatty()

    def progress(done, total):  # redrawn in place on a terminal; in a log, a line every 30 s and at the end
        now = time.time()
        if not tty and done < total and now - last[0] < 30:
            return
        last[0] = now
        rate = done / (now - start)
        head, end = ("\r", "") if tty else ("", "\n")
        print(f"{head}window {done}/{total}, {rate:.2f} windows/s, eta {(total - done) / rate:.0f}s", end=end,
              file=sys.stderr, flush=True)

    if args.context < 1 or args.context > jax.device_count() or args.seq_len % args.context:
        raise cli.UserError(f"--context {args.context}: needs that many devices ({jax.device_count()} here) and a "
                            f"--seq-len divisible by it (got {args.seq_len})")
    result = perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=args.batch_size,
                        progress=progress, context=args.context)
    if tty:
        print(file=sys.stderr)
    print(f"perplexity {result.perplexity:.4f} (nll {result.nll / result.tokens:.4f} nats/token over "
          f"{result.tokens} tokens, {result.windows} windows of {seq_len}, stride {stride})")


if __name__ == "__main__":
    main()
