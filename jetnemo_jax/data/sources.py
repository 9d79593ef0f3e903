"""Random-access text sources for grain: jsonl, txt, parquet, ArrayRecord, and bundled text.

What one document is:
- a .txt file: the whole file (UTF-8) is one document;
- a .jsonl file: each non-blank line is one document, a JSON object whose text is under `data.text_key`
  (default "text"); records with empty text are kept and contribute only their EOS token;
- a .parquet file: each row is one document, its text in the `data.text_key` column (nulls read as "");
- an .array_record file: each record is one document, UTF-8 text, or a JSON object with the text under
  `data.text_key`.

A source spec is a comma-separated list of files, directories or globs; `pydoc_data` names the Python
documentation topics that ship with the standard library (the embedded default's corpus). A file without
any text is refused (DataError naming it), so a run never trains on nothing.

grain reads a source from many threads (and pickles it into worker processes), so `source[i]` must return
record i whatever else runs: the sources below share no mutable state between reads, or only state that
is replaced in one atomic step and rebuilt in each process.
"""

from __future__ import annotations

import array
import bisect
import functools
import glob
import json
import os
from collections.abc import Sequence
from pathlib import Path

import grain

SUFFIXES = (".jsonl", ".txt", ".parquet", ".array_record")
BUNDLED = "pydoc_data"


class DataError(ValueError):
    """Data that cannot be trained on: a missing, unreadable or empty source (a one-line message)."""


def bundled_texts() -> list[str]:
    from pydoc_data import topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def _text_of(record, key: str, where: str) -> str:
    """The text under `key` of one parsed JSON record."""
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        raise DataError(f"{where} is not a JSON object with {key!r} holding a string")
    return record[key]


class JsonlSource(grain.sources.RandomAccessDataSource):
    """One document per non-blank line, the text under `text_key`.

    The start and length of each line are indexed once; a read opens the file and preads that line, so
    reads from any threads or processes share nothing (no file position, and no descriptor held per file:
    corpora can have thousands of shards).
    """

    def __init__(self, path: str, text_key: str):
        self.path, self.text_key = path, text_key
        self._starts, self._lengths = array.array("q"), array.array("q")
        pos = 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    self._starts.append(pos)
                    self._lengths.append(len(line))
                pos += len(line)

    def __len__(self):
        return len(self._starts)

    def __getitem__(self, i):
        fd = os.open(self.path, os.O_RDONLY)
        try:
            line = os.pread(fd, self._lengths[i], self._starts[i])
        finally:
            os.close(fd)
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise DataError(f"{self.path}: record {i} is not valid JSON: {e}") from None
        return _text_of(record, self.text_key, f"{self.path}: record {i}")


def _has_text(path: str, chunk: int = 1 << 16) -> bool:
    """Whether a file holds anything but whitespace (reads only up to its first such byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


class TextFilesSource(grain.sources.RandomAccessDataSource):
    """Each .txt file is one document (read whole at each access: nothing is shared between reads)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        for path in self.paths:
            if not _has_text(path):
                raise DataError(f"{path}: no text (the file is empty or only whitespace)")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return Path(self.paths[i]).read_text(encoding="utf-8", errors="replace")


