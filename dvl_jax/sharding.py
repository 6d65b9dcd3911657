"""Sharding over a named device mesh: the mesh, the logical-axis rules of each strategy, and data placement.

Model code names only logical axes: params through `nn.with_logical_partitioning` (nn/layers.py) and
activations through `constrain` below. This file maps them onto the three mesh axes and is the only one that
talks to mesh APIs.

  mesh axes   data (replicas), fsdp (params sharded, batch split), tensor (heads, mlp and vocab split)
  strategies  "data"         batch over data x fsdp; params replicated
              "fsdp"         + every param's `embed` axis over fsdp (ZeRO-3: XLA gathers a layer's weights
                             just before they are used)
              "tensor"       + heads, kv heads, mlp and vocab over tensor (Megatron: one all-reduce after the
                             attention output and after the MLP down projection)
              "fsdp_tensor"  both
The image towers (SigLIP, SAM and the aligner) can use another strategy than the decoder (`vision_strategy`):
SAM-B's 12 heads, for one, do not split 8 ways.

Dimensions that do not divide over their mesh axes: the vocabulary is padded (`ShardingPlan.padded_vocab_size`,
as vLLM and MaxText pad it to a multiple of the tensor size); any other such dimension is replicated, with an
`UnevenShardingWarning` that names it; a batch that does not divide is refused (the model pads its batches).

  plan = ShardingPlan(MeshSpec(data=2, fsdp=2, tensor=2))  # or "data=2,fsdp=2,tensor=2", or a jax Mesh
  model = dvl_jax.load(path, mesh=plan)                    # params restored straight into their shards
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
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


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """Sizes of the mesh axes; one of them may be -1: it takes the devices the others leave (as MaxText)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  @classmethod
  def parse(cls, spec: str | Mapping[str, int] | MeshSpec) -> MeshSpec:
    """"data=2,fsdp=-1" or {"data": 2, "fsdp": -1} -> MeshSpec; axes not named are 1 (data -1 if none is -1)."""
    if isinstance(spec, MeshSpec):
      return spec
    if isinstance(spec, str):
      items = {}
      for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        try:
          items[key.strip()] = int(value)
        except ValueError:
          raise ValueError(f"Mesh spec {spec!r}: {part!r} is not axis=size (e.g. 'data=2,fsdp=-1,tensor=2').") from None
        if not eq:
          raise ValueError(f"Mesh spec {spec!r}: {part!r} is not axis=size (e.g. 'data=2,fsdp=-1,tensor=2').")
      spec = items
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
      raise ValueError(f"Mesh spec names unknown axes {unknown}; the mesh axes are {list(MESH_AXES)}.")
    sizes = {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
    if "data" not in spec and -1 not in sizes.values():
      sizes["data"] = -1
    return cls(**sizes)

  def sizes(self, num_devices: int) -> tuple[int, int, int]:
    """The axis sizes on `num_devices` devices, -1 resolved; a ValueError says why they do not fit."""
    sizes = (self.data, self.fsdp, self.tensor)
    text = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
      raise ValueError(f"Mesh {text}: sizes must be positive, with at most one -1 (fill); got {sizes}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"Mesh {text}: the fixed axes take {known} devices, which does not divide the "
                         f"{num_devices} devices available; choose sizes whose product divides {num_devices}.")
      sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    elif known != num_devices:
      raise ValueError(f"Mesh {text} needs {known} devices, but {num_devices} are available; make the product "
                       f"{num_devices}, or set one axis to -1 to take the rest.")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | MeshSpec | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: every device of every process).

  Devices keep jax's order (process by process), so the data and fsdp axes split across hosts and the tensor
  axis, last, stays within one: its all-reduces never cross the slower network between hosts.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = MeshSpec.parse(spec if spec is not None else MeshSpec()).sizes(len(devices))
  return Mesh(np.array(devices, dtype=object).reshape(sizes), MESH_AXES)


def default_strategy(mesh: Mesh) -> str:
  """The strategy that uses every axis of size > 1: fsdp_tensor, tensor, fsdp, or data."""
  fsdp, tensor = mesh.shape["fsdp"] > 1, mesh.shape["tensor"] > 1
  return "fsdp_tensor" if fsdp and tensor else "tensor" if tensor else "fsdp" if fsdp else "data"


