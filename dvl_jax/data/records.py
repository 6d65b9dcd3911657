"""Data files as random-access sequences of records, for grain.MapDataset.source: `records[i]` is the i-th
record, read on demand, so that shuffling, mixing and slicing over processes and workers read nothing they do
not use.

- JSON lines (.jsonl, .ndjson): the byte offset of each non-blank line is found once (one pass over the file);
  a line is parsed when it is read, so a malformed line is one bad record, named by its line number.
- A JSON list (.json): parsed whole when opened and kept as compact JSON text, an item parsed when read;
  record i is item i.
- Parquet (.parquet): a row group at a time, through pyarrow, the last few kept; a row is a dict of its columns.

A record that cannot be parsed comes back as a Record with an `error`: the pipeline counts and skips it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
from typing import Any

import numpy as np

from dvl_jax.data.config import container

GROUPS_PER_WINDOW = 4  # Parquet row groups mixed by one shuffle window, and held in memory by a reader


@dataclasses.dataclass(frozen=True)
class Record:
  """One record of a data file.

  Attributes:
    where: "file:line" (JSON lines), "file[i]" (a JSON list) or "file:row i" (Parquet).
    value: the parsed record (a dict, when the file is well formed), or None with `error`.
    error: why the record could not be read, or None.
  """

  where: str
  value: Any = None
  error: str | None = None


def open_records(path: str):
  """The records of a data file, by its extension. Raises FileNotFoundError for a missing file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Data file {path!r} does not exist{' (it is a directory)' if os.path.isdir(path) else ''}"
                            "; check the source's path (relative paths start from the working directory).")
  kind = container(path)
  return {".jsonl": JsonLines, ".json": JsonList, ".parquet": ParquetRows}[kind](path)


class JsonLines:
  """A JSON-lines file: record i is its i-th non-blank line."""

  def __init__(self, path: str):
    self.path = path
    starts, sizes, lines = [], [], []
    with open(path, "rb") as f:
      offset = 0
      for number, line in enumerate(f, 1):
        if line.strip():
          starts.append(offset)
          sizes.append(len(line))
          lines.append(number)
        offset += len(line)
    self._starts, self._sizes, self._lines = (np.asarray(x, np.int64) for x in (starts, sizes, lines))
    self._fd: int | None = None  # opened in the process that reads (grain's workers get this object pickled)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._starts)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state, _fd=None, _lock=threading.Lock())

  def __getitem__(self, i: int) -> Record:
    with self._lock:
      if self._fd is None:
        self._fd = os.open(self.path, os.O_RDONLY)
    # pread: no shared file position, so grain's reader threads can read at once.
    raw = os.pread(self._fd, int(self._sizes[i]), int(self._starts[i]))
    where = f"{self.path}:{int(self._lines[i])}"
    try:
      return Record(where, json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      return Record(where, error=f"malformed JSON: {e}")


class JsonList:
  """A file holding one JSON list of records (LLaVA's format): record i is item i."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, encoding="utf-8") as f:
        items = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"Data file {path!r} is not valid JSON ({e}). A .json source holds one list of records; "
                       "for one record a line, name the file .jsonl.") from e
    if not isinstance(items, list):
      raise ValueError(f"Data file {path!r} holds a JSON {type(items).__name__}; a .json source holds a list of "
                       "records ([{...}, {...}]).")
    # Held as compact JSON text in one buffer, each item parsed when read: Python objects would take several
    # times the file's size, in this process and in every worker that gets this object.
    encoded = [json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode() for item in items]
    del items
    self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
    self._blob = np.frombuffer(b"".join(encoded), np.uint8)

  def __len__(self) -> int:
    return len(self._ends)

  def __getitem__(self, i: int) -> Record:
    start = int(self._ends[i - 1]) if i else 0
    return Record(f"{self.path}[{i}]", json.loads(self._blob[start:int(self._ends[i])].tobytes()))


class ParquetRows:
  """A Parquet file: record i is its i-th row, as a dict of its columns (an image column holds bytes, or
  Hugging Face's {"bytes", "path"} struct). The `cached_groups` row groups read last are held in memory: read
  them in an order that stays within a few groups at a time (shuffle.GroupShuffleMapDataset)."""

  def __init__(self, path: str, cached_groups: int = GROUPS_PER_WINDOW):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    self.path = path
    try:
      meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid and others for a file that is not Parquet
      raise ValueError(f"Data file {path!r} is not a readable Parquet file: {e}") from e
    counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    self.ends = np.cumsum(counts, dtype=np.int64)  # the end row of each row group
    self._cached_groups = cached_groups
    self._tables: collections.OrderedDict[int, Any] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_tables", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state, _tables=collections.OrderedDict(), _lock=threading.Lock())

  def __getitem__(self, i: int) -> Record:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    group = int(np.searchsorted(self.ends, i, side="right"))
    with self._lock:  # grain reads from several threads
      table = self._tables.pop(group, None)
      if table is None:
        table = pq.ParquetFile(self.path).read_row_group(group)
        if len(self._tables) >= self._cached_groups:
          self._tables.popitem(last=False)
      self._tables[group] = table
    first = int(self.ends[group - 1]) if group else 0
    return Record(f"{self.path}:row {i}", table.slice(i - first, 1).to_pylist()[0])
