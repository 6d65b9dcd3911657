"""The bag-of-words vision pretraining loss against torch: transformers' image features (tower + aligner), mean
pooled per sample, scored by its lm_head, torch's cross-entropy per supervised token; the loss and the gradients
of every param (the decoder's layers get none); packed rows equal the same samples unpacked; a train step with
this objective moves the tower and the aligner only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dvl_jax.training import (Batch, OptimizerConfig, init_train_state, jit_train_step, loss_and_grads,
                              make_labels, objective_loss)
from dvl_jax.training.bag_of_words import bag_of_words_loss
from reference import max_rel_err, random_inputs, to_torch_images
from test_step import _flat, _torch_grads_like

IMAGES = [1, 2, 0]  # the last row has no image: it learns nothing
PAD = [3, 0, 2]


def _inputs(ref, seed=0):
  ids, mask, pixels = random_inputs(ref, IMAGES, pad=PAD, seed=seed)
  loss_mask = np.random.default_rng(seed + 1).random(ids.shape) < 0.6
  labels = np.asarray(make_labels(jnp.asarray(ids), jnp.asarray(mask), ref.config.image_token_id,
                                  jnp.asarray(loss_mask)))
  return ids, mask, pixels, labels


def _torch_loss(ref, ids, pixels, labels):
  """Each row's images through transformers' tower and aligner, mean-pooled; lm_head's logits; the mean
  cross-entropy of the row's supervised tokens (labels[:, 1:], as transformers shifts them) over all rows."""
  feats = ref.model.get_image_features(to_torch_images(pixels, IMAGES)).pooler_output  # [images, P, D]
  total, count, first = 0.0, 0, 0
  for b, k in enumerate(IMAGES):
    targets = torch.tensor(labels[b, 1:][labels[b, 1:] != -100], dtype=torch.long)
    if k:
      pooled = feats[first:first + k].reshape(-1, feats.shape[-1]).mean(0)  # [D]
      logits = (ref.lm_head.weight @ pooled)[None].expand(len(targets), -1)  # [n, V]
      total = total + torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
      count += len(targets)
    first += k
  return total / count, count


def check_against_torch(ref, model, batch, t_loss, t_count, objective):
  """Our loss and every gradient of a vision-pretraining objective against torch's (t_loss backpropagated):
  the decoder's layers get no gradient, the tower, the aligner and lm_head one equal to torch's."""
  t_loss.backward()
  loss, grads = jax.jit(loss_and_grads, static_argnums=2, static_argnames=("chunk_size", "objective"))(
      model.params, batch, model.module, chunk_size=5, objective=objective)
  assert int(loss.count) == t_count > 0
  assert abs(float(loss.mean) / t_loss.item() - 1) < 1e-5
  for p in ref.parameters():  # what torch leaves without a gradient has none here: zeros, as frozen params get
    if p.grad is None:
      p.grad = torch.zeros_like(p)
  expected, got = _torch_grads_like(ref, model.params), _flat(grads)
  assert all(not np.any(g) for k, g in got.items() if k.startswith("language_model/") and "lm_head" not in k)
  assert all(np.abs(got[k]).max() > 0 for k in got if k.startswith(("aligner/", "language_model/lm_head")))
  scale = max(np.abs(g).max() for g in expected.values())
  errs = {k: max_rel_err(got[k], expected[k]) for k in got if np.abs(expected[k]).max() > 1e-6 * scale}
  worst = max(errs, key=errs.get)
  assert errs[worst] < 1e-4, (worst, errs[worst])
  assert any(k.startswith("vision_model/") for k in errs)


@pytest.mark.slow
def test_loss_and_every_gradient_equal_torch_autograd(models):
  ref, model = models
  ids, mask, pixels, labels = _inputs(ref)
  ref.zero_grad()
  t_loss, t_count = _torch_loss(ref, ids, pixels, labels)
  batch = Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), labels=jnp.asarray(labels),
                pixel_values=jnp.asarray(pixels))
  check_against_torch(ref, model, batch, t_loss, t_count, "bag_of_words")


def test_packed_rows_equal_the_samples_unpacked(models):
  """Two samples with an image each and a text-only one packed into one row (segment ids 1, 2, 3): the summed
  loss and count equal those of the samples in rows of their own; the text-only sample adds nothing."""
  ref, model = models
  ids, mask, pixels = random_inputs(ref, [1, 1, 0], pad=[0, 0, 0], seed=4)
  learn = np.random.default_rng(5).random(ids.shape) < 0.7
  unpacked = Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), loss_mask=jnp.asarray(learn),
                   pixel_values=jnp.asarray(pixels))
  packed = Batch(input_ids=jnp.asarray(ids.reshape(1, -1)),
                 attention_mask=jnp.asarray((mask * np.arange(1, 4)[:, None]).reshape(1, -1)),
                 loss_mask=jnp.asarray(learn.reshape(1, -1)),
                 pixel_values=jnp.asarray(pixels[:2].reshape(1, 2, *pixels.shape[2:])))  # [1, 2, S, S, 3]
  loss = jax.jit(bag_of_words_loss, static_argnums=2)
  a, b = loss(model.params, unpacked, model.module), loss(model.params, packed, model.module)
  expected = (learn[:2, 1:] & (ids[:2, 1:] != ref.config.image_token_id)).sum()  # rows 0, 1; not the first tokens
  assert int(a.count) == int(b.count) == expected > 0
  assert abs(float(a.sum) / float(b.sum) - 1) < 1e-5


def test_a_batch_without_images_is_refused(models):
  _, model = models
  ids = jnp.ones((1, 8), jnp.int32) * 5
  with pytest.raises(ValueError, match="learns from images"):
    bag_of_words_loss(model.params, Batch(input_ids=ids, attention_mask=jnp.ones_like(ids)), model.module)
  with pytest.raises(ValueError, match="not one of"):
    objective_loss("bag_of_word")


@pytest.mark.slow
def test_a_step_moves_the_tower_and_the_aligner_only(models):
  ref, model = models
  ids, mask, pixels, labels = _inputs(ref, seed=2)
  config = OptimizerConfig(learning_rate=1e-2, total_steps=3, trainable=("vision_model/.*", "aligner/.*"))
  before = _flat(model.params)
  state = init_train_state(jax.tree.map(jnp.array, model.params), config)
  step = jit_train_step(model.module, config, objective="bag_of_words")
  batch = Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), labels=jnp.asarray(labels),
                pixel_values=jnp.asarray(pixels))
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  after = _flat(state.params)
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  assert moved and all(k.startswith(("vision_model/", "aligner/")) for k in moved)
  assert any(k.startswith("vision_model/") for k in moved) and losses[-1] < losses[0]
