"""Sources return exactly record i from any number of threads and processes; files without text are refused."""

import json
import multiprocessing
import pickle
import sys
import threading

import numpy as np
import pytest

from jetnemo_jax.data import sources
from jetnemo_jax.data.pipeline import count_tokens_upto, packed_dataset

ALPHABET = list("abcdefghij XYZ 0123456789 \t\"\\{}:,") + list("éßñ中文字ü😀🚀ä€\u2028\u0085")


def _documents(rng, n, max_len=300):
    """n distinct documents of varied lengths (0 to max_len characters after the index), unicode included."""
    return [f"{k}:" + "".join(rng.choice(ALPHABET, int(rng.integers(0, max_len)))) for k in range(n)]


def _write_jsonl(path, docs, rng):
    """Records with ensure_ascii off (multi-byte lines), other keys, and blank lines between some."""
    with open(path, "w", encoding="utf-8") as f:
        for k, d in enumerate(docs):
            f.write(json.dumps({"id": k, "text": d}, ensure_ascii=False) + "\n" + "\n" * int(rng.random() < 0.1))


def _read_jsonl(path):
    """The file's documents, parsed independently of JsonlSource (lines split on \\n only)."""
    return [json.loads(line)["text"] for line in path.read_bytes().split(b"\n") if line.strip()]


def _hammer(source, expected, threads=16, reads=300, seed=0):
    """Read random indices from `threads` threads started together (this one among them); returns the
    failures (at most 10)."""
    failures, start = [], threading.Barrier(threads)

    def work(t):
        rng = np.random.default_rng([seed, t])
        start.wait()
        for i in rng.integers(0, len(expected), reads):
            try:
                got = source[int(i)]
            except Exception as e:  # noqa: BLE001 (any error is a failure to report)
                failures.append((int(i), repr(e)))
                continue
            if got != expected[i]:
                failures.append((int(i), f"wrong document {got[:40]!r}"))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: races show up on every run
    try:
        pool = [threading.Thread(target=work, args=(t,)) for t in range(1, threads)]
        for t in pool:
            t.start()
        work(0)
        for t in pool:
            t.join()
    finally:
        sys.setswitchinterval(old)
    return failures[:10]


def _hammer_everywhere(source, expected, fork_threads=16):
    """Threads in this process, in an unpickled copy (grain's spawned workers) and in a forked child
    (after this process has read, so any per-process state was built here first)."""
    assert len(source) == len(expected)
    assert _hammer(source, expected) == []
    assert _hammer(pickle.loads(pickle.dumps(source)), expected, seed=1) == []
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=lambda: sys.exit(1 if _hammer(source, expected, fork_threads, seed=2) else 0))
    child.start()
    child.join()
    assert child.exitcode == 0, "a forked process read wrong documents"


@pytest.fixture
def jsonl_file(tmp_path, rng):
    path = tmp_path / "docs.jsonl"
    _write_jsonl(path, _documents(rng, 3000), rng)
    return path


def test_jsonl_reads_are_exact_from_threads_and_processes(jsonl_file):
    _hammer_everywhere(sources.JsonlSource(str(jsonl_file), "text"), _read_jsonl(jsonl_file))


def test_text_files_reads_are_exact(tmp_path, rng):
    docs = _documents(rng, 1000)
    paths = []
    for k, d in enumerate(docs):
        paths.append(tmp_path / f"{k:05d}.txt")
        paths[-1].write_text(d, encoding="utf-8")
    _hammer_everywhere(sources.TextFilesSource([str(p) for p in paths]),
                       [p.read_bytes().decode("utf-8") for p in paths])


