"""Rows -> the arrays of one process's batch, as the train step takes them (dvl_jax.training.batch.Batch).

  input_ids       int32 [b, L]  the row's samples one after the other, then the pad id
  attention_mask  int32 [b, L]  segment ids: the k-th sample of a row is k (1, 2, ...), padding 0
  positions       int32 [b, L]  RoPE positions, from 0 at each sample's first token (padding 1)
  loss_mask       int32 [b, L]  1 for the tokens to learn
  image_labels    int32 [b, L]  the word target of each image token in a grounding region, -100 elsewhere
                                (data/regions.py; the region_words objective)
  pixel_values    float32 [b, max_images, S, S, 3]  each row's images in order, unused slots zero
                  (only in a batch of a multimodal stream; a text stream's batches have none)
  high_res_pixel_values  [b, max_images, S', S', 3] for the hybrid model

L is seq_len when packing; in padding mode, the smallest bucket that holds the batch's longest row (right
padding). The model splices the k-th image of a row into its k-th run of image tokens, so packed samples keep
their own images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from dvl_jax.data.regions import NO_TARGET
from dvl_jax.data.rows import Row, Skipped


@dataclasses.dataclass
class HostBatch:
  """One process's share of a step's batch, in numpy, with what the pipeline knows of it.

  Attributes:
    arrays: the fields above.
    modality: "text" or "multimodal" (the stream it came from), or "mixed".
    skipped: the records skipped on the way to this batch.
    samples: samples in it; truncated: of them, cut to fit; images: images in it.
  """

  arrays: dict[str, np.ndarray]
  modality: str
  skipped: list[Skipped]
  samples: int
  truncated: int
  images: int

  def to_batch(self):
    """The training Batch (numpy fields) of these arrays, for place_batch."""
    from dvl_jax.training.batch import Batch  # pylint: disable=import-outside-toplevel

    return Batch(**self.arrays)


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """rows: per process; buckets: the row lengths (seq_len alone when packing); images: (slots, size, high-res
  size or None), or None for a text stream; pad_id: the padding token."""

  rows: int
  buckets: tuple[int, ...]
  images: tuple[int, int, int | None] | None
  pad_id: int


def make_batch(rows: list[Row], shape: BatchShape, modality: str) -> HostBatch:
  """Rows -> a HostBatch of `shape`."""
  longest = max(r.tokens for r in rows)
  length = next(b for b in shape.buckets if b >= longest)
  b = len(rows)
  out = {"input_ids": np.full((b, length), shape.pad_id, np.int32)}
  for name in ("attention_mask", "loss_mask"):
    out[name] = np.zeros((b, length), np.int32)
  out["positions"] = np.ones((b, length), np.int32)
  out["image_labels"] = np.full((b, length), NO_TARGET, np.int32)
  if shape.images is not None:
    slots, size, high = shape.images
    out["pixel_values"] = np.zeros((b, slots, size, size, 3), np.float32)
    if high is not None:
      out["high_res_pixel_values"] = np.zeros((b, slots, high, high, 3), np.float32)
  for i, row in enumerate(rows):
    t = k = 0
    for segment, ex in enumerate(row.examples, 1):
      n = len(ex)
      out["input_ids"][i, t:t + n] = ex.ids
      out["loss_mask"][i, t:t + n] = ex.loss_mask
      out["attention_mask"][i, t:t + n] = segment
      out["positions"][i, t:t + n] = np.arange(n)
      if ex.image_labels is not None:
        out["image_labels"][i, t:t + n] = ex.image_labels
      if ex.num_images:
        if shape.images is None:
          raise ValueError(f"{ex.where}: a sample with images reached a text-only batch (source {ex.source!r}); "
                           "give that source modality='multimodal'.")
        out["pixel_values"][i, k:k + ex.num_images] = ex.pixel_values
        if ex.high_res_pixel_values is not None:
          out["high_res_pixel_values"][i, k:k + ex.num_images] = ex.high_res_pixel_values
      t, k = t + n, k + ex.num_images
  examples = [e for r in rows for e in r.examples]
  return HostBatch(out, modality, [s for r in rows for s in r.skipped], len(examples),
                   sum(e.truncated for e in examples), sum(e.num_images for e in examples))


class BatchIterDataset(grain.IterDataset):
  """Rows -> HostBatches of `shape.rows` rows. The state is the parent's: a batch is whole rows."""

  def __init__(self, parent: grain.IterDataset, shape: BatchShape, modality: str):
    super().__init__(parent)
    self._shape, self._modality = shape, modality

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._parent.__iter__(), self._shape, self._modality)

  def __str__(self) -> str:
    return f"BatchIterDataset({self._shape.rows} rows, {self._modality})"


class _BatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, shape: BatchShape, modality: str):
    super().__init__(parent)
    self._shape, self._modality = shape, modality

  def __next__(self) -> HostBatch:
    return make_batch([next(self._parent) for _ in range(self._shape.rows)], self._shape, self._modality)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)
