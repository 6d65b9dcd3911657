"""The train step against transformers + torch.autograd + torch.optim.AdamW: the loss and every gradient, three
optimizer steps; gradient accumulation against the whole batch; frozen params and towers; mixed precision; the
FLOPs a frozen tower saves."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dvl_jax.convert.keymap import get_path, hf_to_target, to_target_layout
from dvl_jax.nn.vlm import DeepseekVL
from dvl_jax.training import (Batch, OptimizerConfig, init_train_state, jit_train_step, loss_and_grads, loss_fn,
                              make_labels, paper_config, trainable_mask)
from dvl_jax.training.batch import split_microbatches
from reference import converted, hf_hybrid_model, max_rel_err, random_inputs, to_torch_images

IMAGES = [1, 2]  # both rows hold images; row 0 is left-padded
PAD = [4, 0]


def _path(keys) -> str:
  return jax.tree_util.keystr(keys, simple=True, separator="/")


def _flat(tree) -> dict:
  return {_path(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _copy(tree):
  """Fresh buffers: a donated state must not take the fixture's params with it."""
  return jax.tree.map(jnp.array, tree)


def _inputs(ref, images=IMAGES, pad=PAD, seed=0):
  """A batch (numpy): ids, mask, pixels (and high-res pixels for the hybrid), labels with ~30% prompt."""
  ids, mask, *pixels = random_inputs(ref, images, pad=pad, seed=seed)
  loss_mask = np.random.default_rng(seed + 1).random(ids.shape) < 0.7
  labels = np.asarray(make_labels(jnp.asarray(ids), jnp.asarray(mask), ref.config.image_token_id,
                                  jnp.asarray(loss_mask)))
  return ids, mask, pixels, labels


def _batch(ids, mask, pixels, labels) -> Batch:
  return Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), labels=jnp.asarray(labels),
               pixel_values=jnp.asarray(pixels[0]),
               high_res_pixel_values=jnp.asarray(pixels[1]) if len(pixels) > 1 else None)


def _torch_loss(ref, ids, mask, pixels, labels, images):
  """transformers' mean loss over the supervised tokens, positions from the mask as in our step."""
  t_mask = torch.tensor(mask)
  positions = t_mask.long().cumsum(-1) - 1
  positions.masked_fill_(t_mask == 0, 1)
  kwargs = {}
  if len(pixels) > 1:
    kwargs["high_res_pixel_values"] = to_torch_images(pixels[1], images)
  return ref(input_ids=torch.tensor(ids), attention_mask=t_mask, position_ids=positions,
             pixel_values=to_torch_images(pixels[0], images), labels=torch.tensor(labels, dtype=torch.long),
             **kwargs).loss


def _torch_grads_like(ref, params) -> dict:
  """torch's .grad of every parameter in our layout ({our path: array}), by the converter's own key map and
  layout rule (linear, so it carries gradients as it carries weights). Every param of ours must be reached."""
  out = jax.tree.map(lambda x: np.full(x.shape, np.nan, np.float32), params)
  for name, p in ref.named_parameters():
    target = hf_to_target(name, out)
    assert target is not None, f"{name} has no counterpart in our params"
    path, layer = target
    parent = get_path(out, path[:-1])
    leaf = parent[path[-1]]
    shape = leaf.shape[1:] if layer is not None else leaf.shape
    grad = to_target_layout(p.grad.detach().float().numpy(), shape, name, path)
    if layer is None:
      parent[path[-1]] = grad
    else:
      leaf[layer] = grad
  flat = _flat(out)
  missing = [k for k, v in flat.items() if np.isnan(v).any()]
  assert not missing, f"no torch gradient reached {missing}"
  return flat


def _NULL_GRAD(name: str) -> bool:
  """SigLIP's k_proj bias (a torch name or our path): zero gradient in exact arithmetic (a softmax does not see
  a shift of all its logits), so its computed gradient is rounding noise."""
  return name.startswith(("model.vision_model", "vision_model/")) and name.replace("/", ".").endswith(
      "self_attn.k_proj.bias")


def _check_every_grad(ref, model, images, pad, tol):
  ids, mask, pixels, labels = _inputs(ref, images, pad)
  ref.zero_grad()
  t_loss = _torch_loss(ref, ids, mask, pixels, labels, images)
  t_loss.backward()
  expected = _torch_grads_like(ref, model.params)
  loss, grads = jax.jit(loss_and_grads, static_argnums=2, static_argnames="chunk_size")(
      model.params, _batch(ids, mask, pixels, labels), model.module, chunk_size=7)
  assert abs(float(loss.mean) / t_loss.item() - 1) < 1e-5
  got = _flat(grads)
  assert got.keys() == expected.keys()
  # A gradient that is zero in exact arithmetic (SigLIP's k_proj bias: a softmax does not see a shift of all
  # its logits) is rounding noise in both; it is checked against the largest gradient of all instead.
  scale = max(np.abs(g).max() for g in expected.values())
  null = {k for k, g in expected.items() if np.abs(g).max() < 1e-6 * scale}
  for k in null:
    assert np.abs(got[k]).max() < 1e-6 * scale, k
  errs = {k: max_rel_err(got[k], expected[k]) for k in got if k not in null}
  worst = max(errs, key=errs.get)
  print(f"\n{len(got)} gradients ({len(null)} zero in exact arithmetic: {sorted(null)}); worst {worst}: "
        f"{errs[worst]:.2e}")
  assert errs[worst] < tol, worst


