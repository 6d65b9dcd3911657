"""A training batch: its fields, its placement over a mesh, its split into microbatches.

  batch = Batch(input_ids=ids, attention_mask=mask, loss_mask=answers, pixel_values=pixels)  # this process's rows
  batch = place_batch(plan, batch, microbatches=4)  # global arrays, rows split over the plan's batch axes

Padding rows that placement adds (so the rows divide over the devices and microbatches) learn nothing: their
labels are IGNORE, so they add neither to the loss nor to its token count, and the step equals the unpadded
batch's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import numpy as np

from dvl_jax.sharding import ShardingPlan
from dvl_jax.training.loss import IGNORE


@flax.struct.dataclass
class Batch:
  """A batch as the model takes it; every field is an array with B rows first, or None.

  Attributes:
    input_ids: int [B, T], each image as `tokens_per_image` consecutive image tokens.
    attention_mask: [B, T], 1 for real tokens (left or right padding); or, for packed rows, segment ids: each
      sample its own id 1, 2, ..., padding 0 (a token attends, and is predicted from, its own sample only).
    labels: int [B, T] aligned with input_ids, -100 where nothing is learned (make_labels); None: made from
      the ids, the mask and `loss_mask`.
    loss_mask: [B, T], 1 for the tokens to learn (used only without labels); None: every real text token.
    positions: int [B, T] RoPE positions; None: from the attention mask, restarting at each segment.
    pixel_values: [B, N, S, S, 3] normalised images, N slots per row; None: text only.
    high_res_pixel_values: [B, N, S', S', 3], the same images for SAM (hybrid model only).
    image_labels: int [B, T], the word target of each image token in a grounding region, IGNORE elsewhere
      (dvl_jax/data/regions.py; only the region_words objective reads it); None: none.
  """

  input_ids: jax.Array
  attention_mask: jax.Array
  labels: jax.Array | None = None
  loss_mask: jax.Array | None = None
  positions: jax.Array | None = None
  pixel_values: jax.Array | None = None
  high_res_pixel_values: jax.Array | None = None
  image_labels: jax.Array | None = None

  @property
  def rows(self) -> int:
    return self.input_ids.shape[0]


def split_microbatches(batch: Batch, microbatches: int) -> Batch:
  """[B, ...] -> [M, B / M, ...] on every field: microbatch i holds rows i, i + M, i + 2M, ...

  Strided rather than in blocks, so that a batch split over devices in blocks of rows (a multiple of M each:
  `place_batch`) splits into microbatches on every device at once, each device keeping its own rows. The
  loss is normalised over the whole batch, so which rows go together changes nothing else.
  """
  rows = batch.rows
  if microbatches < 1 or rows % microbatches:
    raise ValueError(f"The batch has {rows} rows, which do not split into microbatches={microbatches} equal "
                     "parts: give a batch whose rows are a multiple of microbatches (or change microbatches).")

  def split(x: jax.Array) -> jax.Array:
    x = x.reshape(rows // microbatches, microbatches, *x.shape[1:])  # [B / M, M, ...]
    return x.swapaxes(0, 1)  # [M, B / M, ...]

  return jax.tree.map(split, batch)


def place_batch(plan: ShardingPlan, batch: Batch, *, microbatches: int = 1, rows: int | None = None) -> Batch:
  """This process's rows (numpy or arrays) -> a global Batch laid out by `plan` (ShardingPlan.place), for
  `jit_train_step(..., plan=plan)`. Every process must call it together, each with its own rows.

  The rows are padded with copies of the last row to a count that divides over the plan's batch shards times
  `microbatches`, the same in every process. The padding rows' labels are IGNORE (a batch without labels or
  loss_mask gets a loss_mask of ones for its real rows, zeros for the padding), so they change nothing.

  The processes also agree on the row length and the image slots, each taking the longest: a process whose
  rows are shorter is padded at the end (padding tokens: segment 0, not learned), one with fewer slots gets empty
  ones. Two processes in padding mode may well bucket the same step to different lengths.

  Args:
    plan: the ShardingPlan of the train step.
    batch: a Batch of this process's B rows.
    microbatches: the train step's; the rows of each process become a multiple of its batch shards times this.
    rows: the padded row count of each process, already agreed (a multiple of the above), with the row length
      and image slots the same in every process; None: all agreed here.
  Returns:
    A Batch of global jax.Arrays, axis 0 split over the plan's batch axes.
  """
  arrays = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
  if arrays["labels"] is None and arrays["loss_mask"] is None:
    arrays["loss_mask"] = np.ones(np.shape(arrays["input_ids"]), np.int32)
  multiple = plan.batch_multiple() * microbatches
  if rows is None:
    pixels = arrays["pixel_values"]
    rows, length, slots = plan.agree_batch(batch.rows, np.shape(batch.input_ids)[1],
                                           0 if pixels is None else np.shape(pixels)[1])
    rows = -(-rows // multiple) * multiple
    arrays = _pad_to(arrays, length, slots)
  elif rows % multiple:
    raise ValueError(f"place_batch: rows={rows} must be a multiple of {multiple} (this process's batch shards "
                     f"under {plan}, {plan.batch_multiple()}, times microbatches={microbatches}).")
  fill = {name: value for name, value in (("labels", IGNORE), ("loss_mask", 0), ("image_labels", IGNORE))
          if arrays[name] is not None}
  return Batch(**plan.place(arrays, rows=rows, fill=fill))


# The value of each [B, T] field at padding positions: not attended (segment 0), not learned.
_PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE, "loss_mask": 0, "positions": 1,
               "image_labels": IGNORE}


def _pad_to(arrays: dict[str, Any], length: int, slots: int) -> dict[str, Any]:
  """Every [B, T] field padded to `length` positions, the image fields to `slots` images."""
  out = {}
  for name, x in arrays.items():
    size, value = (length, _PAD_VALUES.get(name)) if name in _PAD_VALUES else (slots, 0)
    if x is not None and np.shape(x)[1] < size:
      x = np.asarray(x)
      x = np.pad(x, [(0, 0), (0, size - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    out[name] = x
  return out


def batch_sharding(plan: ShardingPlan) -> Any:
  """The sharding of every field of a placed Batch (a pytree prefix for jax.jit): rows over the batch axes."""
  return plan.sharding(("batch",))
