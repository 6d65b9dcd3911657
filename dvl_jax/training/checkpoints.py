"""A training run's checkpoints, with Orbax: the train state, each process's data iterator, the resolved config.

  checkpoints = RunCheckpoints(f"{run_dir}/checkpoints", keep=3)
  if checkpoints.latest_step() is not None:  # a rerun of the same command resumes
    state = checkpoints.restore(abstract_train_state(model_config, plan, optimizer), data)
  ...
  checkpoints.save(step, state, data, config=to_dict(experiment))  # returns at once; the write goes on
  checkpoints.close()  # waits for the last write

- Asynchronous: `save` starts the write and returns; training goes on while Orbax writes (the arrays are
  copied off the devices first, so the next step may donate them).
- Atomic: Orbax writes each step into a temporary directory and renames it when every process has finished,
  so a step is listed (and restored) only when complete; a run killed mid-write leaves no half checkpoint.
- Any mesh: the state is restored into the shardings of the abstract state given, e.g. a run saved over 8
  devices resumes over 4; Orbax reads each shard's slices.
- The data iterator is saved by grain's Orbax handler, a JSON file per process.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from dvl_jax.training.state import TrainState


class RunCheckpoints:
  """Args:
    directory: the checkpoints' directory (made if absent).
    keep: the most recent checkpoints kept; older ones are deleted once a newer one is complete.
    async_save: write in the background (True) or block in `save`.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data: Any = None, config: dict[str, Any] | None = None) -> None:
    """Starts writing checkpoint `step`: the state, the data iterator (a grain DatasetIterator, e.g.
    dvl_jax.data.DataIterator) and the config as JSON, each when given. Every process must call it."""
    items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
    if data is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, like: TrainState, data: Any = None, step: int | None = None) -> TrainState:
    """Checkpoint `step` (None: the latest) into the shapes, dtypes and shardings of `like`
    (dvl_jax.training.abstract_train_state); `data`, when given, is set to its saved state.

    Raises:
      FileNotFoundError: no complete checkpoint in the directory.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    items: dict[str, Any] = {"state": ocp.args.StandardRestore(like)}
    if data is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data)
    return self._manager.restore(step, args=ocp.args.Composite(**items)).state

  def config(self, step: int | None = None) -> dict[str, Any] | None:
    """The config saved with checkpoint `step` (None: the latest), or None if none was."""
    step = self.latest_step() if step is None else step
    if step is None or not os.path.isdir(os.path.join(self.directory, str(step), "config")):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    """Blocks until the checkpoint being written is complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last write, then releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()
