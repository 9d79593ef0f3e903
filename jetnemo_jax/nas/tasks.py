"""Data for the PostNAS evaluators and the distillation mixture: text rows, synthetic retrieval (associative
recall, MQAR, or induction copying), and multiple-choice items (a jsonl file, or cloze items cut from
held-out text)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np

from jetnemo_jax.data.pipeline import packed_dataset


def mqar(rng: np.random.Generator, rows: int, seq_len: int, num_pairs: int, vocab_size: int) -> dict:
    """Multi-query associative recall (Zoology): `num_pairs` key-value pairs, then queries (keys drawn
    again, each followed by its value) filling the row. Keys come from [1, V/2), values from [V/2, V).

    Returns {"tokens", "segment_ids"} int32 [rows, seq_len] and "answer" bool [rows, seq_len]: True at
    each query key, whose next-token prediction must be the value.
    """
    if seq_len % 2 or not 0 < 2 * num_pairs < seq_len or num_pairs >= vocab_size // 2 - 1:
        raise ValueError(f"mqar: need an even seq_len > 2 * num_pairs and num_pairs < vocab/2 - 1, got "
                         f"seq_len={seq_len}, num_pairs={num_pairs}, vocab_size={vocab_size}")
    half = vocab_size // 2
    num_queries = seq_len // 2 - num_pairs
    keys = np.stack([rng.choice(np.arange(1, half), num_pairs, replace=False) for _ in range(rows)])
    values = rng.integers(half, vocab_size, (rows, num_pairs))
    q = rng.integers(0, num_pairs, (rows, num_queries))
    pairs = np.stack([keys, values], -1).reshape(rows, -1)
    queries = np.stack([np.take_along_axis(keys, q, 1), np.take_along_axis(values, q, 1)], -1).reshape(rows, -1)
    tokens = np.concatenate([pairs, queries], 1).astype(np.int32)
    answer = np.zeros((rows, seq_len), bool)
    answer[:, 2 * num_pairs::2] = True
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens), "answer": answer}


def text_rows(texts: Sequence[str], encode: Callable, eos_id: int, *, rows: int, seq_len: int, seed: int):
    """An endless iterator of packed text batches {"tokens", "segment_ids"} [rows, seq_len] (grain)."""
    return iter(packed_dataset(texts, encode, eos_id, seq_len=seq_len, global_batch=rows, seed=seed))


def recall(kind: str, rng: np.random.Generator, rows: int, seq_len: int, *, num_pairs: int, vocab_size: int) -> dict:
    """Retrieval rows of `kind`: "mqar" (associative recall) or "copy" (induction copying)."""
    if kind == "mqar":
        return mqar(rng, rows, seq_len, num_pairs, vocab_size)
    if kind == "copy":
        return copy_rows(rng, rows, seq_len, vocab_size)
    raise ValueError(f"retrieval task {kind!r}: expected 'mqar' or 'copy'")


def mixture(text_iter, rng: np.random.Generator, *, recall_kind: str, recall_rows: int, seq_len: int,
            num_pairs: int, vocab_size: int) -> dict:
    """One batch: the next text rows plus `recall_rows` fresh retrieval rows (the distillation data)."""
    text = next(text_iter)
    if not recall_rows:
        return {k: np.asarray(v, np.int32) for k, v in text.items()}
    m = recall(recall_kind, rng, recall_rows, seq_len, num_pairs=num_pairs, vocab_size=vocab_size)
    return {k: np.concatenate([np.asarray(text[k], np.int32), m[k]]) for k in ("tokens", "segment_ids")}


def cloze_items(texts: Sequence[str], encode: Callable, rng: np.random.Generator, *, num_items: int,
                context_len: int, answer_len: int, num_choices: int) -> list[dict]:
    """Multiple choice from text: a passage's next `answer_len` tokens against spans of other passages."""
    docs, want = [], max(num_choices, 4 * num_items)  # enough passages; a big held-out set is not all read
    for i in range(len(texts)):
        t = encode(texts[i])
        if len(t) >= context_len + answer_len:
            docs.append(t)
        if len(docs) == want:
            break
    if len(docs) < num_choices:
        raise ValueError(f"cloze: only {len(docs)} documents hold {context_len + answer_len} tokens")
    items = []
    for _ in range(num_items):
        picks = rng.choice(len(docs), num_choices, replace=False)
        spans = []
        for d in picks:
            start = int(rng.integers(0, len(docs[d]) - context_len - answer_len + 1))
            spans.append(docs[d][start:start + context_len + answer_len])
        answer = int(rng.integers(num_choices))
        choices = [s[context_len:] for s in spans]
        choices[0], choices[answer] = choices[answer], choices[0]
        items.append({"context": spans[0][:context_len], "choices": choices, "answer": answer})
    return items


def mc_items_from_jsonl(path: str, encode: Callable) -> list[dict]:
    """Lines {"context": str, "choices": [str, ...], "answer": int} (e.g. MMLU rendered as
    "Question ... Answer:" with choices " A", " B", ...) -> token items for MultipleChoice."""
    items = []
    with open(path) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            if not {"context", "choices", "answer"} <= set(r) or not 0 <= r["answer"] < len(r["choices"]):
                raise ValueError(f"{path}:{n + 1}: expected context, choices and an answer index into choices")
            items.append({"context": encode(r["context"]), "choices": [encode(c) for c in r["choices"]],
                          "answer": int(r["answer"])})
    return items


def copy_rows(rng: np.random.Generator, rows: int, seq_len: int, vocab_size: int) -> dict:
    """Copy (induction) rows: seq_len/2 distinct random tokens from [1, vocab_size), then the same again.
    "answer" is True where the next token is determined by the first half (the second half's positions)."""
    half = seq_len // 2
    if seq_len % 2 or half >= vocab_size:
        raise ValueError(f"copy: need an even seq_len with seq_len/2 < vocab_size, got {seq_len}, {vocab_size}")
    first = np.stack([rng.choice(np.arange(1, vocab_size), half, replace=False) for _ in range(rows)])
    tokens = np.concatenate([first, first], 1).astype(np.int32)
    answer = np.zeros((rows, seq_len), bool)
    answer[:, half - 1:seq_len - 1] = True
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens), "answer": answer}
