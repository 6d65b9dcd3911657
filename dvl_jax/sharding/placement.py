"""Batch placement: each process's host rows -> global arrays split over the batch axes, and back.

`BatchPlacement` holds ShardingPlan's placement methods (ShardingPlan inherits them); they use the plan's
`mesh`, `batch_shards`, `local_batch_shards`, `spec` and `sharding`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding


class BatchPlacement:
  """ShardingPlan's data placement (see ShardingPlan)."""

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



@functools.lru_cache(maxsize=64)
def _reshard(sharding: NamedSharding):
  """A jitted identity whose output has `sharding` (one per sharding, so it compiles once per shape)."""
  return jax.jit(lambda x: x, out_shardings=sharding)