@pytest.mark.slow
def test_loss_and_every_gradient_equal_torch_autograd(models):
  ref, model = models
  _check_every_grad(ref, model, IMAGES, PAD, 1e-4)


@pytest.mark.slow
def test_hybrid_loss_and_every_gradient_equal_torch_autograd(tmp_path_factory):
  ref = hf_hybrid_model("window_pads")
  _check_every_grad(ref, converted(ref, tmp_path_factory), IMAGES, PAD, 1e-4)


@pytest.mark.slow
def test_three_steps_equal_torch_adamw_clipping_and_warmup(models):
  ref, model = models
  ref = type(ref)(ref.config).eval()  # a copy, so the fixture's torch weights stay put
  ref.load_state_dict(models[0].state_dict())
  config = OptimizerConfig(learning_rate=1e-2, total_steps=10, schedule="cosine", warmup_steps=2, stage="S3",
                           clip_norm=0.5)
  assert all(jax.tree.leaves(trainable_mask(model.params, config)))  # S3 trains every param of the 1.3B layout
  schedule = config.learning_rate_fn()
  topt = torch.optim.AdamW(ref.parameters(), lr=config.learning_rate, betas=(config.b1, config.b2), eps=config.eps,
                           weight_decay=0.0)
  tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: float(schedule(s)) / config.learning_rate)

  state = init_train_state(_copy(model.params), config)
  step = jit_train_step(model.module, config, chunk_size=7)
  norms = []
  for i in range(3):
    ids, mask, pixels, labels = _inputs(ref, seed=i)
    state, metrics = step(state, _batch(ids, mask, pixels, labels))
    topt.zero_grad()
    t_loss = _torch_loss(ref, ids, mask, pixels, labels, IMAGES)
    t_loss.backward()
    norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), config.clip_norm)))
    lr = topt.param_groups[0]["lr"]
    topt.step()
    tsched.step()
    assert abs(float(metrics["loss"]) / t_loss.item() - 1) < 1e-5
    assert abs(float(metrics["grad_norm"]) / norms[-1] - 1) < 1e-5
    assert abs(float(metrics["learning_rate"]) - lr) < 1e-9
    assert int(metrics["tokens"]) == (labels[:, 1:] != -100).sum()
  assert int(state.step) == 3 and min(norms) > config.clip_norm  # every step clipped
  expected = {k: v.detach().numpy() for k, v in ref.named_parameters()}
  start = {k: v.detach().numpy() for k, v in models[0].named_parameters()}
  got = _flat(state.params)
  for name, t in expected.items():
    path, layer = hf_to_target(name, state.params)
    ours = got["/".join(path)] if layer is None else got["/".join(path)][layer]
    if _NULL_GRAD(name):
      # Its gradient is rounding noise in both (see _check_every_grad), which AdamW turns into steps of about
      # +-lr in arbitrary directions: only the size of the move compares.
      moved = np.abs(ours - to_target_layout(start[name], ours.shape, name, path)).max()
      assert moved <= 1.01 * sum(float(schedule(s)) for s in range(3)), name
      continue
    err = max_rel_err(ours, to_target_layout(t, ours.shape, name, path))
    assert err < 1e-5, (name, err)


def _eight_rows(ref):
  images, pad = [1, 2, 1, 2, 2, 1, 1, 2], [4, 0, 2, 0, 1, 7, 0, 5]  # rows supervise different token counts
  return _batch(*_inputs(ref, images, pad, seed=3))


@pytest.mark.slow
def test_four_microbatches_equal_the_whole_batch(models):
  ref, model = models
  batch = _eight_rows(ref)
  grads_fn = jax.jit(loss_and_grads, static_argnums=2, static_argnames=("microbatches", "chunk_size"))
  whole_loss, whole = grads_fn(model.params, batch, model.module, chunk_size=7)
  split_loss, split = grads_fn(model.params, batch, model.module, microbatches=4, chunk_size=7)
  assert int(split_loss.count) == int(whole_loss.count)
  assert abs(float(split_loss.mean) / float(whole_loss.mean) - 1) < 1e-6
  whole, split = _flat(whole), _flat(split)
  scale = max(np.abs(g).max() for g in whole.values())
  for k in whole:
    if _NULL_GRAD(k):
      assert np.abs(split[k] - whole[k]).max() < 1e-6 * scale, k
    else:
      assert max_rel_err(split[k], whole[k]) < 1e-6, k
  # The optimizer step after accumulated gradients: test_sharded_step.py (2 microbatches against 1, under 4 plans).


