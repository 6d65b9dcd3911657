"""What model code calls while a plan is active: `constrain` activations by logical axis names, switch to a
`tower`'s rules, or run a function `per_shard` on each device's own shards."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import jax

if TYPE_CHECKING:
  from dvl_jax.sharding.plan import ShardingPlan

_local = threading.local()


def plan_stack() -> list[tuple[ShardingPlan, str]]:
  if not hasattr(_local, "stack"):
    _local.stack = []
  return _local.stack


def active_plan() -> ShardingPlan | None:
  stack = plan_stack()
  return stack[-1][0] if stack else None


@contextlib.contextmanager
def tower(name: str) -> Iterator[None]:
  """Activations constrained within follow the `name` ("text" or "vision") rules of the active plan."""
  stack = plan_stack()
  if not stack:
    yield
    return
  stack.append((stack[-1][0], name))
  try:
    yield
  finally:
    stack.pop()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical axis names under the active plan; a no-op outside `plan.activate()`."""
  stack = plan_stack()
  if not stack:
    return x
  plan, which = stack[-1]
  return jax.lax.with_sharding_constraint(x, plan.sharding(axes, x.shape, which, f"Activation {tuple(axes)}"))



@contextlib.contextmanager
def _manual() -> Iterator[None]:
  """Inside a shard_map body: no plan is active (arrays there are per-device shards, not global arrays)."""
  saved, _local.stack = plan_stack(), []
  try:
    yield
  finally:
    _local.stack = saved


def per_shard(fn: Callable[..., jax.Array], in_axes: Sequence[Sequence[str | None] | None],
              out_axes: Sequence[str | None]) -> Callable[..., jax.Array]:
  """`fn` run on each device's own shards of its arguments (jax.shard_map over the active plan's mesh), the
  arguments and the result laid out by logical axis names; plain `fn` outside `plan.activate()` or on one device.

  For code that loops over an axis the plan may shard: a loop (lax.map) over a batch axis split over devices
  would have XLA gather the whole batch onto every device first; under per_shard each device loops over its own
  rows. `fn` must need nothing from other shards (no collectives are added). A None argument stays None.

  Args:
    fn: array arguments -> one array.
    in_axes: the logical axes of each argument (None for an argument that may be None).
    out_axes: the logical axes of the result.
  """

  def run(*args):
    stack = plan_stack()
    if not stack or stack[-1][0].mesh.size == 1:
      return fn(*args)
    plan, which = stack[-1]
    given = [i for i, a in enumerate(args) if a is not None]
    specs = tuple(plan.spec(in_axes[i], args[i].shape, which, f"per_shard argument {i} {tuple(in_axes[i])}")
                  for i in given)

    def body(*shards):
      full = list(args)
      for i, shard in zip(given, shards):
        full[i] = shard
      with _manual():
        return fn(*full)

    with _manual():  # the result's shape: a dimension that does not divide is replicated, as in the arguments
      out_shape = jax.eval_shape(fn, *args).shape
    out_spec = plan.spec(out_axes, out_shape, which, f"per_shard result {tuple(out_axes)}")
    return jax.shard_map(body, mesh=plan.mesh, in_specs=specs, out_specs=out_spec,
                         check_vma=False)(*(args[i] for i in given))

  return run