def _write_parquet(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": range(len(docs)), "text": docs}), path, row_group_size=100)


def _read_parquet(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).column("text").to_pylist()


def test_parquet_reads_are_exact(tmp_path, rng):
    """Row groups of 100 rows, more than the cache holds: threads keep swapping groups."""
    path = tmp_path / "docs.parquet"
    _write_parquet(path, _documents(rng, 3000))
    _hammer_everywhere(sources.ParquetSource(str(path), "text"), _read_parquet(path))


def test_array_record_reads_are_exact(tmp_path, rng):
    ar = pytest.importorskip("array_record.python.array_record_module", reason="array_record is not installed")
    path = tmp_path / "docs.array_record"
    docs = _documents(rng, 3000)
    w = ar.ArrayRecordWriter(str(path), "group_size:1")
    for k, d in enumerate(docs):  # plain text, and JSON records holding it, mixed
        w.write((json.dumps({"text": d}) if k % 3 == 0 else d).encode())
    w.close()
    reader = ar.ArrayRecordReader(str(path))
    records = [r.decode() for r in reader.read_all()]
    reader.close()
    expected = [json.loads(r)["text"] if k % 3 == 0 else r for k, r in enumerate(records)]
    # array_record's native reader crashes on any thread but the main one of a forked child once the parent
    # has opened a reader (a new reader too): the forked child reads from its main thread only. grain's
    # workers are spawned, not forked.
    _hammer_everywhere(sources.ArrayRecordSource(str(path), "text"), expected, fork_threads=1)


def test_concatenated_reads_are_exact(tmp_path, rng, jsonl_file):
    parquet = tmp_path / "more.parquet"
    _write_parquet(parquet, _documents(rng, 1000))
    src = sources.ConcatSource([sources.JsonlSource(str(jsonl_file), "text"),
                                sources.ParquetSource(str(parquet), "text")])
    _hammer_everywhere(src, _read_jsonl(jsonl_file) + _read_parquet(parquet))


def test_the_shuffled_pipeline_yields_exactly_the_files_documents(jsonl_file):
    """grain's 16 read threads: one epoch of the packed, shuffled stream decodes to the file's documents."""
    docs = _read_jsonl(jsonl_file)
    encode = lambda text: np.frombuffer(text.encode(), np.uint8).astype(np.int32) + 1  # bytes; EOS = 0
    total = sum(len(d.encode()) + 1 for d in docs)
    seq_len, rows = 256, 8
    it = iter(packed_dataset(sources.JsonlSource(str(jsonl_file), "text"), encode, 0, seq_len=seq_len,
                             global_batch=rows, seed=5))
    stream = np.concatenate([next(it)["tokens"].ravel() for _ in range(total // (seq_len * rows) + 2)])
    ends = np.flatnonzero(stream == 0)[: len(docs)]
    starts = np.concatenate([[0], ends[:-1] + 1])
    got = [bytes((stream[a:b] - 1).astype(np.uint8)).decode() for a, b in zip(starts, ends)]
    assert got != docs, "the stream is not shuffled"
    assert sorted(got) == sorted(docs)


def test_files_without_text_are_refused(tmp_path, rng):
    good = tmp_path / "good.txt"
    good.write_text(_documents(rng, 1)[0] + "x")
    for name, content in [("empty.txt", ""), ("blank.txt", " \n\t\n"), ("empty.jsonl", ""),
                          ("blank.jsonl", "\n \n"), ("no_text.jsonl", '{"text": ""}\n{"text": "  "}\n')]:
        (tmp_path / name).write_text(content)
        with pytest.raises(sources.DataError, match=name.replace(".", r"\.")):
            sources.open_source(f"{good},{tmp_path / name}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "rows0.parquet")
    pq.write_table(pa.table({"text": ["", None, " "]}), tmp_path / "null.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    for name in ("rows0.parquet", "null.parquet", "ints.parquet"):
        with pytest.raises(sources.DataError, match=name.replace(".", r"\.")):
            sources.open_source(str(tmp_path / name))
    missing = tmp_path / "nowhere" / "x.jsonl"
    with pytest.raises(sources.DataError, match=str(missing)):
        sources.open_source(str(missing))


def test_empty_records_count_only_their_eos(tmp_path, rng):
    docs = _documents(rng, 20)
    docs[3] = docs[7] = ""
    path = tmp_path / "some_empty.jsonl"
    _write_jsonl(path, docs, rng)
    src = sources.open_source(str(path))
    assert [src[i] for i in range(len(src))] == docs
    encode = lambda text: np.zeros(len(text), np.int32)
    assert count_tokens_upto(src, encode, 10**9) == sum(len(d) + 1 for d in docs)


def test_count_tokens_upto_stops_early(rng):
    docs = _documents(rng, 50, max_len=40)
    reads, encoded = [], []

    class Counted(list):
        def __getitem__(self, i):
            reads.append(i)
            return super().__getitem__(i)

    def encode(text):
        encoded.append(len(text))
        return np.zeros(len(text), np.int32)

    lengths = np.cumsum([len(d) + 1 for d in docs])
    limit = int(lengths[9]) - 1  # reached inside the tenth document
    assert count_tokens_upto(Counted(docs), encode, limit) == lengths[9]
    assert reads == list(range(10))
    # A huge document is counted from a prefix: its end is never tokenised.
    encoded.clear()
    assert count_tokens_upto(["x" * 10**7], encode, 1000) >= 1000 and max(encoded) < 10**5
    assert count_tokens_upto([], encode, 5) == 0
