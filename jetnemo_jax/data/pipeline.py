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
from absl import flags
from grain import experimental as grain_exp


def count_tokens_upto(source, encode: Callable[[str], np.ndarray], limit: int) -> int:
    """Tokens the packed stream gets from `source` (each document's tokens plus its EOS), counting documents
    in order only until `limit` is reached: the exact total when the source holds fewer than `limit`,
    else a number >= limit. A big source costs a few documents, a big document a prefix of it."""
    total = 0
    for i in range(len(source)):
        if total >= limit:
            break
        text = source[i]
        # Tokens average ~4 characters, so a prefix of 16 characters per missing token almost always reaches
        # the limit: a huge document costs only that prefix, and is tokenised whole only when it falls short.
        prefix = text[: 16 * (limit - total)]
        n = len(encode(prefix))
        if n < limit - total and len(prefix) < len(text):
            n = len(encode(text))
        total += n + 1
    return total


def _packed_shard(source, encode, eos_id, *, seq_len, rows, seed, shard, num_shards, shuffle):
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)[shard::num_shards]

    def tokenize(text):
        return {"tokens": np.append(encode(text), np.int32(eos_id)).astype(np.int32)}

    ds = ds.map(tokenize).to_iter_dataset()
    ds = grain_exp.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
    ds = ds.map(lambda r: {"tokens": r["tokens"], "segment_ids": r["tokens_segment_ids"]})
    return ds.batch(rows, drop_remainder=True)


def packed_dataset(source, encode: Callable[[str], np.ndarray], eos_id: int, *, seq_len: int,
                   global_batch: int, seed: int, num_shards: int = 0, process_index: int = 0,
                   process_count: int = 1, shuffle: bool = True, worker_count: int = 0) -> grain.IterDataset:
    """This process's rows of each global batch: {"tokens", "segment_ids"}, int32 [rows, seq_len].

    The data is split into `num_shards` streams (default: one per process), each packed on its own and
    giving global_batch / num_shards consecutive rows of every batch; a process reads the streams of its
    rows. So the global batch is the same for any process count that divides `num_shards`.
    """
    num_shards = num_shards or process_count
    if num_shards % process_count or global_batch % num_shards:
        raise ValueError(f"data.num_shards={num_shards} must be a multiple of the {process_count} processes "
                         f"and divide data.global_batch={global_batch}")
    per_process = num_shards // process_count
    shards = [_packed_shard(source, encode, eos_id, seq_len=seq_len, rows=global_batch // num_shards, seed=seed,
                            shard=process_index * per_process + i, num_shards=num_shards, shuffle=shuffle)
              for i in range(per_process)]
    ds = shards[0] if per_process == 1 else grain_exp.ZipIterDataset(shards).map(
        lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, use defaults
            flags.FLAGS.mark_as_parsed()
        # Batches arrive in shared memory; copy them out so no consumer (JAX on CPU aliases numpy buffers)
        # keeps a block alive past the end of the run.
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count)).map(
            lambda batch: {k: np.array(v) for k, v in batch.items()})
    return ds
