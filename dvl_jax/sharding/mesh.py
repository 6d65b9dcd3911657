"""The device mesh: three named axes, their sizes, and the devices in order."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")


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



def mesh_size(mesh: Mesh, axes: str | Sequence[str]) -> int:
  """The number of devices along mesh axes `axes` (a name, or names; 1 for none)."""
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
