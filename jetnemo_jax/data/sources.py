"""Random-access text sources for grain: jsonl, txt, parquet, ArrayRecord, and bundled text.

A source spec is a comma-separated list of files, directories or globs; `pydoc_data` names the Python
documentation topics that ship with the standard library (the embedded default's corpus).
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from collections.abc import Sequence
from pathlib import Path

import grain

SUFFIXES = (".jsonl", ".txt", ".parquet", ".array_record")
BUNDLED = "pydoc_data"


def bundled_texts() -> list[str]:
    from pydoc_data import topics

    return [topics.topics[k] for k in sorted(topics.topics)]


class JsonlSource(grain.sources.RandomAccessDataSource):
    """One document per line, the text under `text_key`; line offsets are indexed once at open."""

    def __init__(self, path: str, text_key: str):
        self.path, self.text_key = path, text_key
        offsets, pos = [], 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self._offsets = offsets
        self._file = None

    def __len__(self):
        return len(self._offsets)

    def __getitem__(self, i):
        if self._file is None:  # opened lazily: sources are pickled into grain workers
            self._file = open(self.path, "rb")
        self._file.seek(self._offsets[i])
        line = self._file.readline()
        try:
            return json.loads(line)[self.text_key]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path}: record {i} is not a JSON object with {self.text_key!r}: {e}") from e

    def __getstate__(self):
        return {**self.__dict__, "_file": None}


class TextFilesSource(grain.sources.RandomAccessDataSource):
    """Each .txt file is one document."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return Path(self.paths[i]).read_text(encoding="utf-8", errors="replace")


class ParquetSource(grain.sources.RandomAccessDataSource):
    """Rows of a parquet file's `text_key` column, read one row group at a time."""

    def __init__(self, path: str, text_key: str):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        self.path, self.text_key = path, text_key
        meta = pq.ParquetFile(path).metadata
        if text_key not in meta.schema.names:
            raise ValueError(f"{path}: no column {text_key!r}; columns are {meta.schema.names}")
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = [sum(sizes[:g]) for g in range(len(sizes))]
        self._len = sum(sizes)
        self._group, self._rows = -1, None

    def __len__(self):
        return self._len

    def __getitem__(self, i):
        import pyarrow.parquet as pq

        g = bisect.bisect_right(self._starts, i) - 1
        if g != self._group:
            self._rows = pq.ParquetFile(self.path).read_row_group(g, columns=[self.text_key])[0].to_pylist()
            self._group = g
        return self._rows[i - self._starts[g]]


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
    """Records of UTF-8 text, or JSON objects holding it under `text_key`."""

    def __init__(self, paths: Sequence[str], text_key: str):
        self._src = grain.sources.ArrayRecordDataSource(list(paths))
        self.text_key = text_key

    def __len__(self):
        return len(self._src)

    def __getitem__(self, i):
        text = self._src[i].decode("utf-8", errors="replace")
        return json.loads(text)[self.text_key] if text.startswith("{") else text


class ConcatSource(grain.sources.RandomAccessDataSource):
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


def expand(spec: str) -> list[str]:
    """Files named by a comma-separated list of paths, directories and globs (sorted, deduplicated)."""
    files = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            matches = sorted(str(p) for p in Path(part).rglob("*") if p.suffix in SUFFIXES)
        else:
            matches = sorted(glob.glob(part))
        if not matches:
            raise FileNotFoundError(f"data source {part!r} matches no {'/'.join(SUFFIXES)} file")
        files.extend(m for m in matches if m not in files)
    bad = [f for f in files if Path(f).suffix not in SUFFIXES]
    if bad:
        raise ValueError(f"unsupported data files {bad[:3]}: expected {', '.join(SUFFIXES)}")
    return files


def open_source(spec: str, text_key: str = "text"):
    """A random-access source of document strings."""
    if spec == BUNDLED:
        return bundled_texts()
    if not spec.strip():
        raise ValueError("data.source is empty: name .jsonl/.txt/.parquet/.array_record files, directories or globs")
    files = expand(spec)
    parts = []
    txt = [f for f in files if f.endswith(".txt")]
    if txt:
        parts.append(TextFilesSource(txt))
    ar = [f for f in files if f.endswith(".array_record")]
    if ar:
        parts.append(ArrayRecordSource(ar, text_key))
    parts += [JsonlSource(f, text_key) for f in files if f.endswith(".jsonl")]
    parts += [ParquetSource(f, text_key) for f in files if f.endswith(".parquet")]
    src = parts[0] if len(parts) == 1 else ConcatSource(parts)
    if len(src) == 0:
        raise ValueError(f"data source {spec!r} holds no documents")
    return src