def test_microbatches_must_divide_the_rows():
  batch = Batch(input_ids=jnp.zeros((6, 3), jnp.int32), attention_mask=jnp.ones((6, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"6 rows, which do not split into microbatches=4 equal parts"):
    split_microbatches(batch, 4)
  assert split_microbatches(batch, 3).input_ids.shape == (3, 2, 3)


def test_labels_and_loss_mask_are_exclusive(models):
  _, model = models
  ids = jnp.ones((1, 4), jnp.int32)
  batch = Batch(input_ids=ids, attention_mask=ids, labels=ids, loss_mask=ids)
  with pytest.raises(ValueError, match="labels or loss_mask, not both"):
    loss_fn(model.params, batch, model.module)


@pytest.mark.slow
def test_s1_changes_the_aligner_only(models):
  ref, model = models
  config = paper_config("S1", total_steps=10, warmup_steps=0)
  before = _flat(model.params)
  state, metrics = jit_train_step(model.module, config, chunk_size=7)(
      init_train_state(_copy(model.params), config), _batch(*_inputs(ref)))
  after = _flat(state.params)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  for k in before:
    if k.startswith("aligner/"):
      assert not np.array_equal(after[k], before[k]), k
    else:
      assert after[k].tobytes() == before[k].tobytes(), k


@pytest.mark.slow
def test_frozen_towers_change_no_trained_gradient(models):
  ref, model = models
  batch = _batch(*_inputs(ref))
  grads_fn = jax.jit(loss_and_grads, static_argnums=2, static_argnames=("frozen_towers", "chunk_size"))
  plain = _flat(grads_fn(model.params, batch, model.module, chunk_size=7, frozen_towers=False)[1])
  stopped = _flat(grads_fn(model.params, batch, model.module, chunk_size=7, frozen_towers=True)[1])
  mask = trainable_mask(model.params, paper_config("S2", total_steps=10, warmup_steps=0))
  split = _flat(jax.jit(lambda p, b: loss_and_grads(p, b, model.module, mask, chunk_size=7))(model.params, batch)[1])
  for k in plain:
    if k.startswith("vision_model/"):
      assert plain[k].any() and not stopped[k].any() and not split[k].any(), k
    else:
      assert max_rel_err(stopped[k], plain[k]) < 1e-6 and max_rel_err(split[k], plain[k]) < 1e-6, k


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.slow
def test_a_frozen_tower_makes_the_step_cheaper(models):
  """Compiled FLOPs of the gradient, all params trained vs SigLIP frozen (by stop_gradient alone, and by
  differentiating the trained params only), against the tower's own forward pass."""
  ref, model = models
  batch = _batch(*_inputs(ref))
  module, params = model.module, model.params
  s2 = trainable_mask(params, paper_config("S2", total_steps=10, warmup_steps=0))
  s1 = trainable_mask(params, paper_config("S1", total_steps=10, warmup_steps=0))
  grads = lambda mask, frozen: (lambda p, b: loss_and_grads(p, b, module, mask, chunk_size=7, frozen_towers=frozen))
  f = {
      "forward": _flops(lambda p, b: loss_fn(p, b, module, chunk_size=7), params, batch),
      "all trained": _flops(grads(None, False), params, batch),
      "stop_gradient only": _flops(grads(None, True), params, batch),
      "S2 (split + stop)": _flops(grads(s2, None), params, batch),
      "S1 (split + stop)": _flops(grads(s1, None), params, batch),
  }
  pixels = batch.pixel_values.reshape(-1, *batch.pixel_values.shape[2:])
  tower = _flops(lambda p, x: module.apply({"params": p}, x, method=lambda m, x: m.vision_model(x)), params, pixels)
  print("\ncompiled FLOPs: " + ", ".join(f"{k} {v:.3g}" for k, v in f.items()) + f"; SigLIP forward {tower:.3g}")
  saved = f["all trained"] - f["S2 (split + stop)"]
  assert f["stop_gradient only"] < f["all trained"] - tower  # the tower's backward (about 2x its forward) is gone
  assert f["S2 (split + stop)"] <= f["stop_gradient only"] and saved > tower
  assert f["S1 (split + stop)"] < f["S2 (split + stop)"]  # no LLM weight gradients either


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_state(models):
  ref, model = models
  module = DeepseekVL(dataclasses.replace(model.config, dtype="bfloat16"))
  config = OptimizerConfig(learning_rate=1e-3, total_steps=10, stage="S3")
  batch = _batch(*_inputs(ref))
  state, metrics = jit_train_step(module, config, chunk_size=7)(init_train_state(_copy(model.params), config), batch)
  f32 = float(jax.jit(lambda p, b: loss_fn(p, b, model.module, chunk_size=7).mean)(model.params, batch))
  assert abs(float(metrics["loss"]) / f32 - 1) < 2e-2  # bfloat16 activations, same model
  assert np.isfinite(float(metrics["grad_norm"]))
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  hidden = jax.eval_shape(lambda p, b: module.apply({"params": p}, b.input_ids, b.attention_mask,
                                                   jnp.zeros_like(b.input_ids), b.pixel_values,
                                                   method=DeepseekVL.hidden_states), state.params, batch)
  assert hidden.dtype == jnp.bfloat16  # the compute dtype really is bfloat16
