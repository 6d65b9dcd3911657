"""ShardingPlan: a mesh and the rules that lay the model onto it: the shardings of params, optimizer states and
activations (the batch placement is placement.py's)."""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dvl_jax.sharding import activations
from dvl_jax.sharding.mesh import MESH_AXES, MeshSpec, default_strategy, make_mesh, mesh_size
from dvl_jax.sharding.placement import BatchPlacement
from dvl_jax.sharding.rules import (LOGICAL_AXES, PADDED_BY_CALLER, TOWERS, VOCAB_AXES, Rules, UnevenShardingWarning,
                                    check_rules)


class ShardingPlan(BatchPlacement):
  """A mesh and the rules that lay the model onto it: param shardings, activation constraints, placement.

  Args:
    mesh: a jax Mesh with axes ("data", "fsdp", "tensor"), or a MeshSpec / "data=2,tensor=2" / dict to build
      one over all devices; default every device on `data`.
    strategy: the decoder's strategy (see the module docstring) or a rules table; default the one that uses
      every mesh axis of size > 1.
    vision_strategy: the image towers' and aligner's; default the decoder's.
  """

  def __init__(self, mesh: Mesh | MeshSpec | str | Mapping[str, int] | None = None, strategy: str | Rules | None = None,
               vision_strategy: str | Rules | None = None):
    if not isinstance(mesh, Mesh):
      mesh = make_mesh(mesh)
    if tuple(mesh.axis_names) != MESH_AXES:
      raise ValueError(f"The mesh has axes {tuple(mesh.axis_names)}; dvl_jax lays models on {MESH_AXES} (use "
                       "dvl_jax.sharding.make_mesh, with size 1 for an axis you do not use).")
    self.mesh = mesh
    strategy = default_strategy(mesh) if strategy is None else strategy
    self.strategy, self.vision_strategy = strategy, strategy if vision_strategy is None else vision_strategy
    self.rules = {"text": check_rules(self.strategy, "strategy"),
                  "vision": check_rules(self.vision_strategy, "vision_strategy")}
    used = {a for axes in self.rules["text"].values() for a in axes}
    idle = [f"{a}={n}" for a, n in mesh.shape.items() if n > 1 and a not in used]
    if idle:
      raise ValueError(f"Strategy {strategy!r} leaves mesh axis {', '.join(idle)} unused: its devices would all do "
                       f"the same work. Choose a strategy that uses it ({default_strategy(mesh)!r}) or make it 1.")
    batch = self.rules["text"].get("batch", ())
    self.batch_shards = math.prod(mesh.shape[a] for a in batch)
    # How many batch slices this process's devices hold: each process feeds that many (equal) parts of rows.
    index = NamedSharding(mesh, PartitionSpec(batch or None)).addressable_devices_indices_map((self.batch_shards,))
    self.local_batch_shards = len({idx[0].start for idx in index.values()})
    self._warned: set[tuple] = set()

  @classmethod
  def single_device(cls, device: jax.Device | None = None) -> ShardingPlan:
    """Everything on one device (default the first local one)."""
    return cls(make_mesh(MeshSpec(data=1), [device or jax.local_devices()[0]]))

  def __repr__(self):
    mesh = ", ".join(f"{a}={n}" for a, n in self.mesh.shape.items())
    return f"ShardingPlan(mesh=({mesh}), strategy={self.strategy!r}, vision_strategy={self.vision_strategy!r})"

  # ----- logical axes -> shardings -----
  def shards(self, name: str, tower: str = "text") -> int:
    """How many parts the `tower` rules split logical axis `name` into (1: replicated)."""
    return mesh_size(self.mesh, self.rules[tower].get(name, ()))

  def padded_vocab_size(self, vocab_size: int) -> int:
    """The rows the model holds its vocabulary in under this plan: `vocab_size` rounded up to a multiple of the
    shards of the vocab axes (params' "vocab", logits' "act_vocab"); `vocab_size` itself when they divide it.

    Ids from `vocab_size` on are padding: zero rows of the embedding and lm_head whose logits the decoder masks
    (nn/llama.py), so they are never sampled nor in a loss, and `Model` cuts them from every logits output.
    Checkpoints and configs keep the real size. No other axis is padded: `spec` replicates a dimension that
    does not divide.
    """
    n = math.lcm(*(self.shards(name) for name in VOCAB_AXES))
    return -(-vocab_size // n) * n

  def spec(self, axes: Sequence[str | None], shape: Sequence[int] | None = None, tower: str = "text",
           what: str = "an array") -> PartitionSpec:
    """The PartitionSpec of logical `axes`. With `shape`, a dimension that does not divide over its mesh axes is
    replicated instead, with an UnevenShardingWarning (once per plan and dimension); the batch is refused."""
    rules, out, owner = self.rules[tower], [], {}
    for i, name in enumerate(axes):
      if name is not None and name not in LOGICAL_AXES:
        raise ValueError(f"{what} names logical axis {name!r}, which no rule knows; add it to "
                         "dvl_jax.sharding.LOGICAL_AXES (and to the strategies that shard it).")
      mesh_axes = rules.get(name, ()) if name else ()
      n = mesh_size(self.mesh, mesh_axes)
      if shape is not None and shape[i] % n:
        problem = (f"{what} has shape {tuple(shape)}: dimension {i} ({name!r}, size {shape[i]}) does not divide "
                   f"over mesh axes {'x'.join(mesh_axes)} of size {n}")
        if name in PADDED_BY_CALLER:
          raise ValueError(f"{problem}. Pad it to a multiple of {n} (dvl_jax.Model pads its batches so).")
        hint = ("Another vision_strategy for the image towers (e.g. 'fsdp' or 'data')" if tower == "vision" else
                "A mesh whose size on that axis divides it, or another strategy,")
        self._warn_once((what, i, name, shape[i]), f"{problem}, so that dimension is replicated: every device "
                        f"holds all of it. {hint} would split it.")
        mesh_axes = ()
      for a in mesh_axes:
        if a in owner:
          raise ValueError(f"{what}: logical axes {owner[a]!r} and {name!r} both map to mesh axis {a!r} under the "
                           f"{tower} rules; one mesh axis can shard only one dimension of an array.")
        owner[a] = name
      out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)

  def _warn_once(self, key: tuple, message: str) -> None:
    # Once per plan and dimension (an activation's other dimensions, batch or length, vary from call to call):
    # specs are recomputed at every trace, and a warnings filter set to "always" would repeat the warning.
    if key not in self._warned:
      self._warned.add(key)
      warnings.warn(message, UnevenShardingWarning, stacklevel=3)

  def unpadded(self, sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """`sharding`, made for a param padded to divide (the vocabulary's rows), for the param at its real `shape`:
    the dimensions its split does not divide are kept whole. A checkpoint's vocabulary is restored so, then
    padded (dvl_jax.model)."""
    spec = [None if axes is not None and shape[i] % mesh_size(self.mesh, axes) else axes
            for i, axes in enumerate(sharding.spec)]
    return NamedSharding(self.mesh, PartitionSpec(*spec))

  def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None, tower: str = "text",
               what: str = "an array") -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(axes, shape, tower, what))

  def param_shardings(self, boxed_params: Any) -> Any:
    """Params boxed with their logical names (`jax.eval_shape` of `module.init`) -> a tree of NamedShardings.
    A dimension that does not divide is replicated, with a warning; a ValueError lists every param whose
    rules collide (two logical axes on one mesh axis)."""
    problems = []

    def one(path, leaf):
      names = leaf.names if isinstance(leaf, nn.Partitioned) else (None,) * len(leaf.shape)
      value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
      top = getattr(path[0], "key", None)
      if top not in TOWERS:
        raise ValueError(f"Param {jax.tree_util.keystr(path)} belongs to no tower of dvl_jax.sharding.TOWERS.")
      try:
        return self.sharding(names, value.shape, TOWERS[top], f"Param {jax.tree_util.keystr(path)}")
      except ValueError as e:
        problems.append(str(e))

    shardings = jax.tree_util.tree_map_with_path(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    if problems:
      shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
      raise ValueError(f"{len(problems)} param(s) do not fit {self}:\n  {shown}")
    return shardings

  def state_shardings(self, params: Any, state: Any) -> Any:
    """The shardings of a state made from `params` (an optax state, `jax.eval_shape(tx.init, params)`): each
    array is laid out as the param it mirrors, so no device holds more of a moment than of its param.

    A leaf mirrors a param when the end of its path is that param's path (optax keeps mu, nu and the like in
    the params' tree structure) and its shape is the param's. Scalars (step counts) are replicated. Empty
    nodes (optax's MaskedNode and EmptyState for frozen params) have no leaves and stay as they are.

    Args:
      params: the params the state was made for: arrays in their shards (Model.params), ShapeDtypeStructs
        with shardings, or params boxed with their logical names (then laid out by `param_shardings`).
      state: the state, arrays or ShapeDtypeStructs.
    Returns:
      A tree of NamedShardings shaped like `state` (for jax.jit's in_shardings/out_shardings).
    Raises:
      ValueError: listing every non-scalar leaf that mirrors no param.
    """
    boxed = any(isinstance(x, nn.Partitioned) for x in
                jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    shardings = self.param_shardings(params) if boxed else jax.tree.map(lambda x: x.sharding, params)
    shapes = nn.meta.unbox(params) if boxed else params
    by_path = {}
    for (path, sharding), shape in zip(jax.tree_util.tree_leaves_with_path(shardings), jax.tree.leaves(shapes)):
      by_path[tuple(getattr(k, "key", k) for k in path)] = (tuple(shape.shape), sharding)
    replicated, problems = NamedSharding(self.mesh, PartitionSpec()), []

    def one(path, leaf):
      if not np.ndim(leaf):
        return replicated
      keys = []  # the path's trailing dict keys, the part that may be a param's path
      for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
          break
        keys.insert(0, k.key)
      for start in range(len(keys)):  # the longest suffix that names a param of this shape
        shape, sharding = by_path.get(tuple(keys[start:]), (None, None))
        if shape == tuple(np.shape(leaf)):
          return sharding
      problems.append(f"{jax.tree_util.keystr(path)} {tuple(np.shape(leaf))}")

    out = jax.tree_util.tree_map_with_path(one, state)
    if problems:
      shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
      raise ValueError(f"{len(problems)} state array(s) mirror no param (no param has their path's end and "
                       f"shape), so their sharding is unknown:\n  {shown}\nState arrays must be scalars or shaped "
                       "like the param whose path ends theirs; lay out any other explicitly.")
    return out

  # ----- activations -----
  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """Within it, `constrain` lays activations out by this plan (the decoder's rules unless in `tower`)."""
    activations.plan_stack().append((self, "text"))
    try:
      yield
    finally:
      activations.plan_stack().pop()

  def jit(self, fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """`jax.jit(fn, **jit_kwargs)` traced with this plan active: `constrain` and `per_shard` within `fn` follow
    the plan whoever calls it, with no `activate()` to remember. jit_kwargs (in_shardings, out_shardings,
    donate_argnames, static_argnames, ...) go to jax.jit as they are; `fn`'s signature names the arguments."""

    @functools.wraps(fn)  # jax.jit reads fn's signature through __wrapped__ (for static and donated names)
    def traced(*args, **kwargs):
      with self.activate():
        return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)
