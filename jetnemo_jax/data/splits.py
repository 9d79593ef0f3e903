"""A fixed random split of a random-access document source into training and held-out documents."""

from __future__ import annotations

import numpy as np


class Subset:
    """Documents `indices` of a random-access source, itself random access (nothing is read up front; a
    read-only view, so safe from any number of threads)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]


def split_documents(source, held_out: float, seed: int) -> tuple[Subset, Subset]:
    """(train, held-out): a seeded permutation's first max(1, held_out * N) documents are held out."""
    order = np.random.default_rng(seed).permutation(len(source))
    n = max(1, int(len(source) * held_out))
    return Subset(source, order[n:]), Subset(source, order[:n])
