"""The checks of a model's inputs on the host, before anything reaches a device: each error names what was
expected, what arrived and what to do."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dvl_jax.config import ModelConfig


def check_inputs(config: ModelConfig, input_ids: Any, attention_mask: Any = None, pixel_values: Any = None,
                 high_res_pixel_values: Any = None, image_mask: Any = None) -> None:
  """Raises a ValueError that names the problem when a model's host inputs do not fit `config` (the shapes,
  and, where the ids are concrete, their range and each row's image-token count against its images).

  Args:
    config: the model's config.
    input_ids, attention_mask, pixel_values, high_res_pixel_values, image_mask: as `Model.__call__` takes them.
  """
  shape = np.shape(input_ids)
  if len(shape) != 2:
    raise ValueError(f"input_ids must be [batch, seq_len]; got shape {shape}.")
  if attention_mask is not None and np.shape(attention_mask) != shape:
    raise ValueError(f"attention_mask shape {np.shape(attention_mask)} differs from input_ids shape {shape}.")
  if pixel_values is not None:
    s = config.vision.image_size
    ps = np.shape(pixel_values)
    if len(ps) != 5 or ps[0] != shape[0] or ps[2:] != (s, s, 3):
      raise ValueError(f"pixel_values must be [batch={shape[0]}, num_images, {s}, {s}, 3] (channels-last, "
                       f"one slot per image of the row); got shape {ps}.")
    if config.is_hybrid:
      s = config.high_res.image_size
      hs = np.shape(high_res_pixel_values) if high_res_pixel_values is not None else None
      if hs != (*ps[:2], s, s, 3):
        raise ValueError(f"The hybrid model takes high_res_pixel_values [{ps[0]}, {ps[1]}, {s}, {s}, 3] beside "
                         f"pixel_values {ps} (the same images at {s} px, for the SAM tower); got "
                         f"{'none' if hs is None else f'shape {hs}'}.")
  if high_res_pixel_values is not None and not config.is_hybrid:
    raise ValueError("high_res_pixel_values was given, but this model has no high-resolution (SAM) tower.")
  ids = _concrete(input_ids)
  if ids is None:
    return
  if ids.min(initial=0) < 0 or ids.max(initial=0) >= config.text.vocab_size:
    raise ValueError(f"input_ids must lie in [0, {config.text.vocab_size}); got values from {ids.min()} to "
                     f"{ids.max()}.")
  per_image = config.tokens_per_image
  counts = (ids == config.image_token_id).sum(axis=1)
  slots = 0 if pixel_values is None else np.shape(pixel_values)[1]
  images = None if image_mask is None or pixel_values is None else np.asarray(image_mask).sum(axis=1)
  for row, count in enumerate(counts):
    if images is not None and count != images[row] * per_image:
      raise ValueError(
          f"Row {row} of input_ids has {count} image tokens (id {config.image_token_id}) but image_mask marks "
          f"{images[row]} image(s) of {per_image} tokens each, {images[row] * per_image} tokens.")
    if count % per_image or count // per_image > slots:
      raise ValueError(
          f"Row {row} of input_ids has {count} image tokens (id {config.image_token_id}), but each image takes "
          f"{per_image} tokens and pixel_values has {slots} image slot(s) per row: expected a multiple of "
          f"{per_image} up to {slots * per_image}. Expand each image placeholder to {per_image} tokens and "
          "pass one image per placeholder.")


def _concrete(x: Any) -> np.ndarray | None:
  """The value of x as numpy when it is known on the host (not a tracer), else None."""
  return None if isinstance(x, jax.core.Tracer) else np.asarray(x)
