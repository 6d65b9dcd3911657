"""The train state (step, params, optimizer state) and its layout over a mesh.

  state = init_train_state(params, optimizer)  # one device
  like = abstract_train_state(config, plan, optimizer)  # or over a mesh: shapes and shardings
  state = init_train_state(Model(config, params, plan=plan).params, optimizer, like)

Under a plan each optimizer moment lives in the shards of the param it mirrors (ShardingPlan.state_shardings):
fsdp and tensor plans split the AdamW moments as they split the params, so no device holds a whole moment.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from dvl_jax.config import ModelConfig
from dvl_jax.model import abstract_params
from dvl_jax.sharding import ShardingPlan
from dvl_jax.training.optimizer import OptimizerConfig, make_optimizer


@flax.struct.dataclass
class TrainState:
  """Everything a step changes, passed in and returned.

  Attributes:
    step: int32 [], optimizer steps taken (the learning-rate schedule's position).
    params: the model's params, float32 master weights.
    opt_state: the optimizer's state (moments of the trained params only).
  """

  step: jax.Array
  params: Any
  opt_state: Any


def abstract_train_state(config: ModelConfig, plan: ShardingPlan, optimizer: OptimizerConfig) -> TrainState:
  """The TrainState's arrays under `plan` as ShapeDtypeStructs carrying their shardings, with no memory
  allocated: the params as a `Model` under that plan holds them (the vocabulary padded as the plan pads it),
  the optimizer state laid out as the params it mirrors, the step replicated. For `init_train_state`, for
  jax.jit's shardings (`jax.tree.map(lambda x: x.sharding, state)`) and as a restore target."""
  params = abstract_params(config, plan, padded=True)
  opt_state = jax.eval_shape(make_optimizer(optimizer, params).init, params)
  opt_shardings = plan.state_shardings(params, opt_state)
  return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(plan.mesh, PartitionSpec())),
      params=params,
      opt_state=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state,
                             opt_shardings))


def shardings_of(tree: Any) -> Any:
  """The `.sharding` of every leaf (of an abstract_train_state, or of arrays)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def _check_shapes(params: Any, like: Any) -> None:
  problems = []
  for (path, x), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(like)):
    if tuple(x.shape) != tuple(want.shape):
      problems.append(f"{jax.tree_util.keystr(path)}: {tuple(x.shape)}, the plan's layout wants {want.shape}")
  if problems:
    raise ValueError(f"{len(problems)} param(s) are not at the shapes of the plan's layout:\n  " +
                     "\n  ".join(problems[:8]) + "\nParams at the checkpoint's shapes go through "
                     "`Model(config, params, plan=plan).params` first (it pads the vocabulary as the plan needs).")


def _committed(x: Any) -> bool:
  """Whether x is an array committed to its devices; False for anything else (a tracer, under jit, included)."""
  try:
    return isinstance(x, jax.Array) and x.committed
  except jax.errors.ConcretizationTypeError:  # a traced array has no placement yet
    return False


def _on_params_device(state: TrainState) -> TrainState:
  """The whole state on its params' one device, every array with the same replicated sharding.

  Params from a `Model` are committed to its one-device mesh with specs like P(None, None), while a jitted
  step returns every array as P() and the step count, made here, is uncommitted: the second step's inputs would
  differ from the first's in sharding, and the step would compile twice (a minute at 1.3B). Params laid out
  over several devices are left as they are (`init_train_state(..., like=...)` handles those)."""
  leaf = next((x for x in jax.tree.leaves(state.params) if _committed(x)), None)
  if leaf is None or len(leaf.sharding.device_set) > 1:
    return state
  sharding = leaf.sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, PartitionSpec())
  return jax.device_put(state, sharding)


def init_train_state(params: Any, optimizer: OptimizerConfig, like: TrainState | None = None) -> TrainState:
  """Step 0, `params` as given (keep them float32), and the optimizer's fresh state.

  Args:
    params: the model's params; with `like`, at the shapes a `Model` under the plan holds (Model.params).
    optimizer: the OptimizerConfig of the steps to come.
    like: `abstract_train_state(config, plan, optimizer)`: the params are put into their shards (nothing moves
      if they are there already) and the optimizer state is created in its own, never whole on one device.
  """
  tx = make_optimizer(optimizer, params)
  if like is None:
    return _on_params_device(TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                             opt_state=tx.init(params)))
  if jax.tree.structure(params) != jax.tree.structure(like.params):
    raise ValueError("The params' tree is not the model's under this plan (abstract_train_state's): did they come "
                     "from another config?")
  _check_shapes(params, like.params)
  params = jax.device_put(params, shardings_of(like.params))
  opt_state = jax.jit(tx.init, out_shardings=shardings_of(like.opt_state))(params)
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), like.step.sharding), params=params,
                    opt_state=opt_state)
