"""Task evaluators that score a placement: each takes `logits_fn(tokens, segment_ids) -> logits [B,T,V]`
(the network at that placement) and returns its metrics with a `score` (higher is better), the number
the search ranks by. Data is fixed at construction, so every placement sees the same examples."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from jetnemo_jax.train.step import next_token_targets


class LMLoss:
    """Next-token cross entropy on held-out text rows; score = -loss."""

    def __init__(self, batches: list[dict]):
        self.batches = [{k: jnp.asarray(v, jnp.int32) for k, v in b.items()} for b in batches]

    def __call__(self, logits_fn) -> dict:
        total, count = 0.0, 0.0
        for b in self.batches:
            targets, valid = next_token_targets(b["tokens"], b["segment_ids"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(b["tokens"], b["segment_ids"]), targets)
            total += float(jnp.sum(ce * valid))
            count += float(jnp.sum(valid))
        loss = total / max(count, 1.0)
        return {"lm_loss": loss, "score": -loss}


class MultipleChoice:
    """Answer loss on multiple-choice items {"context", "choices", "answer"} (token ids): the mean
    per-token negative log-likelihood of the right choice after its context (score = -answer loss), and
    accuracy, picking the choice of highest mean log-likelihood."""

    def __init__(self, items: list[dict], pad_id: int = 0):
        rows, spans = [], []
        for item in items:
            for choice in item["choices"]:
                ctx = list(item["context"])
                rows.append(ctx + list(choice))
                spans.append((len(ctx), len(choice)))
        T = max(len(r) for r in rows)
        tokens = np.full((len(rows), T), pad_id, np.int32)
        seg = np.zeros((len(rows), T), np.int32)
        weight = np.zeros((len(rows), T), np.float32)  # position t scores token t + 1
        for i, (r, (c, n)) in enumerate(zip(rows, spans)):
            tokens[i, :len(r)] = r
            seg[i, :len(r)] = 1
            weight[i, c - 1:c - 1 + n] = 1.0
        self.tokens, self.seg, self.weight = jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(weight)
        self.num_choices = [len(item["choices"]) for item in items]
        self.answers = np.array([item["answer"] for item in items])

    def __call__(self, logits_fn) -> dict:
        logits = logits_fn(self.tokens, self.seg)
        targets = jnp.concatenate([self.tokens[:, 1:], jnp.zeros_like(self.tokens[:, :1])], 1)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        mean_nll = np.asarray(jnp.sum(nll * self.weight, 1) / jnp.sum(self.weight, 1))
        losses, correct, start = [], [], 0
        for n, a in zip(self.num_choices, self.answers):
            per_choice = mean_nll[start:start + n]
            losses.append(per_choice[a])
            correct.append(int(np.argmin(per_choice)) == a)
            start += n
        loss = float(np.mean(losses))
        return {"answer_loss": loss, "mc_accuracy": float(np.mean(correct)), "score": -loss}


class Retrieval:
    """Accuracy of the next-token prediction at every query of an associative-recall batch (tasks.mqar);
    score = accuracy."""

    def __init__(self, batch: dict):
        self.tokens = jnp.asarray(batch["tokens"], jnp.int32)
        self.seg = jnp.asarray(batch["segment_ids"], jnp.int32)
        self.answer = np.asarray(batch["answer"])

    def __call__(self, logits_fn) -> dict:
        pred = np.asarray(jnp.argmax(logits_fn(self.tokens, self.seg), -1))
        target = np.concatenate([np.asarray(self.tokens)[:, 1:], np.zeros_like(self.tokens[:, :1])], 1)
        acc = float(np.mean(pred[self.answer] == target[self.answer]))
        return {"retrieval_accuracy": acc, "score": acc}
