"""Joining a multi-process (multi-host) run: one JAX process per host (or per GPU), one global device mesh.

  dvl_jax.distributed.initialize()           # before anything else touches jax's devices
  model = dvl_jax.load(path, mesh="fsdp=-1")  # a mesh over every device of every process

Where the run's shape comes from, first found wins:
  1. the arguments of `initialize`;
  2. the environment: JAX_COORDINATOR_ADDRESS ("host:port" of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  3. a cluster that JAX detects itself: Cloud TPU pod slices, SLURM (srun), Open MPI (mpirun), Kubernetes.
With none of them this is a single process and `initialize` does nothing.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime if this process is one of several. Returns whether it is.

  Call it first, before anything uses jax's devices: it also selects the gloo collectives for CPU devices
  (processes on CPU then all-reduce over TCP; GPUs and TPUs use their own interconnect), which JAX reads when
  it starts its CPU backend.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = _env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
  process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
  if num_processes == 1:
    return False
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except ValueError as e:
    if coordinator_address is None and num_processes is None and process_id is None:
      return False  # nothing asked for and no cluster detected: a plain single process
    raise ValueError(f"Could not start a multi-process run with coordinator_address={coordinator_address!r}, "
                     f"num_processes={num_processes!r}, process_id={process_id!r}: {e} Give all three (arguments or "
                     "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or run under a cluster that "
                     "JAX detects (TPU pod, SLURM, Open MPI).") from e
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  return True


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"Environment variable {name}={value!r} must be an integer.") from None


def shutdown() -> None:
  """Leaves the run in step with the other processes: a barrier, then JAX's shutdown. Without the barrier, the
  coordinator (process 0) may stop its service while another process still talks to it, and abort."""
  if not jax.distributed.is_initialized():
    return
  from jax.experimental import multihost_utils

  multihost_utils.sync_global_devices("dvl_jax.distributed.shutdown")
  jax.distributed.shutdown()
