"""The train step over 8 simulated devices under each strategy equals the step on one device; params and
optimizer state are split as the plan says; padding rows added by placement learn nothing."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import dvl_jax
from dvl_jax.sharding import ShardingPlan
from dvl_jax.training import (Batch, OptimizerConfig, abstract_train_state, init_train_state, jit_train_step,
                              place_batch)

# An odd vocabulary (257 rows): tensor plans pad it to 258, and the padded row must stay out of the loss.
CONFIG = dvl_jax.tiny().replace(text=dataclasses.replace(dvl_jax.tiny().text, vocab_size=257))
# S3: the LLM, the aligner and SigLIP trained, so every tower has moments to split; a warm-up, clipping. An eps
# near the gradients' size: with torch's 1e-8, AdamW's g / (|g| + eps) turns the rounding of a gradient near 0
# (the devices sum in another order) into a full +-lr step, which compares rounding, not sharding.
OPTIMIZER = OptimizerConfig(learning_rate=1e-2, total_steps=10, warmup_steps=2, eps=1e-3, stage="S3")
STEPS = 2  # the second step reads the first one's moments


def _batch(rows=3, seed=0) -> Batch:
  """`rows` rows (3: every mesh pads them) with 1 or 2 images, some left padding, ~30% prompt."""
  rng = np.random.default_rng(seed)
  per, s = CONFIG.tokens_per_image, CONFIG.vision.image_size
  ids = rng.integers(0, CONFIG.image_token_id, (rows, 2 * per + 12)).astype(np.int32)
  mask = np.ones_like(ids)
  for r in range(rows):
    ids[r, 3:3 + per] = CONFIG.image_token_id
    if r % 2:
      ids[r, 5 + per:5 + 2 * per] = CONFIG.image_token_id
      mask[r, :2] = 0
  return Batch(input_ids=ids, attention_mask=mask, loss_mask=(rng.random(ids.shape) < 0.7).astype(np.int32),
               pixel_values=rng.normal(size=(rows, 2, s, s, 3)).astype(np.float32))


def _run(model, batch, plan=None, microbatches=1, optimizer=OPTIMIZER, objective="next_token"):
  """STEPS steps from model.params -> (final state, metrics per step)."""
  like = None if plan is None else abstract_train_state(CONFIG, plan, optimizer)
  state = init_train_state(jax.tree.map(lambda x: x.copy(), model.params), optimizer, like)
  step = jit_train_step(model.module, optimizer, microbatches=microbatches, chunk_size=16, plan=plan,
                        objective=objective)
  if plan is not None:
    batch = place_batch(plan, batch, microbatches=microbatches)
  metrics = []
  for _ in range(STEPS):
    state, m = step(state, batch)
    metrics.append({k: float(v) for k, v in m.items()})
  assert step._cache_size() == 1  # the second step's state is laid out as the first's: no second compile
  return state, metrics


@pytest.fixture(scope="module")
def one_device():
  rng = np.random.default_rng(1)  # random norms and biases too; no init to compile
  params = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(x.dtype), dvl_jax.abstract_params(CONFIG))
  return params, _run(dvl_jax.Model(CONFIG, params), jax.tree.map(jax.numpy.asarray, _batch()))


def _moments(state):
  adam = state.opt_state[1].inner_states["trainable"].inner_state[0]  # clip's and the frozen params' states: empty
  return adam.mu, adam.nu


def _unpadded(tree):
  """The checkpoint's shapes: the vocabulary's padded rows cut (they are zeros, and their moments too)."""
  def cut(path, x):
    x = np.asarray(x)
    if jax.tree_util.keystr(path).endswith(("['embed_tokens']['embedding']", "['lm_head']['kernel']")):
      return x[:CONFIG.text.vocab_size]
    return x
  return jax.tree_util.tree_map_with_path(cut, tree)


def _assert_close(got, want, what):
  """Each tensor within 1e-5 of its own largest value; a tensor a thousand times smaller than the largest of
  its tree (SigLIP's k_proj bias, whose exact gradient is 0: its moments are rounding noise) within 1e-5 of
  that floor."""
  want = jax.tree.map(np.asarray, want)
  floor = 1e-3 * max(np.abs(w).max() for w in jax.tree.leaves(want))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(_unpadded(got)), jax.tree.leaves(want)):
    assert g.shape == w.shape, (what, jax.tree_util.keystr(path))
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(np.abs(w).max(), floor),
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.slow
@pytest.mark.parametrize("mesh, strategy, microbatches", [
    ("data=8", "data", 1), ("fsdp=8", "fsdp", 1), ("data=4,tensor=2", "tensor", 1),
    ("fsdp=4,tensor=2", "fsdp_tensor", 2)])
def test_a_sharded_train_step_equals_one_device(one_device, mesh, strategy, microbatches):
  params, (want, want_metrics) = one_device
  plan = ShardingPlan(mesh)
  assert plan.strategy == strategy
  got, metrics = _run(dvl_jax.Model(CONFIG, params, plan=plan), _batch(), plan, microbatches)

  for m, w in zip(metrics, want_metrics):  # the 5 padding rows add no token and no loss
    assert m["tokens"] == w["tokens"]
    for k in ("loss", "grad_norm", "learning_rate"):
      assert abs(m[k] - w[k]) <= 1e-5 * abs(w[k]), (k, m[k], w[k])
  assert int(got.step) == STEPS
  _assert_close(got.params, want.params, "params")
  for g, w, name in zip(_moments(got), _moments(want), ("mu", "nu")):
    _assert_close(g, w, name)

  # Every moment is laid out as its param, and the plan splits them: fsdp the embed axis, tensor the heads.
  mu = _moments(got)[0]
  jax.tree.map(lambda m, p: m.sharding.is_equivalent_to(p.sharding, m.ndim) or pytest.fail(f"{m.sharding}"),
               mu, {k: got.params[k] for k in mu})
  q = got.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [heads 4, head_dim 16, embed 64]
  fsdp, tensor = plan.mesh.shape["fsdp"], plan.mesh.shape["tensor"]
  want_shard = (4 // tensor, 16, 64 // fsdp)
  for tree in (got.params, mu):
    kernel = tree["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {want_shard}
  assert q.sharding.spec == {"data": P(None, None, None), "fsdp": P(None, None, "fsdp"),
                             "tensor": P("tensor", None, None), "fsdp_tensor": P("tensor", None, "fsdp")}[strategy]
  lm_head = mu["language_model"]["lm_head"]["kernel"]  # [vocab, embed]: padded to 258 where tensor splits it
  assert lm_head.shape == (258 if tensor > 1 else 257, 64)
  assert {s.data.shape for s in lm_head.addressable_shards} == {(lm_head.shape[0] // tensor, 64 // fsdp)}
  siglip = mu["vision_model"]["layers"]["mlp"]["fc1"]["kernel"]
  assert siglip.sharding.spec == got.params["vision_model"]["layers"]["mlp"]["fc1"]["kernel"].sharding.spec


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["bag_of_words", "region_words"])
def test_a_sharded_vision_pretraining_step_equals_one_device(one_device, objective):
  """The vision-pretraining objectives (training/bag_of_words.py, region_words.py) over fsdp and tensor with 2
  microbatches: their per-row pooling or per-token targets and the padded vocabulary's lm_head give the
  one-device losses and params."""
  params = one_device[0]
  optimizer = dataclasses.replace(OPTIMIZER, stage=None, trainable=("vision_model/.*", "aligner/.*"))
  batch = _batch()
  if objective == "region_words":  # a word on ~half the image tokens
    rng = np.random.default_rng(7)
    words = rng.integers(0, CONFIG.text.vocab_size, batch.input_ids.shape)
    labelled = (batch.input_ids == CONFIG.image_token_id) & (rng.random(words.shape) < 0.5)
    batch = batch.replace(image_labels=np.where(labelled, words, -100).astype(np.int32))
  kw = dict(optimizer=optimizer, objective=objective)
  want, want_metrics = _run(dvl_jax.Model(CONFIG, params), jax.tree.map(jax.numpy.asarray, batch), **kw)
  plan = ShardingPlan("fsdp=4,tensor=2")
  got, metrics = _run(dvl_jax.Model(CONFIG, params, plan=plan), batch, plan, 2, **kw)
  for m, w in zip(metrics, want_metrics):
    assert m["tokens"] == w["tokens"] > 0
    for k in ("loss", "grad_norm"):
      assert abs(m[k] - w[k]) <= 1e-5 * abs(w[k]), (k, m[k], w[k])
  _assert_close(got.params, want.params, "params")


def test_placement_pads_rows_that_learn_nothing():
  plan = ShardingPlan("data=4,fsdp=2")
  batch = place_batch(plan, _batch(rows=3), microbatches=2)  # 3 rows -> 16: a multiple of 8 shards x 2
  assert batch.input_ids.shape[0] == 16 and batch.labels is None
  assert batch.input_ids.sharding.spec == P(("data", "fsdp"), None)
  loss_mask = np.asarray(batch.loss_mask)
  assert loss_mask[3:].sum() == 0 and loss_mask[:3].sum() > 0
  np.testing.assert_array_equal(np.asarray(batch.input_ids)[3:], np.repeat(_batch(rows=3).input_ids[2:], 13, 0))
  # Without labels or a loss mask, the real rows learn every text token, the copies none.
  bare = dataclasses.replace(_batch(rows=3), loss_mask=None)
  placed = place_batch(plan, bare)
  np.testing.assert_array_equal(np.asarray(placed.loss_mask), np.repeat([1, 0], [3, 5])[:, None] *
                                np.ones_like(bare.input_ids[:1]))
  labelled = place_batch(plan, dataclasses.replace(bare, labels=bare.input_ids))
  assert (np.asarray(labelled.labels)[3:] == -100).all() and labelled.loss_mask is None
  with pytest.raises(ValueError, match=r"rows=12 must be a multiple of 16"):
    place_batch(plan, bare, microbatches=2, rows=12)


def test_a_module_without_the_plans_vocabulary_padding_is_refused():
  plan = ShardingPlan("data=4,tensor=2")
  with pytest.raises(ValueError, match=r"holds 257 vocabulary rows; under .* holds 258"):
    jit_train_step(dvl_jax.nn.vlm.DeepseekVL(CONFIG), OPTIMIZER, plan=plan)
  with pytest.raises(ValueError, match=r"not at the shapes of the plan's layout.*\n  \['language_model'\]"):
    init_train_state(dvl_jax.abstract_params(CONFIG), OPTIMIZER, abstract_train_state(CONFIG, plan, OPTIMIZER))
