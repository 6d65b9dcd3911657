"""The train step: the loss of a batch, its gradient accumulated over microbatches, one AdamW update.

  config = paper_config("S2", total_steps=10_000)
  state = init_train_state(params, config)  # float32 params; optimizer state for the trained ones only
  step = jit_train_step(module, config, microbatches=4)  # the state is donated
  state, metrics = step(state, batch)  # metrics: loss, tokens, grad_norm, learning_rate

Over a mesh (data, fsdp, tensor or both: dvl_jax.sharding), the same step with the state in its shards:

  model = Model(model_config, params, plan=plan)  # params in their shards, the vocabulary padded if need be
  state = init_train_state(model.params, config, like=abstract_train_state(model_config, plan, config))
  step = jit_train_step(model.module, config, microbatches=4, plan=plan)
  state, metrics = step(state, place_batch(plan, batch, microbatches=4))  # this process's rows in

The step differentiates the trained params only: the frozen ones (`OptimizerConfig`: SAM always, SigLIP in S1
and S2, the LLM in S1) are closed over as constants, so no gradient of theirs is computed or stored, and a
frozen tower's backward pass does not exist. When SigLIP (and SAM) are frozen, the image features are also
passed through `stop_gradient` at the towers' outputs (DeepseekVL's `frozen_towers`), which keeps that true
for any caller that differentiates the whole tree. test_step.py measures the FLOPs this saves.

The loss of each microbatch is a summed cross-entropy and a token count (loss.TokenLoss). The gradients of the
sums and the counts are added over microbatches (a `lax.scan`) and divided once by the batch's count, so
accumulation gives exactly the gradient of the whole batch's mean loss, however the rows are split.

Mixed precision: params and optimizer state stay in the params' dtype (float32); the module computes in its
config's `dtype` (e.g. bfloat16), its layers casting the params, so the gradients arrive in float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from dvl_jax import sharding
from dvl_jax.nn.attention import segment_positions
from dvl_jax.nn.vlm import DeepseekVL
from dvl_jax.sharding import ShardingPlan
from dvl_jax.training.bag_of_words import bag_of_words_loss
from dvl_jax.training.batch import Batch, batch_sharding, split_microbatches
from dvl_jax.training.loss import TokenLoss, cross_entropy, make_labels
from dvl_jax.training.optimizer import OptimizerConfig, make_optimizer, trainable_mask
from dvl_jax.training.region_words import region_words_loss
from dvl_jax.training.state import TrainState, abstract_train_state, shardings_of

TOWERS = ("vision_model", "high_res_vision_model")  # SigLIP, SAM: the params behind `frozen_towers`


def loss_fn(params: Any, batch: Batch, module: DeepseekVL, *, chunk_size: int | None = 512,
            frozen_towers: bool = False) -> TokenLoss:
  """The summed next-token cross-entropy of `batch` and its supervised-token count.

  Args:
    params: the model's params.
    batch: a Batch.
    module: the DeepseekVL module (its config's dtype is the compute dtype).
    chunk_size: positions per chunk of logits (loss.cross_entropy); None: all at once.
    frozen_towers: stop the gradient at SigLIP's and SAM's outputs (DeepseekVL.encode_images).
  Returns:
    TokenLoss(sum float32 [], count int32 []).
  """
  cfg = module.config
  if batch.labels is not None and batch.loss_mask is not None:
    raise ValueError("Give a Batch labels or loss_mask, not both: labels already say which tokens are learned "
                     "(make_labels(ids, mask, image_token_id, loss_mask) turns a loss_mask into labels).")
  positions = segment_positions(batch.attention_mask) if batch.positions is None else batch.positions
  hidden = module.apply({"params": params}, batch.input_ids, batch.attention_mask, positions, batch.pixel_values,
                        batch.high_res_pixel_values, frozen_towers=frozen_towers,
                        method=DeepseekVL.hidden_states)  # [B, T, D]
  labels = batch.labels
  if labels is None:
    labels = make_labels(batch.input_ids, batch.attention_mask, cfg.image_token_id, batch.loss_mask)  # [B, T]
  kernel = params["language_model"]["lm_head"]["kernel"]  # [V, D], V maybe padded
  return cross_entropy(hidden, kernel, labels, cfg.text.vocab_size, chunk_size=chunk_size)


# The training objectives: name -> loss function.
OBJECTIVES: dict[str, Callable[..., TokenLoss]] = {"next_token": loss_fn, "bag_of_words": bag_of_words_loss,
                                                   "region_words": region_words_loss}


def objective_loss(objective: str) -> Callable[..., TokenLoss]:
  """The loss function of a training objective, a name in OBJECTIVES; each takes (params, batch, module, *,
  chunk_size, frozen_towers) and returns a TokenLoss."""
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r} is not one of {tuple(OBJECTIVES)}")
  return OBJECTIVES[objective]


def towers_frozen(mask: Any) -> bool:
  """Whether no param of SigLIP or SAM is trained, given a trainable_mask."""
  return not any(any(jax.tree.leaves(mask[t])) for t in TOWERS if t in mask)


def _split(params: Any, mask: Any) -> tuple[list, list, Callable[[list, list], Any]]:
  """params -> (trained leaves, frozen leaves, merge(trained, frozen) -> params)."""
  leaves, treedef = jax.tree.flatten(params)
  flags = treedef.flatten_up_to(mask)
  trained = [x for x, m in zip(leaves, flags) if m]
  frozen = [x for x, m in zip(leaves, flags) if not m]

  def merge(trained: list, frozen: list) -> Any:
    t, f = iter(trained), iter(frozen)
    return treedef.unflatten([next(t) if m else next(f) for m in flags])

  return trained, frozen, merge


def loss_and_grads(params: Any, batch: Batch, module: DeepseekVL, mask: Any = None, *, microbatches: int = 1,
                   chunk_size: int | None = 512, frozen_towers: bool | None = None,
                   objective: str = "next_token") -> tuple[TokenLoss, Any]:
  """The batch's TokenLoss and the gradient of its mean loss (sum / count over the whole batch).

  Args:
    params: the model's params.
    batch: a Batch of B rows.
    module: the DeepseekVL module.
    mask: a tree of Python bools shaped like params (trainable_mask; static, not traced: close over it under
      jit): gradients are computed for the True ones only; the others get zeros, and cost nothing. None: all.
    microbatches: M; the batch is run as M microbatches of B / M rows in a lax.scan, their summed losses'
      gradients added, then divided once by the whole batch's count.
    chunk_size: as `loss_fn`.
    frozen_towers: as `loss_fn`; None: True exactly when the mask trains no SigLIP or SAM param.
    objective: the loss, a name in OBJECTIVES: "next_token" (`loss_fn`), "bag_of_words" or "region_words"
      (vision pretraining: bag_of_words.py, region_words.py).
  Returns:
    (TokenLoss of the whole batch, gradients shaped like params, float32 for float32 params).
  """
  mask = jax.tree.map(lambda _: True, params) if mask is None else mask
  frozen_towers = towers_frozen(mask) if frozen_towers is None else frozen_towers
  trained, frozen, merge = _split(params, mask)
  loss_of = objective_loss(objective)

  def summed(trained: list, mb: Batch) -> tuple[jax.Array, jax.Array]:
    out = loss_of(merge(trained, frozen), mb, module, chunk_size=chunk_size, frozen_towers=frozen_towers)
    return out.sum, out.count

  grad_fn = jax.value_and_grad(summed, has_aux=True)
  if microbatches == 1:
    split_microbatches(batch, 1)  # validates
    (total, count), grads = grad_fn(trained, batch)
  else:
    def body(carry, mb):
      total, count, grads = carry
      mb = jax.tree.map(lambda x: sharding.constrain(x, ("batch",)), mb)  # each device: its own rows
      (s, c), g = grad_fn(trained, mb)
      return (total + s, count + c, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, trained)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zeros)
    (total, count, grads), _ = lax.scan(body, init, split_microbatches(batch, microbatches))
  loss = TokenLoss(sum=total, count=count)
  scale = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
  grads = [g * scale.astype(g.dtype) for g in grads]
  return loss, merge(grads, [jnp.zeros_like(x) for x in frozen])


def train_step(state: TrainState, batch: Batch, *, module: DeepseekVL, optimizer: OptimizerConfig,
               microbatches: int = 1, chunk_size: int | None = 512,
               objective: str = "next_token") -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `batch`: gradients of the trained params (accumulated over microbatches), then the
  optimizer's clip and AdamW. Frozen params are returned untouched (the very same arrays).

  Args:
    state: the TrainState.
    batch: a Batch of B rows, B a multiple of microbatches.
    module: the DeepseekVL module.
    optimizer: the OptimizerConfig the state was made with (init_train_state).
    microbatches: gradient accumulation steps within this step.
    chunk_size: positions per chunk of the loss's logits.
    objective: the loss (OBJECTIVES).
  Returns:
    (the next TrainState, metrics): loss float32 [] (the batch's mean), tokens int32 [] (supervised tokens),
    grad_norm float32 [] (global norm of the trained params' gradients, before clipping), learning_rate
    float32 [] (the base lr of this step, before any group's multiplier).
  """
  mask = trainable_mask(state.params, optimizer)
  loss, grads = loss_and_grads(state.params, batch, module, mask, microbatches=microbatches, chunk_size=chunk_size,
                               objective=objective)
  tx = make_optimizer(optimizer, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  trained, frozen, merge = _split(state.params, mask)
  new_trained = [p + u.astype(p.dtype) for p, u in zip(trained, _split(updates, mask)[0])]
  metrics = {
      "loss": loss.mean,
      "tokens": loss.count,
      "grad_norm": optax.global_norm(_split(grads, mask)[0]),
      "learning_rate": jnp.asarray(optimizer.learning_rate_fn()(state.step), jnp.float32),
  }
  return TrainState(step=state.step + 1, params=merge(new_trained, frozen), opt_state=opt_state), metrics


def jit_train_step(module: DeepseekVL, optimizer: OptimizerConfig, *, microbatches: int = 1,
                   chunk_size: int | None = 512, plan: ShardingPlan | None = None,
                   objective: str = "next_token") -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`train_step` for this module and optimizer, jitted, the state donated (its buffers are reused).

  With a plan, the step runs over its mesh: the state in and out laid out as `abstract_train_state(config, plan,
  optimizer)` (build it with `init_train_state(params, optimizer, like=...)`), the batch's rows split over the
  batch axes (`place_batch(plan, batch, microbatches=...)`), the model's activations constrained by the plan's
  rules; the metrics replicated. `module` must hold the vocabulary as the plan pads it (`Model(..., plan=plan)
  .module`).
  """
  objective_loss(objective)  # a bad name fails here, not inside the trace
  step = functools.partial(train_step, module=module, optimizer=optimizer, microbatches=microbatches,
                           chunk_size=chunk_size, objective=objective)
  if plan is None:
    return jax.jit(step, donate_argnums=0)
  vocab = module.config.text.vocab_size
  rows, want = module.padded_vocab_size or vocab, plan.padded_vocab_size(vocab)
  if rows != want:
    raise ValueError(f"The module holds {rows} vocabulary rows; under {plan} the model holds {want} (the vocabulary "
                     f"padded to divide over its shards). Use the module of `Model(config, params, plan=plan)`, "
                     f"or DeepseekVL(config, padded_vocab_size={want if want != vocab else None}).")
  state = shardings_of(abstract_train_state(module.config, plan, optimizer))
  replicated = NamedSharding(plan.mesh, PartitionSpec())
  return plan.jit(step, in_shardings=(state, batch_sharding(plan)), out_shardings=(state, replicated),
                  donate_argnums=0)
