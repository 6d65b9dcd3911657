"""A converted checkpoint on disk: an Orbax checkpoint of the params plus our model config.

Layout of a checkpoint directory:
  params/            Orbax (StandardCheckpointer) pytree of the params, as `DeepseekVL.init` lays them out
  dvl_config.json    the ModelConfig (`{"format": ..., "model": ModelConfig.to_dict()}`)
  *.json, ...        tokenizer, processor and generation files copied from the source checkpoint
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dvl_jax.config import ModelConfig

CONFIG_FILE = "dvl_config.json"
PARAMS_DIR = "params"
FORMAT = "dvl_jax/1"


def save(path: str | os.PathLike, params: Any, config: ModelConfig) -> None:
  """Writes params and the config to a new directory `path`.

  Args:
    params: a nested dict of numpy or jax arrays. Its numpy leaves are replaced by jax arrays in place, one
      at a time, so that a caller holding the only copy never holds two.
  """
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  # Orbax's numpy path holds every leaf twice while writing; as jax arrays the write costs about one extra
  # copy of the params at its peak (measured: a 1.37 GB bfloat16 model peaks at 2.8 GB RSS while saving).
  params = to_jax_in_place(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, PARAMS_DIR), params)
  checkpointer.wait_until_finished()
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump({"format": FORMAT, "model": config.to_dict()}, f, indent=2)


def to_jax_in_place(tree: dict[str, Any]) -> dict[str, Any]:
  """Replaces the numpy leaves of a nested dict by jax arrays one at a time, so each numpy array can be freed
  as soon as its jax array exists."""
  for key, value in tree.items():
    if isinstance(value, dict):
      tree[key] = to_jax_in_place(value)
    elif not isinstance(value, jax.Array):  # a global array over several processes cannot be device_put again
      tree[key] = jax.device_put(value)
  return tree


def require_directory(path: str, what: str) -> None:
  """Raises FileNotFoundError when `path` is not a directory, saying how to get a Hub checkpoint when `path`
  looks like a Hub id (owner/name): dvl_jax reads converted checkpoints and downloads nothing."""
  if os.path.isdir(path):
    return
  hint = ""
  if not os.path.exists(path) and re.fullmatch(r"\w[\w.-]*/[\w.-]+", path):
    hint = (f" If {path!r} is a Hugging Face Hub id: dvl_jax does not download from the Hub. Download it with "
            f"`hf download {path} --local-dir DIR` (`huggingface-cli download` in older huggingface_hub), convert it "
            "with `python convert/torch_to_orbax.py --src DIR --dst CKPT`, then pass the directory CKPT.")
  raise FileNotFoundError(f"No {what} directory at {path!r}.{hint}")


def read_config(path: str | os.PathLike) -> ModelConfig:
  """Reads the ModelConfig of a converted checkpoint, with a helpful error when `path` is not one."""
  path = os.fspath(path)
  file = os.path.join(path, CONFIG_FILE)
  require_directory(path, "checkpoint")
  if not os.path.isfile(file):
    hint = (" It looks like a PyTorch/transformers checkpoint: convert it first with "
            f"`python convert/torch_to_orbax.py --src {path} --dst OUT_DIR`."
            if os.path.isfile(os.path.join(path, "config.json")) else "")
    raise FileNotFoundError(f"{path!r} is not a dvl_jax checkpoint: it has no {CONFIG_FILE}.{hint}")
  with open(file) as f:
    data = json.load(f)
  if data.get("format") != FORMAT:
    raise ValueError(f"{file} has format {data.get('format')!r}; this dvl_jax reads {FORMAT!r}. "
                     "Re-convert the source checkpoint with convert/torch_to_orbax.py.")
  return ModelConfig.from_dict(data["model"])


def restore_params(path: str | os.PathLike, abstract_params: Any) -> Any:
  """Restores the params into the shapes, dtypes and shardings of `abstract_params` (ShapeDtypeStructs).

  Stored dtypes are cast to the requested ones (a bfloat16 checkpoint restores as float32 if asked).
  """
  params_dir = os.path.abspath(os.path.join(os.fspath(path), PARAMS_DIR))
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"The checkpoint {os.fspath(path)!r} has no {PARAMS_DIR}/ directory; it is incomplete. "
                            "Re-run convert/torch_to_orbax.py.")
  checkpointer = ocp.StandardCheckpointer()
  stored = checkpointer.metadata(params_dir).item_metadata.tree
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
  have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored)}
  if want != have:
    diff = sorted(f"{k}: stored {have.get(k)}, config wants {want.get(k)}"
                  for k in set(want) | set(have) if want.get(k) != have.get(k))
    if any(k.startswith("['language_model']['layers']") for k in have):
      hint = ("These params stack the decoder's layers under ['language_model']['layers'], as dvl_jax wrote them "
              "before its decoder layers were unrolled (one param set per layer): re-convert the source "
              "checkpoint with convert/torch_to_orbax.py.")
    else:
      hint = ("If the config is right, the params come from another model or an older dvl_jax: re-convert the "
              "source checkpoint with convert/torch_to_orbax.py.")
    raise ValueError(f"The params in {params_dir} do not match {CONFIG_FILE}:\n  " + "\n  ".join(diff[:20]) +
                     f"\n{hint}")
  return checkpointer.restore(params_dir, abstract_params)


def numpy_dtype(name: str) -> np.dtype:
  """'float32' | 'bfloat16' | 'float16' -> numpy dtype (bfloat16 through ml_dtypes)."""
  return np.dtype(jax.numpy.dtype(name))
