"""The logical axis names the model uses, and the rules that map them onto mesh axes, per strategy."""

from __future__ import annotations

from typing import Mapping

from dvl_jax.sharding.mesh import MESH_AXES

BATCH_AXES = ("data", "fsdp")

# Every logical axis name the model uses. A name missing here is a bug in the model code, not a choice to
# replicate: `ShardingPlan` refuses it.
PARAM_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "conv_in", "patches", "layers")
ACTIVATION_AXES = ("batch", "seq", "act_embed", "act_mlp", "act_heads", "act_kv_heads", "act_vocab", "cache_seq")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES
# The vocabulary's axes (the embedding's and lm_head's rows, the logits): padded rather than replicated.
VOCAB_AXES = ("vocab", "act_vocab")
# Axes that are never replicated in place of a split that does not divide: callers pad them.
PADDED_BY_CALLER = ("batch",)

Rules = Mapping[str, str | tuple[str, ...] | None]  # logical axis -> mesh axis, axes, or None (replicated)

_DATA: Rules = {"batch": BATCH_AXES}
_FSDP: Rules = {"embed": "fsdp"}
_TENSOR: Rules = {name: "tensor" for name in ("heads", "kv_heads", "mlp", "vocab", "act_heads", "act_kv_heads",
                                              "act_mlp", "act_vocab")}
STRATEGIES: dict[str, Rules] = {
    "data": _DATA,
    "fsdp": {**_DATA, **_FSDP},
    "tensor": {**_DATA, **_TENSOR},
    "fsdp_tensor": {**_DATA, **_FSDP, **_TENSOR},
}

# Which rules a top-level param collection (a module of DeepseekVL) follows.
TOWERS = {"language_model": "text", "vision_model": "vision", "high_res_vision_model": "vision", "aligner": "vision"}

def check_rules(strategy: str | Rules, role: str) -> dict[str, tuple[str, ...]]:
  """A strategy name or a custom table -> {logical axis: mesh axes} with every name checked."""
  if isinstance(strategy, str):
    if strategy not in STRATEGIES:
      raise ValueError(f"Unknown {role} {strategy!r}; choose one of {sorted(STRATEGIES)} or pass a rules table "
                       "{logical axis: mesh axis}.")
    strategy = STRATEGIES[strategy]
  rules = {}
  for name, axes in strategy.items():
    if name not in LOGICAL_AXES:
      raise ValueError(f"The {role} rules name logical axis {name!r}, which the model does not use; the logical "
                       f"axes are {list(LOGICAL_AXES)}.")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"The {role} rules map {name!r} to {bad}, which are not mesh axes; the mesh axes are "
                       f"{list(MESH_AXES)}.")
    rules[name] = axes
  return rules


class UnevenShardingWarning(UserWarning):
  """A dimension does not divide over its mesh axes and is replicated instead: it works, using more memory."""

