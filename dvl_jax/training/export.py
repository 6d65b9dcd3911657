"""A trained model as an inference checkpoint: the layout convert/torch_to_orbax.py writes (params/,
dvl_config.json, the tokenizer, processor and generation files), which `dvl_jax.load`, `infer.py` and the chat
tools open directly.

  export_params(state.params, model_config, processor_dir, "runs/s3/export")   # at the end of a run
  export_run("runs/s3", "my-model", step=2000)                                 # any checkpoint of a run

The params are written at the checkpoint's shapes (the rows a mesh pads the vocabulary with are cut) and in the
model's param dtype. Nothing is replaced before the new checkpoint is complete: it is written beside the
destination and renamed into place (dvl_jax.staging); an existing destination is refused unless `overwrite`.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import jax

from dvl_jax import checkpoint
from dvl_jax.config import ModelConfig
from dvl_jax.convert.converter import _COPIED_SUFFIXES
from dvl_jax.model import abstract_params
from dvl_jax.staging import check_destination, staged_directory

# Files of a processor directory that describe the old weights, not the processor: not copied.
_NOT_COPIED = (checkpoint.CONFIG_FILE, "model.safetensors.index.json")


def unpadded(params: Any, config: ModelConfig) -> Any:
  """`params` cut to the checkpoint's shapes: a mesh pads the embedding's and lm_head's vocabulary rows."""
  want = abstract_params(config)

  def cut(x: jax.Array, like: jax.ShapeDtypeStruct) -> jax.Array:
    if tuple(x.shape) == tuple(like.shape):
      return x
    return x[tuple(slice(0, n) for n in like.shape)]

  return jax.tree.map(cut, params, want)


def copy_processor_files(processor_dir: str, out: str) -> None:
  """The tokenizer, processor, chat template and generation files of `processor_dir` into `out`."""
  for name in sorted(os.listdir(processor_dir)):
    path = os.path.join(processor_dir, name)
    if name.endswith(_COPIED_SUFFIXES) and name not in _NOT_COPIED and os.path.isfile(path):
      shutil.copy2(path, os.path.join(out, name))


def export_params(params: Any, config: ModelConfig, processor_dir: str, out: str, *, overwrite: bool = False,
                  log: Callable[[str], object] = print) -> str:
  """Writes an inference checkpoint of `params` (a Model's or a TrainState's, sharded or not) to `out`.

  With several processes every process calls it; Orbax writes each process's shards, process 0 the files.
  Returns the checkpoint's absolute path.
  """
  out = os.path.abspath(os.fspath(out))
  config = config.replace(dtype=config.param_dtype)  # the dtype `load` computes in by default
  params = unpadded(params, config)
  if jax.process_count() == 1:
    with staged_directory(out, overwrite=overwrite, log=log) as tmp:
      copy_processor_files(processor_dir, tmp)
      checkpoint.save(tmp, params, config)  # its config file last: a directory without it is never loaded
    return out
  # Several processes write one directory: a name they all know, swapped in by process 0 once all are done.
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  check_destination(out, overwrite=overwrite)
  tmp = out + ".partial-export"
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    copy_processor_files(processor_dir, tmp)
  multihost_utils.sync_global_devices("dvl_jax export: start")
  checkpoint.save(tmp, params, config)
  multihost_utils.sync_global_devices("dvl_jax export: written")
  if jax.process_index() == 0:
    old = out + ".old-export"
    if os.path.exists(out):
      os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  multihost_utils.sync_global_devices("dvl_jax export: done")
  return out
