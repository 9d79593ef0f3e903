"""Text sources, tokenizers and the packed grain pipeline."""

import json

import numpy as np
import pytest

from jetnemo_jax.data import sources
from jetnemo_jax.data.pipeline import packed_dataset
from jetnemo_jax.data.tokenizer import load_tokenizer, train_bpe
from tests.train.runs import ROOT

QWEN_TOKENIZER = ROOT.parent / "shared" / "data" / "qwen2.5-tokenizer"


def _docs(rng, n):
    return [" ".join(f"w{int(x)}" for x in rng.integers(0, 50, int(rng.integers(1, 30)))) for _ in range(n)]


def test_every_file_format_yields_the_documents(tmp_path, rng):
    docs = _docs(rng, 12)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[:4])))
    for i, d in enumerate(docs[4:6]):
        (tmp_path / f"t{i}.txt").write_text(d)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[6:9]}), tmp_path / "p.parquet", row_group_size=2)
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(tmp_path / "r.array_record"), "group_size:1")
    for d in docs[9:]:
        w.write(d.encode())
    w.close()
    src = sources.open_source(str(tmp_path))
    assert sorted(src[i] for i in range(len(src))) == sorted(docs)


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(sources.DataError, match="matches no"):
        sources.open_source(str(tmp_path / "missing*.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="not a JSON object with 'text'"):
        sources.open_source(str(tmp_path / "bad.jsonl"))[0]
    with pytest.raises(ValueError, match="data.source is empty"):
        sources.open_source("")


def test_packing_resume_and_process_split(tmp_path, rng):
    docs = _docs(rng, 40)
    tok = train_bpe(docs, 300, tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").eos_id == tok.eos_id
    kw = dict(seq_len=24, global_batch=4, seed=3, num_shards=2)
    it = iter(packed_dataset(docs, tok.encode, tok.eos_id, **kw))
    batches = [next(it) for _ in range(3)]
    b = batches[0]
    assert b["tokens"].shape == b["segment_ids"].shape == (4, 24) and (b["segment_ids"] >= 1).all()
    # A document's tokens end with EOS where the next segment starts.
    rows, cols = np.nonzero(np.diff(b["segment_ids"], axis=1))
    assert (b["tokens"][rows, cols] == tok.eos_id).all()
    # The iterator state restores the stream mid-way.
    state = it.get_state()
    expect = next(it)
    it2 = iter(packed_dataset(docs, tok.encode, tok.eos_id, **kw))
    it2.set_state(state)
    assert all(np.array_equal(expect[k], v) for k, v in next(it2).items())
    # Two processes with the same num_shards read the two halves of the same global batches.
    halves = [iter(packed_dataset(docs, tok.encode, tok.eos_id, process_index=p, process_count=2, **kw))
              for p in range(2)]
    for full in batches:
        parts = [next(h) for h in halves]
        assert np.array_equal(np.concatenate([p["tokens"] for p in parts]), full["tokens"])


@pytest.mark.skipif(not QWEN_TOKENIZER.is_dir(), reason="the shared Qwen2.5 tokenizer is not present")
def test_qwen_tokenizer_directory():
    tok = load_tokenizer(QWEN_TOKENIZER)
    assert tok.eos_id in (151643, 151645) and tok.vocab_size >= 151643
    assert tok.decode(tok.encode("Hello, world")) == "Hello, world"


def test_worker_processes_are_deterministic_and_resume(tmp_path, rng):
    """data.worker_count > 0 (grain mp_prefetch): the stream is valid, the same on every run, and its
    checkpointed state resumes it mid-way (each worker packs its own slice, so the order differs from 0)."""
    docs = _docs(rng, 40)
    tok = train_bpe(docs, 300, tmp_path / "tok")
    make = lambda: iter(packed_dataset(docs, tok.encode, tok.eos_id, seq_len=24, global_batch=4, seed=3,
                                       worker_count=2))
    it = make()
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    expect = next(it)
    again = make()
    assert all(np.array_equal(a["tokens"], next(again)["tokens"]) for a in first)
    resumed = make()
    resumed.set_state(state)
    got = next(resumed)
    assert all(np.array_equal(expect[k], got[k]) for k in expect)
    assert got["tokens"].shape == (4, 24) and (got["segment_ids"] >= 1).all()
    # Batches own their memory: a shared-memory block still referenced at exit (JAX on CPU aliases numpy
    # buffers) is reported as leaked by the resource tracker.
    assert all(type(v) is np.ndarray and v.flags.owndata for v in got.values())
    for i in (it, again, resumed):
        i.close()
