"""The grounded vision pretraining loss against torch: transformers' image features (tower + aligner) of every
image token scored by its lm_head, torch's cross-entropy against each labelled token's word; the loss and the
gradient of every param (the decoder's layers get none); image tokens without a word and rows without images
add nothing; a batch without targets is refused."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dvl_jax.training import Batch, IGNORE
from dvl_jax.training.region_words import image_slot_labels, region_words_loss
from reference import random_inputs, to_torch_images
from test_bag_of_words import check_against_torch

IMAGES = [1, 2, 0]
PAD = [3, 0, 2]


def _inputs(ref, seed=0):
  """Random words on ~60% of the image tokens, IGNORE elsewhere (text tokens, padding, the rest)."""
  ids, mask, pixels = random_inputs(ref, IMAGES, pad=PAD, seed=seed)
  rng = np.random.default_rng(seed + 1)
  words = rng.integers(0, ref.config.text_config.vocab_size, ids.shape)
  labelled = (ids == ref.config.image_token_id) & (rng.random(ids.shape) < 0.6)
  return ids, mask, pixels, np.where(labelled, words, IGNORE).astype(np.int32)


def _torch_loss(ref, ids, pixels, image_labels):
  feats = ref.model.get_image_features(to_torch_images(pixels, IMAGES)).pooler_output  # [images, P, D]
  targets = torch.tensor(np.concatenate([image_labels[b][ids[b] == ref.config.image_token_id]
                                         for b in range(len(IMAGES))]), dtype=torch.long)  # row-major images
  logits = feats.reshape(-1, feats.shape[-1]) @ ref.lm_head.weight.T  # [images * P, V]
  keep = targets != IGNORE
  return torch.nn.functional.cross_entropy(logits[keep], targets[keep]), int(keep.sum())


@pytest.mark.slow
def test_loss_and_every_gradient_equal_torch_autograd(models):
  ref, model = models
  ids, mask, pixels, image_labels = _inputs(ref)
  ref.zero_grad()
  t_loss, t_count = _torch_loss(ref, ids, pixels, image_labels)
  batch = Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pixels),
                image_labels=jnp.asarray(image_labels))
  check_against_torch(ref, model, batch, t_loss, t_count, "region_words")


def test_slot_labels_follow_the_image_tokens_in_order():
  is_image = np.array([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]], bool)
  labels = np.array([[7, 1, 2, 8, 3, 9], [4, 5, 6, 7, 8, 9]])
  got = image_slot_labels(jnp.asarray(labels), jnp.asarray(is_image), 4)
  np.testing.assert_array_equal(got, [[1, 2, 3, IGNORE], [4, IGNORE, IGNORE, IGNORE]])


def test_a_batch_without_targets_is_refused(models):
  ref, model = models
  ids, mask, pixels, _ = _inputs(ref)
  with pytest.raises(ValueError, match="carry 'regions'"):
    region_words_loss(model.params, Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                          pixel_values=jnp.asarray(pixels)), model.module)
