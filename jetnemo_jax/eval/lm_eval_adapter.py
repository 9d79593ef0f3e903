"""lm-evaluation-harness model "jetnemo": score converted or trained checkpoints on lm_eval tasks.

    python -m jetnemo_jax.eval.lm_eval_adapter run --model jetnemo \\
        --model_args checkpoint=DIR[,tokenizer=DIR,dtype=bfloat16,max_length=4096] --tasks hellaswag --batch_size 8

(this module registers the model, then hands its arguments to lm_eval's own CLI). From Python:
`lm_eval.simple_evaluate(model=JetNemoLM(model=m, tokenizer=tok), tasks=[...])`.

loglikelihood scores context + continuation in one full forward pass (left-truncated to max_length + 1
tokens); loglikelihood_rolling uses lm_eval's disjoint rolling windows of max_length; generate_until runs
`jetnemo_jax.generate` (left-padded batches, stop at the tokenizer's EOS) and cuts the text at the first
`until` string.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jetnemo_jax.data.tokenizer import Tokenizer
from jetnemo_jax.generate import Sampling, bucket, generate

_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, ids, targets):
    """-> (log p(targets) [B, T], targets == argmax [B, T]) from the logits of ids [B, T]."""
    logits = nnx.merge(graphdef, state)(ids)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    return logp, jnp.argmax(logits, -1) == targets


@register_model("jetnemo")
class JetNemoLM(TemplateLM):
    def __init__(self, checkpoint: str | None = None, tokenizer=None, *, model=None, dtype: str | None = None,
                 batch_size: int | str = 1, max_length: int | str | None = None, prefill_chunk: int | str = 512,
                 max_batch_size=None, device=None):
        """`checkpoint` (a jetnemo_jax checkpoint, an HF safetensors directory or a training workdir: its final/)
        or `model` (a loaded model); `tokenizer`: a local tokenizer directory (default: the checkpoint's own) or
        a tokenizer object (this project's, or one with HF's encode / decode / eos_token_id). `device` is
        accepted for lm_eval's CLI (which passes cuda:0 by default) and ignored: JAX places the model.
        max_length defaults to min(4096, max positions). Mistakes raise `cli.UserError` with one line."""
        super().__init__()
        from jetnemo_jax import cli

        if (checkpoint is None) == (model is None):
            raise cli.UserError("give exactly one of checkpoint= (a directory) or model= (a loaded model)")
        if tokenizer is None and checkpoint is None:
            raise cli.UserError("tokenizer= is required with model=")
        if str(batch_size).startswith("auto"):
            raise cli.UserError("batch_size='auto' is not supported: give a number")
        if checkpoint is not None:
            path = cli.resolve_checkpoint(checkpoint, "checkpoint=")
            if tokenizer is None or isinstance(tokenizer, str):
                tokenizer = cli.open_tokenizer(tokenizer, checkpoint, ("tokenizer=", "checkpoint="))
            model = cli.open_checkpoint(path, dtype, "checkpoint=")
            cli.check_tokenizer_fits(tokenizer, model)
        elif isinstance(tokenizer, str):
            tokenizer = cli.open_tokenizer(tokenizer, tokenizer, ("tokenizer=", "tokenizer="))
        self.tokenizer, self.model = tokenizer, model
        self._ours = isinstance(tokenizer, Tokenizer)
        cfg = self.model.config
        self.batch_size = int(batch_size)
        self.max_length = int(max_length) if max_length else min(4096, cfg.max_position_embeddings)
        self.prefill_chunk = int(prefill_chunk)
        if self.eot_token_id is None:
            raise cli.UserError("the tokenizer has no EOS token (needed as the empty-context prefix and stop token)")
        self._graphdef, self._state = nnx.split(self.model)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self._ours else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if self._ours:  # Qwen's tokenizers add no special tokens to text
            return self.tokenizer.encode(string).tolist()
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _continuation_scores(self, pairs):
        """[(context ids, continuation ids)] -> [(sum log p(continuation), continuation is greedy)]."""
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("empty continuation")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((full, len(cont)))
        out = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a bucket
        for b0 in range(0, len(order), self.batch_size):
            idx = order[b0:b0 + self.batch_size]
            T = bucket(max(len(rows[i][0]) for i in idx) - 1)
            ids = np.zeros((self.batch_size, T), np.int32)
            targets = np.zeros((self.batch_size, T), np.int32)
            for r, i in enumerate(idx):
                full = rows[i][0]
                ids[r, :len(full) - 1] = full[:-1]  # right padding: invisible to a causal model
                targets[r, :len(full) - 1] = full[1:]
            logp, greedy = (np.asarray(a) for a in _score(self._graphdef, self._state, jnp.asarray(ids),
                                                          jnp.asarray(targets)))
            for r, i in enumerate(idx):
                full, n = rows[i]
                cols = slice(len(full) - 1 - n, len(full) - 1)
                out[i] = (float(logp[r, cols].astype(np.float64).sum()), bool(greedy[r, cols].all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self._continuation_scores([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (string,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self._continuation_scores(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            unknown = set(kwargs) - _GEN_KWARGS
            if unknown:
                raise ValueError(f"generation kwargs {sorted(unknown)} are not supported (know {sorted(_GEN_KWARGS)})")
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            sampling = (Sampling(float(kwargs.get("temperature", 1.0)), int(kwargs.get("top_k", 0)),
                                 float(kwargs.get("top_p", 1.0))) if kwargs.get("do_sample") else Sampling())
            keep = self.max_length - max_new
            if keep < 1:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
            for b0 in range(0, len(idx), self.batch_size):
                batch = idx[b0:b0 + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-keep:] for i in batch]
                result = generate(self.model, prompts, max_new_tokens=max_new, sampling=sampling,
                                  stop_tokens=[self.eot_token_id], pad_id=self.eot_token_id,
                                  prefill_chunk_len=self.prefill_chunk)
                for i, toks, n in zip(batch, result.tokens, result.lengths):
                    text = self.tok_decode(toks[:n])
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
        return out


def main(argv=None):
    """lm_eval's own CLI, with "jetnemo" registered; the model's argument mistakes end in one line (status 2;
    the traceback with JETNEMO_VERBOSE=1)."""
    import argparse
    import sys

    from lm_eval.__main__ import cli_evaluate

    from jetnemo_jax import cli

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli.run(lambda _: cli_evaluate(), argparse.Namespace(verbose=False))


if __name__ == "__main__":
    main()
