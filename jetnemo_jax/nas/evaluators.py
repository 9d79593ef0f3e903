"""Task evaluators that score a placement. Each takes `stats_fn(tokens, segment_ids) -> (nll, argmax)`, the
network at that placement reduced to the negative log-likelihood of every next token and the predicted
token ([B, T] each; `next_token_stats` makes them from logits inside the jitted forward, so vocabulary-wide
logits never leave it), calls it on at most `rows_per_call` rows at a time, and returns its metrics with a
`score` (higher is better), the number the search ranks by. Data is fixed at construction, so every
placement sees the same examples."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from jetnemo_jax.train.step import next_token_targets


def next_token_stats(logits, tokens):
    """logits [B,T,V], tokens [B,T] -> (nll of token t+1 at position t, argmax), [B,T] each (the last
    column scores a dummy target; evaluators mask it)."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), jnp.argmax(logits, -1)


def _stats(stats_fn, tokens, seg, rows_per_call: int):
    parts = [stats_fn(tokens[i:i + rows_per_call], seg[i:i + rows_per_call])
             for i in range(0, tokens.shape[0], rows_per_call)]
    return tuple(np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(2))


class LMLoss:
    """Next-token cross entropy on held-out text rows; score = -loss."""

    def __init__(self, batch: dict, rows_per_call: int = 64):
        self.tokens = jnp.asarray(batch["tokens"], jnp.int32)
        self.seg = jnp.asarray(batch["segment_ids"], jnp.int32)
        self.valid = np.asarray(next_token_targets(self.tokens, self.seg)[1])
        self.rows_per_call = rows_per_call

    def __call__(self, stats_fn) -> dict:
        nll, _ = _stats(stats_fn, self.tokens, self.seg, self.rows_per_call)
        loss = float(np.sum(nll * self.valid) / max(self.valid.sum(), 1))
        return {"lm_loss": loss, "score": -loss}


class MultipleChoice:
    """Answer loss on multiple-choice items {"context", "choices", "answer"} (token ids): the mean
    per-token negative log-likelihood of the right choice after its context (score = -answer loss), and
    accuracy, picking the choice of highest mean log-likelihood."""

    def __init__(self, items: list[dict], pad_id: int = 0, rows_per_call: int = 64):
        rows, spans = [], []
        for item in items:
            for choice in item["choices"]:
                rows.append(list(item["context"]) + list(choice))
                spans.append((len(item["context"]), len(choice)))
        T = max(len(r) for r in rows)
        tokens = np.full((len(rows), T), pad_id, np.int32)
        seg = np.zeros((len(rows), T), np.int32)
        weight = np.zeros((len(rows), T), np.float32)  # position t scores token t + 1
        for i, (r, (c, n)) in enumerate(zip(rows, spans)):
            tokens[i, :len(r)] = r
            seg[i, :len(r)] = 1
            weight[i, c - 1:c - 1 + n] = 1.0
        self.tokens, self.seg, self.weight = jnp.asarray(tokens), jnp.asarray(seg), weight
        self.num_choices = [len(item["choices"]) for item in items]
        self.answers = np.array([item["answer"] for item in items])
        self.rows_per_call = rows_per_call

    def __call__(self, stats_fn) -> dict:
        nll, _ = _stats(stats_fn, self.tokens, self.seg, self.rows_per_call)
        mean_nll = np.sum(nll * self.weight, 1) / np.sum(self.weight, 1)
        losses, correct, start = [], [], 0
        for n, a in zip(self.num_choices, self.answers):
            per_choice = mean_nll[start:start + n]
            losses.append(per_choice[a])
            correct.append(int(np.argmin(per_choice)) == a)
            start += n
        loss = float(np.mean(losses))
        return {"answer_loss": loss, "mc_accuracy": float(np.mean(correct)), "score": -loss}


class Retrieval:
    """Accuracy of the next-token prediction at every query of a retrieval batch (tasks.mqar,
    tasks.copy_rows); score = accuracy."""

    def __init__(self, batch: dict, rows_per_call: int = 64):
        self.tokens = jnp.asarray(batch["tokens"], jnp.int32)
        self.seg = jnp.asarray(batch["segment_ids"], jnp.int32)
        self.answer = np.asarray(batch["answer"])
        self.rows_per_call = rows_per_call

    def __call__(self, stats_fn) -> dict:
        _, pred = _stats(stats_fn, self.tokens, self.seg, self.rows_per_call)
        tokens = np.asarray(self.tokens)
        target = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], 1)
        acc = float(np.mean(pred[self.answer] == target[self.answer]))
        return {"retrieval_accuracy": acc, "score": acc}
