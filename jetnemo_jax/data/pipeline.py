"""grain pipeline: documents -> tokens + EOS -> concat-then-split packing -> local batches.

Each process reads every `process_count`-th document of one shared shuffled order, so processes see
disjoint data and the global batch is the concatenation of the local ones. Rows hold `seq_len` tokens of
one or more documents; `segment_ids` (1, 2, ... per row, 0 never occurs) mark where documents start, and
the model resets attention, RoPE positions, conv taps and the delta-rule state there. The iterator's
state is checkpointable (get_state / set_state) so a resumed run continues the same stream.
"""

from __future__ import annotations

from collections.abc import Callable

import grain
import numpy as np
from grain import experimental as grain_exp


def packed_dataset(source, encode: Callable[[str], np.ndarray], eos_id: int, *, seq_len: int,
                   local_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                   shuffle: bool = True, worker_count: int = 0) -> grain.IterDataset:
    """Infinite stream of {"tokens", "segment_ids"}: int32 [local_batch, seq_len] each."""
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)[process_index::process_count]

    def tokenize(text):
        return {"tokens": np.append(encode(text), np.int32(eos_id)).astype(np.int32)}

    ds = ds.map(tokenize).to_iter_dataset()
    ds = grain_exp.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
    ds = ds.map(lambda r: {"tokens": r["tokens"], "segment_ids": r["tokens_segment_ids"]})
    ds = ds.batch(local_batch, drop_remainder=True)
    if worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


def targets_and_mask(tokens: np.ndarray, segment_ids: np.ndarray):
    """Next-token targets inside each document; the last token of a row or document predicts nothing."""
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    same = np.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                           np.zeros_like(segment_ids[:, :1], bool)], axis=1)
    return targets, same & (segment_ids > 0)
