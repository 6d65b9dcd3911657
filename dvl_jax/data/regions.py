"""Grounding regions -> a word target on each image token: the data of the region_words objective
(dvl_jax/training/region_words.py), which teaches an image tower trained from scratch what is where.

A record may carry regions of its images, each a box in the image's pixels (EXIF orientation applied) and the
words that name what is in it:

  {"image": "a.jpg", "conversations": [...],
   "regions": [{"box": [x0, y0, x1, y1], "text": "red circle"}, {"image": 0, "box": [...], "text": "..."}]}

Each image token stands for one cell of the tower's grid over the preprocessed (resized, centred, padded)
image. A cell whose centre, mapped back into the original image, lies in a region's box learns that region's
words (the smallest box where boxes nest); the words' tokens are dealt out to the region's cells in turn (the
k-th cell of a region learns its (k mod n)-th token), so that over its cells a region teaches every word and
each cell, not knowing its turn, learns the words' mixture. Cells in no box learn nothing.

  labels = image_token_labels(regions, (width, height), processor.image_config, grid, token_ids)  # int32 [P]
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

NO_TARGET = -100  # dvl_jax.training.loss.IGNORE (transformers' ignore_index); the data side does not import jax


@dataclasses.dataclass(frozen=True)
class Region:
  """image: the index of the record's image; box: (x0, y0, x1, y1) in its pixels; text: the words naming it."""

  image: int
  box: tuple[float, float, float, float]
  text: str


def cell_centres(size: tuple[int, int], side: int, grid: int, min_size: int, rounding: str) -> np.ndarray:
  """The centres of the grid's cells [grid * grid, 2] (x, y; row-major, as the image tokens) in the pixels of an
  image of `size` (width, height) that the processor resized (longest side to `side`) and centred on a square
  (dvl_jax.processing.images.resize_longest_side, pad_to_square). Centres on the padding fall outside the image."""
  w, h = size
  scale = side / max(w, h)
  cut = round if rounding == "round" else int
  new_w, new_h = max(cut(w * scale), min_size), max(cut(h * scale), min_size)
  ox, oy = (side - new_w) // 2, (side - new_h) // 2
  centre = (np.arange(grid) + 0.5) * side / grid  # [grid] in the padded square's pixels
  xs = (centre - ox) * w / new_w
  ys = (centre - oy) * h / new_h
  return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)  # [grid * grid, 2], row-major


def image_token_labels(regions: Sequence[Region], size: tuple[int, int], image_config, grid: int,
                       token_ids: Callable[[str], list[int]]) -> np.ndarray:
  """The word target of each of an image's grid * grid tokens, NO_TARGET outside every region (module doc).

  Args:
    regions: this image's regions.
    size: the image's (width, height) before preprocessing.
    image_config: the processor's ImageConfig (size, min_size, rounding).
    grid: cells per side (image_size / patch_size).
    token_ids: text -> its token ids (the words as they appear in a sentence, after a space).
  Returns:
    int32 [grid * grid].
  """
  labels = np.full(grid * grid, NO_TARGET, np.int32)
  if not regions:
    return labels
  centres = cell_centres(size, image_config.size, grid, image_config.min_size, image_config.rounding)
  boxes = np.asarray([r.box for r in regions], np.float64)  # [R, 4]
  inside = ((centres[:, None, 0] >= boxes[None, :, 0]) & (centres[:, None, 0] < boxes[None, :, 2])
            & (centres[:, None, 1] >= boxes[None, :, 1]) & (centres[:, None, 1] < boxes[None, :, 3]))  # [P, R]
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [R]
  owner = np.where(inside, area[None, :], np.inf).argmin(-1)  # [P]: the smallest box holding the centre
  owned = inside.any(-1)  # [P]
  for r, region in enumerate(regions):
    ids = token_ids(region.text)
    cells = np.flatnonzero(owned & (owner == r))
    if ids and len(cells):
      labels[cells] = np.asarray(ids, np.int32)[np.arange(len(cells)) % len(ids)]
  return labels
