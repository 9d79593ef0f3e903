"""Placement search: beam search against exhaustive search, baselines, importance, evaluators."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jetnemo_jax.nas import evaluators, search, tasks


def table_score(rng, L):
    """An arbitrary (non-additive) score for every placement."""
    table = {p: rng.standard_normal() for k in range(L + 1) for p in itertools.combinations(range(L), k)}
    return lambda p: table[tuple(p)]


@pytest.mark.parametrize("L,k", [(5, 2), (7, 3), (6, 1)])
def test_wide_beam_equals_exhaustive_on_arbitrary_scores(rng, L, k):
    score = table_score(rng, L)
    want = search.exhaustive_search(score, L, k)
    got = search.beam_search(score, L, k, beam_width=math.comb(L, k - 1) * L)
    assert got.placement == want.placement and got.score == want.score and len(got.placement) == k


def test_greedy_beam_is_exact_for_additive_scores_with_fewer_evaluations(rng):
    L, k = 9, 3
    w = rng.standard_normal(L)
    score = lambda p: float(sum(w[i] for i in p))
    want = search.exhaustive_search(score, L, k)
    got = search.beam_search(score, L, k, beam_width=1)
    assert got.placement == want.placement == tuple(sorted(np.argsort(-w)[:k]))
    assert got.evaluated == L + (L - 1) + (L - 2) < want.evaluated == math.comb(L, k)


def test_a_wider_beam_recovers_what_greedy_misses():
    # Layer 0 alone is best, but the best pair is (1, 2): greedy (width 1) commits to layer 0.
    scores = {(0,): 1.0, (1,): 0.9, (2,): 0.8, (0, 1): 1.1, (0, 2): 1.0, (1, 2): 3.0}
    score = lambda p: scores[tuple(p)]
    assert search.beam_search(score, 3, 2, beam_width=1).placement == (0, 1)
    assert search.beam_search(score, 3, 2, beam_width=2).placement == (1, 2)
    assert search.exhaustive_search(score, 3, 2).placement == (1, 2)


def test_uniform_placement_and_importance():
    assert search.uniform_placement(6, 2) == (1, 4)
    assert search.uniform_placement(28, 2) == (7, 21)
    assert search.uniform_placement(5, 5) == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError):
        search.uniform_placement(4, 0)
    memo = search.Memo(lambda p: 10.0 * len(p) + sum(p))
    assert search.importance(memo, 3) == [10.0, 11.0, 12.0]
    memo((2,))
    assert len(memo.cache) == 4  # () and three singletons: no placement scored twice


def test_evaluators_on_an_oracle_and_a_uniform_model(rng):
    V = 32
    batch = tasks.mqar(rng, 4, 20, 4, V)
    toks = batch["tokens"]
    assert np.all(toks[:, 0:8:2] < V // 2) and np.all(toks[:, 1:8:2] >= V // 2) and batch["answer"].sum() == 4 * 6

    def stats(logits_fn):  # what the pipeline computes inside its jitted forward
        return lambda tokens, seg: evaluators.next_token_stats(jnp.asarray(logits_fn(tokens, seg)), tokens)

    def oracle(tokens, seg):  # puts all mass on the true next token
        nxt = np.concatenate([np.asarray(tokens)[:, 1:], np.zeros_like(tokens[:, :1])], 1)
        return np.where(np.arange(V) == nxt[..., None], 30.0, 0.0).astype(np.float32)

    uniform = lambda tokens, seg: np.zeros((*tokens.shape, V), np.float32)
    assert evaluators.Retrieval(batch, rows_per_call=3)(stats(oracle))["score"] == 1.0
    copy = tasks.recall("copy", rng, 3, 10, num_pairs=0, vocab_size=V)
    assert np.array_equal(copy["tokens"][:, :5], copy["tokens"][:, 5:]) and copy["answer"].sum() == 3 * 5
    assert evaluators.Retrieval(copy)(stats(oracle))["score"] == 1.0
    assert evaluators.Retrieval(copy)(stats(uniform))["score"] < 1
    counting = lambda tokens, seg: np.where(np.arange(V) == np.asarray(tokens)[..., None] + 1, 30.0, 0.0)
    items = [{"context": [1, 2, 3], "choices": [[4, 5], [6], [7, 8, 9]], "answer": 0},
             {"context": [5, 6], "choices": [[9], [7, 8]], "answer": 1}]
    mc = evaluators.MultipleChoice(items, rows_per_call=2)  # the right choices continue the count
    assert mc(stats(counting))["mc_accuracy"] == 1.0 and mc(stats(counting))["answer_loss"] < 1e-6
    assert mc(stats(lambda t, s: -counting(t, s)))["mc_accuracy"] == 0.0
    assert abs(mc(stats(uniform))["answer_loss"] - np.log(V)) < 1e-5
    lm = evaluators.LMLoss({"tokens": toks, "segment_ids": batch["segment_ids"]}, rows_per_call=3)
    assert abs(lm(stats(uniform))["lm_loss"] - np.log(V)) < 1e-5 and lm(stats(oracle))["lm_loss"] < 1e-6
