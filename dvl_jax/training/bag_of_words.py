"""Vision pretraining from captions: predict the words of a sample's answers from its images alone.

DeepSeek-VL starts from a SigLIP that contrastive pretraining on billions of pairs had already taught what
captions talk about. For a tower trained from random weights, this objective is the image-level bag-of-words
pretraining of Joulin et al. 2016 ("Learning Visual Features from Large Weakly Supervised Data", the softmax
form; CatLIP, 2024, is its sigmoid form over synsets), scored with the model's own parts:

  pooled = mean of the aligned features of a sample's images          [D]   (tower, then aligner)
  logits = pooled @ lm_head.T                                         [V]   (the decoder's output embeddings)
  loss   = cross-entropy of each supervised token (the answers, EOS included) against that one distribution

so its minimum puts each word's share of the answers on it (the normalised bag of words). No decoder layer runs:
a step costs the towers, the aligner and lm_head's matmul. No head is added: the run's export is an ordinary
checkpoint, for the next stage's `init_from`. Train the towers and the aligner (`optimizer.trainable`); lm_head
frozen keeps it the fixed random readout the decoder starts from (training it too is allowed).

  train: {objective: bag_of_words, ...}      # in an experiment's YAML (train.py)

The data are the ordinary batches (dvl_jax.data: conversations, packed or not). A sample is a segment of a row
(`attention_mask`); its images are the image tokens of that segment; a sample without images learns nothing.
The loss is returned as a TokenLoss over the supervised tokens, so microbatches and devices add up as for the
next-token loss (loss.py).

Measured on the shapes captioner (README, "The shapes captioner"): 1200 steps of it before the three stages did
not pay for their 6 minutes there; a pooled, per-image target teaches a from-scratch tower to tell circles from
squares about as slowly as the captions through the decoder do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dvl_jax.nn.vlm import DeepseekVL, splice_image_features
from dvl_jax.training.loss import IGNORE, TokenLoss, cross_entropy, make_labels


def pooled_image_features(features: jax.Array, is_image: jax.Array, segments: jax.Array) -> tuple[jax.Array,
                                                                                                      jax.Array]:
  """The mean image feature of each position's sample.

  Args:
    features: [B, T, D], the image features at image positions (anything elsewhere).
    is_image: bool [B, T].
    segments: int [B, T], each sample's id within its row (1 for unpacked rows), 0 for padding.
  Returns:
    (pooled [B, T, D] float32: the mean of the features of the image positions of the position's segment;
     has_images bool [B, T]: whether that segment has any).
  """
  b, t, d = features.shape
  n = b * (t + 1)  # (row, segment) pairs: a row holds at most T segments, ids 1..T
  ids = (jnp.arange(b)[:, None] * (t + 1) + segments).reshape(-1)  # [B*T], each < n
  weights = (is_image & (segments != 0)).reshape(-1).astype(jnp.float32)  # [B*T]
  sums = jax.ops.segment_sum(features.reshape(-1, d).astype(jnp.float32) * weights[:, None], ids,
                             num_segments=n)  # [n, D]
  counts = jax.ops.segment_sum(weights, ids, num_segments=n)  # [n]
  pooled = sums[ids] / jnp.maximum(counts[ids], 1.0)[:, None]  # [B*T, D]
  return pooled.reshape(b, t, d), (counts[ids] > 0).reshape(b, t)


def bag_of_words_loss(params: Any, batch: Any, module: DeepseekVL, *, chunk_size: int | None = 512,
                      frozen_towers: bool = False) -> TokenLoss:
  """The summed cross-entropy of every supervised token against its sample's pooled image features scored by
  lm_head (see the module doc), and the number of those tokens. Args as `step.loss_fn`.

  Returns:
    TokenLoss(sum float32 [], count int32 []): tokens of samples without images are not counted.
  """
  cfg = module.config
  if batch.pixel_values is None:
    raise ValueError("The bag_of_words objective learns from images; this batch has none (a text-only source?). "
                     "Train it on image-text sources.")
  if batch.labels is not None and batch.loss_mask is not None:
    raise ValueError("Give a Batch labels or loss_mask, not both.")
  features = module.apply({"params": params}, batch.pixel_values, batch.high_res_pixel_values, frozen_towers,
                          method=DeepseekVL.encode_images)  # [B, N*P, D]
  is_image = batch.input_ids == cfg.image_token_id  # [B, T]
  spliced = splice_image_features(jnp.zeros(batch.input_ids.shape + features.shape[-1:], features.dtype), is_image,
                                  features)  # [B, T, D]
  segments = batch.attention_mask.astype(jnp.int32)
  pooled, has_images = pooled_image_features(spliced, is_image, segments)  # [B, T, D], [B, T]
  labels = batch.labels
  if labels is None:
    labels = make_labels(batch.input_ids, batch.attention_mask, cfg.image_token_id, batch.loss_mask)
  labels = jnp.where(has_images, labels, IGNORE)  # [B, T]
  # cross_entropy predicts labels[:, t] from position t - 1, which a label's segment always holds (make_labels
  # never supervises a segment's first token), and every position of a segment holds the same pooled vector.
  kernel = params["language_model"]["lm_head"]["kernel"]  # [V, D], V maybe padded
  return cross_entropy(pooled, kernel, labels, cfg.text.vocab_size, chunk_size=chunk_size)
