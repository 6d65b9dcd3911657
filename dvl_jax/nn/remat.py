"""Rematerialisation (activation checkpointing) of repeated blocks, chosen by a policy name.

A training config names a policy; each tower wraps its block class (a decoder layer, a vision block) once,
so the backward pass recomputes the block's activations instead of storing them. Remat changes what is kept
between the forward and the backward pass, never the params (same names, same tree) nor the values.

The names follow MaxText's `remat_policy` (configs/base.yml), a small subset of it:
  "none":      no remat; the block class is returned unchanged, so the forward is exactly the plain one.
  "full":      save nothing inside a block, recompute it all (MaxText "full": jax.checkpoint's default,
               nothing_saveable). Least memory, about one more forward of compute.
  "save_dots": save the outputs of matmuls without batch dimensions (the projections and MLP matmuls),
               recompute the rest: norms, activations, and attention's batched q.k / probs.v, whose
               [B, N, T, S] outputs are what grows with the sequence (MaxText's original "minimal":
               jax.checkpoint_policies.dots_with_no_batch_dims_saveable; MaxText now names the projections
               with checkpoint_name instead, which this code does not tag).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(name: str) -> str:
  """Returns `name` if it is a known policy; else raises a ValueError that lists the known ones."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {name!r}; expected one of {sorted(REMAT_POLICIES)}.")
  return name


def remat(block: type[nn.Module], policy: str, *, static_argnums: Sequence[int] = (),
          prevent_cse: bool = True) -> type[nn.Module]:
  """`block` wrapped in nn.remat with the named policy; `block` itself for "none".

  Args:
    block: a Linen module class whose `__call__` is checkpointed; its params keep their names and nesting.
    policy: a name in REMAT_POLICIES.
    static_argnums: the positions of `__call__`'s Python-valued arguments (bools, ints), counting `self` as 0
      as nn.remat does; arrays and pytrees (None included) need none.
    prevent_cse: False inside nn.scan, where XLA cannot merge the recomputation away (jax.checkpoint docs),
      and the barriers it adds only cost.
  """
  check_remat_policy(policy)
  if policy == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[policy], static_argnums=tuple(static_argnums),
                  prevent_cse=prevent_cse)