@functools.lru_cache(maxsize=8)
def _parquet_column(path: str, group: int, column: str):
    """One row group's text column as an Arrow array. The cache is per process and thread-safe (two
    threads missing at once may both read the group; each gets a whole, correct column)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0)


class ParquetSource(grain.sources.RandomAccessDataSource):
    """Rows of a parquet file's `text_key` column, read one row group at a time (recent groups cached)."""

    def __init__(self, path: str, text_key: str):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        self.path, self.text_key = path, text_key
        try:
            meta = pq.ParquetFile(path).metadata
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        schema = meta.schema.to_arrow_schema()
        if text_key not in schema.names:
            raise DataError(f"{path}: no column {text_key!r}; columns are {schema.names}")
        kind = schema.field(text_key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {text_key!r} holds {kind}, not text")
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = [sum(sizes[:g]) for g in range(len(sizes))]
        self._len = sum(sizes)

    def __len__(self):
        return self._len

    def __getitem__(self, i):
        g = bisect.bisect_right(self._starts, i) - 1
        return _parquet_column(self.path, g, self.text_key)[i - self._starts[g]].as_py() or ""


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
    """Records of UTF-8 text, or JSON objects holding it under `text_key`.

    grain's reader is thread-safe; each process builds its own (a forked copy of a reader opened in the
    parent is not trusted), kept as one (pid, reader) pair so a thread never sees a half-made switch.
    array_record itself cannot read from threads of a forked child once the parent opened a file (the
    native reader crashes): read it in spawned processes, as grain's workers are.
    """

    def __init__(self, path: str, text_key: str):
        self.path, self.text_key = path, text_key
        self._reader = (os.getpid(), grain.sources.ArrayRecordDataSource([path]))

    def _records(self):
        pid, reader = self._reader
        if pid != os.getpid():
            self._reader = pid, reader = os.getpid(), grain.sources.ArrayRecordDataSource([self.path])
        return reader

    def __len__(self):
        return len(self._records())

    def __getitem__(self, i):
        text = self._records()[i].decode("utf-8", errors="replace")
        if text.startswith("{"):
            try:
                record = json.loads(text)
            except ValueError:  # plain text that happens to start with a brace
                return text
            return _text_of(record, self.text_key, f"{self.path}: record {i}")
        return text

    def __getstate__(self):
        return {**self.__dict__, "_reader": (None, None)}


class ConcatSource(grain.sources.RandomAccessDataSource):
    """Sources one after another (read-only after construction)."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self._starts = [0]
        for s in self.sources:
            self._starts.append(self._starts[-1] + len(s))

    def __len__(self):
        return self._starts[-1]

    def __getitem__(self, i):
        s = bisect.bisect_right(self._starts, i) - 1
        return self.sources[s][i - self._starts[s]]


def _require_text(source, name: str) -> None:
    """Refuse a source with no documents, or whose documents are all empty text (reads documents in order
    only until the first with text, so a normal source costs one read)."""
    if len(source) == 0:
        raise DataError(f"{name}: no documents")
    if not any(source[i].strip() for i in range(len(source))):
        raise DataError(f"{name}: every document is empty text")


def expand(spec: str) -> list[str]:
    """Files named by a comma-separated list of paths, directories and globs (sorted, deduplicated)."""
    files = {}  # an ordered set
    for part in filter(None, (p.strip() for p in spec.split(","))):
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            matches = sorted(str(p) for p in Path(part).rglob("*") if p.suffix in SUFFIXES)
        else:
            matches = sorted(glob.glob(part))
        if not matches:
            raise DataError(f"data source {part!r} matches no {'/'.join(SUFFIXES)} file")
        files.update(dict.fromkeys(matches))
    bad = [f for f in files if Path(f).suffix not in SUFFIXES]
    if bad:
        raise DataError(f"unsupported data files {bad[:3]}: expected {', '.join(SUFFIXES)}")
    return list(files)


def open_source(spec: str, text_key: str = "text"):
    """A random-access source of document strings; DataError when a file is missing or holds no text."""
    if spec == BUNDLED:
        return bundled_texts()
    if not spec.strip():
        raise DataError("data.source is empty: name .jsonl/.txt/.parquet/.array_record files, directories or globs")
    files = expand(spec)
    parts = []
    txt = [f for f in files if f.endswith(".txt")]
    if txt:
        parts.append(TextFilesSource(txt))
    for suffix, kind in ((".array_record", ArrayRecordSource), (".jsonl", JsonlSource), (".parquet", ParquetSource)):
        for f in files:
            if f.endswith(suffix):
                parts.append(kind(f, text_key))
                _require_text(parts[-1], f)
    return parts[0] if len(parts) == 1 else ConcatSource(parts)
