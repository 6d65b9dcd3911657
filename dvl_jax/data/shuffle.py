"""A shuffle for files read in blocks (Parquet row groups): anew each epoch, and each block read once an epoch.

A global shuffle (grain's `MapDataset.shuffle`) reads rows in an order that jumps between blocks at every row; a
Parquet file can only be read a row group at a time, so each row would cost a whole group (Hugging Face's image
sets write ~100 rows a group: 100x the reading). Here each epoch permutes the groups, cuts the permuted list into
windows of `window` groups, and permutes the rows within each window: a reader that keeps `window` groups in
memory (records.ParquetRows does) reads each group once an epoch, and a row's neighbours in the stream come from
`window` random groups of the whole file.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np


class GroupShuffleMapDataset(grain.MapDataset):
  """Args:
    parent: a MapDataset of rows stored in blocks (its length is the rows of one epoch).
    ends: the end row of each block, ascending (block g holds rows ends[g-1] .. ends[g] - 1).
    seed: the shuffle's seed; epoch e uses (seed, e).
    window: blocks whose rows are mixed together.
  """

  def __init__(self, parent: grain.MapDataset, *, ends: np.ndarray, seed: int, window: int):
    super().__init__(parent)
    self._ends = np.asarray(ends, np.int64)
    self._starts = np.concatenate([[0], self._ends[:-1]])
    self._seed, self._window = int(seed), int(window)

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"GroupShuffleMapDataset(window={self._window})"

  @functools.lru_cache(maxsize=4)
  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(the permuted block ids, the epoch position where each window starts, with the epoch's end last)."""
    order = np.random.default_rng([self._seed, epoch]).permutation(len(self._ends))
    sizes = (self._ends - self._starts)[order]
    window_sizes = np.add.reduceat(sizes, np.arange(0, len(order), self._window))
    return order, np.concatenate([[0], np.cumsum(window_sizes)])

  @functools.lru_cache(maxsize=8)
  def _window_rows(self, epoch: int, w: int) -> np.ndarray:
    """The rows of window w of `epoch`, in their shuffled order."""
    order, _ = self._epoch(epoch)
    blocks = order[w * self._window:(w + 1) * self._window]
    rows = np.concatenate([np.arange(self._starts[g], self._ends[g]) for g in blocks])
    return rows[np.random.default_rng([self._seed, epoch, w]).permutation(len(rows))]

  def _shuffled_index(self, index: int) -> int:
    epoch, j = divmod(index, len(self._parent))
    _, window_starts = self._epoch(epoch)
    w = int(np.searchsorted(window_starts, j, side="right")) - 1
    return epoch * len(self._parent) + int(self._window_rows(epoch, w)[j - window_starts[w]])

  def __getitem__(self, index: Any):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._shuffled_index(index)]
