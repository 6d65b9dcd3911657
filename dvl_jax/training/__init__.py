"""Training: the loss (loss.py), the optimizer with freezing by stage (optimizer.py) and its learning-rate
schedules (schedules.py), the train state (state.py), batches (batch.py) and the train step (step.py).

  hidden = module.apply({"params": params}, ids, mask, positions, pixels, method=DeepseekVL.hidden_states)
  labels = make_labels(ids, mask, config.image_token_id, loss_mask)  # -100: not a target
  out = cross_entropy(hidden, params["language_model"]["lm_head"]["kernel"], labels, config.text.vocab_size)
  loss = out.mean  # or, over microbatches and devices: sum(out.sum) / sum(out.count)

  optimizer = make_optimizer(paper_config("S2", total_steps=10_000), params)  # frozen params: no state

  config = paper_config("S2", total_steps=10_000)  # the train step (step.py): grads of the trained params only
  state = init_train_state(params, config)
  state, metrics = jit_train_step(module, config, microbatches=4)(state, Batch(ids, mask, pixel_values=pixels))

Objectives (step.py OBJECTIVES, train.objective in an experiment): "next_token" (the above) and "bag_of_words",
vision pretraining that predicts each sample's answer words from its images alone (bag_of_words.py).

Over a mesh: the state in its shards (state.py: abstract_train_state), the batch placed (batch.py: place_batch),
`jit_train_step(..., plan=plan)`.
"""

from dvl_jax.training import schedules
from dvl_jax.training.batch import Batch, place_batch, split_microbatches
from dvl_jax.training.flops import StepFlops, TrainedParts, hlo_matmul_flops, train_step_flops
from dvl_jax.training.loss import (IGNORE, TokenLoss, cross_entropy, cross_entropy_plain, make_labels,
                                   next_token_targets)
from dvl_jax.training.optimizer import (STAGES, OptimizerConfig, make_optimizer, paper_config, param_labels,
                                        trainable_mask)
from dvl_jax.training.state import TrainState, abstract_train_state, init_train_state
from dvl_jax.training.step import OBJECTIVES, jit_train_step, loss_and_grads, loss_fn, objective_loss, train_step

__all__ = ["IGNORE", "OBJECTIVES", "STAGES", "Batch", "OptimizerConfig", "StepFlops", "TokenLoss", "TrainState", "TrainedParts",
           "abstract_train_state", "hlo_matmul_flops", "train_step_flops",
           "cross_entropy", "cross_entropy_plain", "init_train_state", "jit_train_step", "loss_and_grads", "loss_fn",
           "make_labels", "objective_loss", "make_optimizer", "next_token_targets", "paper_config", "param_labels", "place_batch",
           "schedules", "split_microbatches", "train_step", "trainable_mask"]
