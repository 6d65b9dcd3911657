"""The block shuffle of Parquet sources: every row once an epoch, a new order each epoch, and each row group read
once an epoch by a reader that keeps a window of groups."""

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dvl_jax.data.records import ParquetRows
from dvl_jax.data.shuffle import GroupShuffleMapDataset


def test_each_row_once_an_epoch_a_new_order_each_epoch_windows_of_few_groups():
  ends = np.cumsum([5, 1, 7, 3, 3, 9, 2, 4, 6, 2])  # 42 rows in 10 blocks of different sizes
  n = int(ends[-1])
  ds = GroupShuffleMapDataset(grain.MapDataset.range(n), ends=ends, seed=3, window=3).repeat()
  epochs = [[ds[e * n + j] % n for j in range(n)] for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(n))
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
  group = np.searchsorted(ends, epochs[0], side="right")  # the block of each row of epoch 0, in stream order
  sizes = np.diff(np.concatenate([[0], ends]))
  first_seen = list(dict.fromkeys(group.tolist()))
  start = 0
  for w in range(0, 10, 3):  # windows of 3 blocks (the last one 1), each window's rows contiguous in the stream
    blocks = first_seen[w:w + 3]
    end = start + int(sizes[blocks].sum())
    assert set(group[start:end].tolist()) == set(blocks)
    start = end
  again = GroupShuffleMapDataset(grain.MapDataset.range(n), ends=ends, seed=3, window=3)
  assert [again[j] for j in range(n)] == epochs[0]


def test_parquet_rows_read_each_group_once_an_epoch(tmp_path, monkeypatch):
  path = str(tmp_path / "rows.parquet")
  pq.write_table(pa.table({"text": [f"row {i}" for i in range(60)]}), path, row_group_size=5)  # 12 groups
  reads = []
  read = pq.ParquetFile.read_row_group
  monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, *a, **k: reads.append(g) or read(self, g, *a, **k))
  rows = ParquetRows(path, cached_groups=4)
  ds = GroupShuffleMapDataset(grain.MapDataset.source(rows), ends=rows.ends, seed=0, window=4)
  texts = [ds[i].value["text"] for i in range(60)]
  assert sorted(texts) == sorted(f"row {i}" for i in range(60))
  assert sorted(reads) == list(range(12))
  reads.clear()
  shuffled = grain.MapDataset.source(ParquetRows(path, cached_groups=4)).shuffle(seed=0)
  [shuffled[i] for i in range(60)]
  assert len(reads) > 30  # what a global shuffle costs: most rows read their group anew
