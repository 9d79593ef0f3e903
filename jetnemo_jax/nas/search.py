"""Search over full-attention placements: beam search under a budget, exhaustive search (the check),
uniform spacing (the baseline), and the per-layer importance table.

A placement is a sorted tuple of the layers that keep full attention. `score(placement) -> float`
(higher is better) is any callable: an evaluator of the supernet at that placement, or a sum of them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable


class Memo:
    """Scores each placement once (the supernet evaluations are the search's whole cost)."""

    def __init__(self, score: Callable[[tuple[int, ...]], float]):
        self.score, self.cache = score, {}

    def __call__(self, placement) -> float:
        key = tuple(sorted(placement))
        if key not in self.cache:
            self.cache[key] = float(self.score(key))
        return self.cache[key]


@dataclasses.dataclass
class SearchResult:
    placement: tuple[int, ...]
    score: float
    evaluated: int  # distinct placements scored
    rounds: list[list[tuple[tuple[int, ...], float]]]  # the kept beams after each added layer


def _check(num_layers: int, budget: int):
    if not 1 <= budget <= num_layers:
        raise ValueError(f"budget={budget}: need 1 <= budget <= num_layers={num_layers}")


def _rank(scored):
    return sorted(scored, key=lambda ps: (-ps[1], ps[0]))  # best first; ties to the lower layers


def beam_search(score, num_layers: int, budget: int, beam_width: int) -> SearchResult:
    """Grow placements one full-attention layer at a time from none, keeping the `beam_width` best."""
    _check(num_layers, budget)
    memo = score if isinstance(score, Memo) else Memo(score)
    before = len(memo.cache)
    beams, rounds = [()], []
    for _ in range(budget):
        grown = {tuple(sorted(b + (i,))) for b in beams for i in range(num_layers) if i not in b}
        kept = _rank([(p, memo(p)) for p in grown])[:beam_width]
        rounds.append(kept)
        beams = [p for p, _ in kept]
    best, best_score = rounds[-1][0]
    return SearchResult(best, best_score, len(memo.cache) - before, rounds)


def exhaustive_search(score, num_layers: int, budget: int) -> SearchResult:
    _check(num_layers, budget)
    scored = _rank([(p, float(score(p))) for p in itertools.combinations(range(num_layers), budget)])
    return SearchResult(scored[0][0], scored[0][1], len(scored), [scored])


def uniform_placement(num_layers: int, budget: int) -> tuple[int, ...]:
    """Evenly spaced: the centre of each of `budget` equal spans of layers (6 layers, 2 -> (1, 4))."""
    _check(num_layers, budget)
    return tuple(int((2 * j + 1) * num_layers // (2 * budget)) for j in range(budget))


def importance(score, num_layers: int) -> list[float]:
    """Per layer: the score with only that layer on full attention minus the score with none."""
    base = score(())
    return [score((i,)) - base for i in range(num_layers)]