def _rules(strategy: str | Rules, role: str) -> dict[str, tuple[str, ...]]:
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


class ShardingPlan:
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
    self.rules = {"text": _rules(self.strategy, "strategy"), "vision": _rules(self.vision_strategy, "vision_strategy")}
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
    return _size(self.mesh, self.rules[tower].get(name, ()))

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
      n = _size(self.mesh, mesh_axes)
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
    spec = [None if axes is not None and shape[i] % _size(self.mesh, axes) else axes
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
    _stack().append((self, "text"))
    try:
      yield
    finally:
      _stack().pop()

  def jit(self, fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """`jax.jit(fn, **jit_kwargs)` traced with this plan active: `constrain` and `per_shard` within `fn` follow
    the plan whoever calls it, with no `activate()` to remember. jit_kwargs (in_shardings, out_shardings,
    donate_argnames, static_argnames, ...) go to jax.jit as they are; `fn`'s signature names the arguments."""

    @functools.wraps(fn)  # jax.jit reads fn's signature through __wrapped__ (for static and donated names)
    def traced(*args, **kwargs):
      with self.activate():
        return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)

  # ----- data placement -----
  @property
  def multi_process(self) -> bool:
    """Whether the mesh spans devices of more than one process."""
    return len({d.process_index for d in self.mesh.devices.flat}) > 1

  def agree_max(self, sizes: Sequence[int]) -> tuple[int, ...]:
    """The elementwise maximum of `sizes` over the mesh's processes (`sizes` itself in one process), so every
    process pads its inputs to the same shapes and runs the same program. Every process must call it."""
    if not self.multi_process:
      return tuple(int(s) for s in sizes)
    from jax.experimental import multihost_utils

    everyone = multihost_utils.process_allgather(np.asarray(sizes, np.int64))  # [processes, len(sizes)]
    return tuple(int(s) for s in np.max(everyone.reshape(-1, len(sizes)), axis=0))

  def batch_multiple(self) -> int:
    """The row count of each process's batch must be a multiple of this."""
    return self.local_batch_shards

  def agree_batch(self, rows: int, *sizes: int) -> tuple[int, ...]:
    """(rows, *sizes) agreed over the processes (`agree_max`, one exchange), `rows` then rounded up to a multiple
    of `batch_multiple()`: the rows every process feeds `place`, and any other sizes its inputs are padded to
    (prompt length, image slots). Every process must call it."""
    rows, *sizes = self.agree_max((rows, *sizes))
    m = self.batch_multiple()
    return (-(-rows // m) * m, *sizes)

  def place(self, arrays: Mapping[str, Any], axes: Mapping[str, Sequence[str | None]] | None = None, *,
            rows: int | None = None, fill: Mapping[str, Any] | None = None) -> dict[str, jax.Array | None]:
    """This process's host rows -> global arrays laid out by the plan: the batch placement of generate and
    training. Every process must call it together (unless `rows` is given).

    Each array's axis 0 is the batch, with the same rows in each. Rows are padded to `rows` (default: the most
    rows of any process, rounded up to a multiple of the batch shards; `agree_batch`) with copies of the last
    row, whose outputs the caller drops; `fill` pads the named arrays with a value instead (a loss mask with 0,
    so padded rows add nothing to a loss). With several processes, the global batch is every process's rows,
    process by process (`put_batch`); slice a result's rows back with `local_rows`.

    Args:
      arrays: name -> array [B, ...] (numpy or anything np.asarray takes); None stays None.
      axes: name -> the logical axes of that array's leading dimensions (the rest replicated); default
        ("batch", "seq") for 2-d arrays, ("batch",) otherwise.
      rows: the padded row count, already agreed over the processes (e.g. by `agree_batch`).
      fill: name -> the value of that array's padding rows.
    Returns:
      name -> a jax.Array with `rows` * (processes feeding different rows) rows, or None.
    """
    arrays = {k: None if v is None else np.asarray(v) for k, v in arrays.items()}
    counts = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items() if v is not None}
    if len(set(counts.values())) > 1 or None in counts.values():
      raise ValueError(f"place: every array's axis 0 must be the batch, the same rows in each; got "
                       f"{ {k: arrays[k].shape for k in counts} }.")
    b = next(iter(counts.values()), 0)
    rows = self.agree_batch(b)[0] if rows is None else rows
    if rows < b or rows % self.batch_multiple():
      raise ValueError(f"place: {b} rows cannot be padded to rows={rows}; it must be at least {b} and a multiple "
                       f"of {self.batch_multiple()} (the batch shards of this process under {self}); "
                       "agree_batch gives it.")
    axes, fill = dict(axes or {}), dict(fill or {})
    unknown = sorted((set(axes) | set(fill)) - set(arrays))
    if unknown:
      raise ValueError(f"place: axes or fill name {unknown}, which are not among the arrays {sorted(arrays)}.")
    out = {}
    for name, x in arrays.items():
      if x is None:
        out[name] = None
        continue
      if rows > b:
        if not b and name not in fill:
          raise ValueError(f"place: {name!r} has no rows to copy into {rows} padding rows; give fill={{{name!r}: "
                           "value}} or at least one row.")
        pad = (np.full((rows - b, *x.shape[1:]), fill[name], x.dtype) if name in fill else
               np.repeat(x[-1:], rows - b, axis=0))
        x = np.concatenate([x, pad])
      out[name] = self.put_batch(x, axes.get(name, ("batch", "seq") if x.ndim == 2 else ("batch",)))
    return out

  def put_batch(self, local: np.ndarray, axes: Sequence[str | None] = ("batch",)) -> jax.Array:
    """This process's rows -> one global array, batch (axis 0) split over the batch axes.

    With several processes, the global batch is every process's rows, process by process (of the processes
    that hold different batch slices; processes that replicate one slice must feed the same rows)."""
    local = np.asarray(local)
    axes = tuple(axes) + (None,) * (local.ndim - len(axes))
    groups = self.batch_shards // self.local_batch_shards
    global_shape = (local.shape[0] * groups, *local.shape[1:])
    sharding = self.sharding(axes, global_shape, what=f"A batch of {local.shape[0]} rows per process")
    return jax.make_array_from_process_local_data(sharding, local, global_shape)

  def local_rows(self, array: jax.Array) -> np.ndarray:
    """This process's rows of a global array whose axis 0 is the batch, as numpy, in row order."""
    # Gathered first over every other axis (the logits' vocab may be split over tensor, across processes too).
    spec = self.spec(("batch",) + (None,) * (array.ndim - 1), array.shape, what="An output")
    array = _reshard(NamedSharding(self.mesh, spec))(array)
    parts = {}
    for shard in array.addressable_shards:
      start = (shard.index[0].start or 0) if shard.index else 0
      parts.setdefault(start, shard)
    return np.concatenate([np.asarray(parts[s].data) for s in sorted(parts)], axis=0)


def _size(mesh: Mesh, axes: str | Sequence[str]) -> int:
  """The number of devices along mesh axes `axes` (a name, or names; 1 for none)."""
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


@functools.lru_cache(maxsize=64)
def _reshard(sharding: NamedSharding):
  """A jitted identity whose output has `sharding` (one per sharding, so it compiles once per shape)."""
  return jax.jit(lambda x: x, out_shardings=sharding)


_local = threading.local()


def _stack() -> list[tuple[ShardingPlan, str]]:
  if not hasattr(_local, "stack"):
    _local.stack = []
  return _local.stack


def active_plan() -> ShardingPlan | None:
  stack = _stack()
  return stack[-1][0] if stack else None


@contextlib.contextmanager
def tower(name: str) -> Iterator[None]:
  """Activations constrained within follow the `name` ("text" or "vision") rules of the active plan."""
  stack = _stack()
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
  stack = _stack()
  if not stack:
    return x
  plan, which = stack[-1]
  return jax.lax.with_sharding_constraint(x, plan.sharding(axes, x.shape, which, f"Activation {tuple(axes)}"))



@contextlib.contextmanager
def _manual() -> Iterator[None]:
  """Inside a shard_map body: no plan is active (arrays there are per-device shards, not global arrays)."""
  saved, _local.stack = _stack(), []
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
    stack = _stack()
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
