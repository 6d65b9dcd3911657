"""Grounded vision pretraining: each image token in a region predicts the region's words.

The bag-of-words objective (bag_of_words.py) gives a from-scratch tower one pooled target per image, and it
learns to tell a circle from a square about as slowly as through the decoder. With grounding data (boxes that
name what is in them: dvl_jax/data/regions.py) every image token in a box gets its own target, a word of that
box's text, and the tower learns what is where from many targets per image:

  features = the aligned features of every image token        [B, N*P, D]   (tower, then aligner)
  logits   = features @ lm_head.T                             [B, N*P, V]   (the decoder's output embeddings)
  loss     = cross-entropy against the token's word (Batch.image_labels), over the tokens that have one

No decoder layer runs and no head is added: the export is an ordinary checkpoint for the next stage's
`init_from`. Train the towers and the aligner (`optimizer.trainable`). Returned as a TokenLoss over the labelled
image tokens, so microbatches and devices add up as for the next-token loss.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from dvl_jax.nn.vlm import DeepseekVL
from dvl_jax.training.loss import IGNORE, TokenLoss, cross_entropy


def image_slot_labels(image_labels: jnp.ndarray, is_image: jnp.ndarray, slots: int) -> jnp.ndarray:
  """image_labels [B, T] at the image tokens -> [B, slots], the k-th image token's label in slot k (the order
  in which splice_image_features gives the k-th image token features[b, k]); IGNORE in unused slots."""
  b = image_labels.shape[0]
  slot = jnp.where(is_image, jnp.cumsum(is_image, axis=1) - 1, slots)  # [B, T]; non-image positions: dropped
  out = jnp.full((b, slots), IGNORE, jnp.int32)
  return out.at[jnp.arange(b)[:, None], slot].set(image_labels.astype(jnp.int32), mode="drop")


def region_words_loss(params: Any, batch: Any, module: DeepseekVL, *, chunk_size: int | None = 512,
                      frozen_towers: bool = False) -> TokenLoss:
  """The summed cross-entropy of every labelled image token's word from its own aligned feature scored by
  lm_head (module doc), and the number of those tokens. Args as `step.loss_fn`."""
  cfg = module.config
  if batch.pixel_values is None or batch.image_labels is None:
    raise ValueError("The region_words objective learns from images with grounding regions; this batch has "
                     f"{'no images' if batch.pixel_values is None else 'no image_labels'}. Train it on sources "
                     "whose records carry 'regions' (dvl_jax/data/regions.py).")
  features = module.apply({"params": params}, batch.pixel_values, batch.high_res_pixel_values, frozen_towers,
                          method=DeepseekVL.encode_images)  # [B, M, D], M = N * P
  m = features.shape[1]
  targets = image_slot_labels(batch.image_labels, batch.input_ids == cfg.image_token_id, m)  # [B, M]
  # cross_entropy predicts labels[:, t] from position t - 1: one position more, the targets one to the right.
  hidden = jnp.pad(features, ((0, 0), (0, 1), (0, 0)))  # [B, M + 1, D]
  labels = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=IGNORE)  # [B, M + 1]
  kernel = params["language_model"]["lm_head"]["kernel"]  # [V, D], V maybe padded
  return cross_entropy(hidden, kernel, labels, cfg.text.vocab_size, chunk_size=chunk_size)
