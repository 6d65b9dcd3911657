"""PyTorch safetensors checkpoint (transformers `-hf` or original `deepseek-ai` layout) -> dvl_jax checkpoint.

Streams the source tensor by tensor into preallocated output arrays, so peak memory stays near the output
plus one tensor. Every target param must be filled and every source tensor used or knowingly skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np

from dvl_jax import checkpoint
from dvl_jax.config import ModelConfig
from dvl_jax.convert import keymap
from dvl_jax.convert.hf_config import from_hf_config, hf_ties_embeddings, load_json
from dvl_jax.convert.safetensors_io import INDEX_FILE, SafetensorsCheckpoint
from dvl_jax.model import abstract_params
from dvl_jax.staging import check_destination, staged_directory

IMAGE_TOKEN = "<image_placeholder>"
_COPIED_SUFFIXES = (".json", ".jinja", ".model", ".txt")
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def image_token_from_tokenizer(src: str) -> int | None:
  """The id of `<image_placeholder>` in the tokenizer files of `src`, if they name it."""
  tok = os.path.join(src, "tokenizer.json")
  if os.path.isfile(tok):
    for t in load_json(tok).get("added_tokens", []):
      if t.get("content") == IMAGE_TOKEN:
        return int(t["id"])
  tok_cfg = os.path.join(src, "tokenizer_config.json")
  if os.path.isfile(tok_cfg):
    for i, t in load_json(tok_cfg).get("added_tokens_decoder", {}).items():
      if t.get("content") == IMAGE_TOKEN:
        return int(i)
  return None


class PathError(ValueError):
  """--src / --dst name places that cannot be converted from or to (a usage error: exit status 2)."""


def check_paths(src: str, dst: str, *, overwrite: bool) -> None:
  """Refuses, before any work, a source that is not a PyTorch checkpoint and a destination that would destroy
  the source or a user's file: raises FileNotFoundError, FileExistsError or PathError saying which."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f"Source checkpoint directory {src!r} does not exist" +
                            (" (it is a file)." if os.path.exists(src) else "."))
  if os.path.isfile(os.path.join(src, checkpoint.CONFIG_FILE)):
    raise PathError(f"{src!r} is already a converted dvl_jax checkpoint (it has {checkpoint.CONFIG_FILE}); load it "
                    "directly (dvl_jax.load, infer.py --ckpt) or pass the PyTorch checkpoint it came from as --src.")
  real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
  if real_src == real_dst:
    raise PathError(f"--dst {dst!r} is the source checkpoint itself; choose another directory.")
  if os.path.commonpath([real_src, real_dst]) == real_src:
    raise PathError(f"--dst {dst!r} lies inside the source checkpoint {src!r}; choose a directory outside it.")
  if os.path.commonpath([real_src, real_dst]) == real_dst:
    raise PathError(f"--dst {dst!r} contains the source checkpoint {src!r}; replacing it would delete the "
                    "source. Choose another directory.")
  check_destination(dst, overwrite=overwrite)
  if not os.path.isfile(os.path.join(src, "config.json")):
    raise FileNotFoundError(f"{src!r} has no config.json; expected a DeepSeek-VL checkpoint directory "
                            "(config.json plus safetensors weights).")


def read_source_config(src: str) -> tuple[ModelConfig, dict[str, Any]]:
  """The ModelConfig of a PyTorch checkpoint directory and its raw config.json."""
  path = os.path.join(src, "config.json")
  try:
    raw = load_json(path)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}.") from e
  return from_hf_config(raw, image_token_id=image_token_from_tokenizer(src)), raw


def _default_dtype(reader: SafetensorsCheckpoint) -> str:
  """The checkpoint's own float dtype when all its float tensors share one, else float32."""
  found = {reader.info(k)[1] for k in reader.keys()} & set(_FLOAT_DTYPES)
  return _FLOAT_DTYPES[found.pop()] if len(found) == 1 else "float32"


def _fill(reader: SafetensorsCheckpoint, params: dict[str, Any], fmt: str) -> tuple[dict, list, list, list]:
  """Copies every source tensor into `params`. Returns (filled {path: set of layers}, unexpected, shape
  errors, skipped)."""
  filled: dict[tuple[str, ...], set] = {}
  unexpected, errors, skipped = [], [], []
  for key in reader.keys():
    if keymap.is_skipped(key, fmt):
      skipped.append(key)
      continue
    tensor = reader.get(key)
    pieces = [(key, tensor)] if fmt == keymap.HF else keymap.original_to_hf(key, tensor)
    for hf_key, piece in pieces or [(key, None)]:
      target = None if piece is None else keymap.hf_to_target(hf_key, params)
      if target is None:
        unexpected.append(f"{key} {tuple(tensor.shape)}")
        continue
      path, layer = target
      out = keymap.get_path(params, path)
      if layer is not None:
        if layer >= out.shape[0]:
          unexpected.append(f"{key} {tuple(tensor.shape)} (layer {layer}, but the config has {out.shape[0]} layers)")
          continue
        out = out[layer]
      try:
        out[...] = keymap.to_target_layout(piece, out.shape, key, path)  # casts to the output dtype in place
      except ValueError as e:
        errors.append(str(e))
        continue
      filled.setdefault(path, set()).add(layer)
  return filled, unexpected, errors, skipped


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
                       overwrite: bool = False, log=print) -> ModelConfig:
  """Converts the PyTorch checkpoint in `src` into a dvl_jax checkpoint in `dst`.

  Args:
    src: a directory with config.json and safetensors weights (single file or index + shards).
    dst: the output directory; must not exist or be empty unless `overwrite`. It must not be, hold or lie
      inside `src`. Nothing in it changes until the new checkpoint is complete (written beside it, then swapped
      in); a failed or interrupted conversion leaves it as it was.
    dtype: "float32" | "bfloat16" | "float16" for the stored params; default the source's float dtype.
  Returns:
    the ModelConfig written.
  """
  src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
  check_paths(src, dst, overwrite=overwrite)
  start = time.time()
  config, raw_config = read_source_config(src)
  reader = SafetensorsCheckpoint(src)
  fmt = keymap.detect_format(reader.keys())
  dtype = dtype or _default_dtype(reader)
  config = config.replace(dtype=dtype, param_dtype=dtype)
  out_dtype = checkpoint.numpy_dtype(dtype)
  params = jax.tree.map(lambda x: np.empty(x.shape, out_dtype), abstract_params(config))

  filled, unexpected, errors, skipped = _fill(reader, params, fmt)
  lm_head, embed = ("language_model", "lm_head", "kernel"), ("language_model", "embed_tokens", "embedding")
  if lm_head not in filled and embed in filled and hf_ties_embeddings(raw_config):
    keymap.get_path(params, lm_head)[...] = keymap.get_path(params, embed)  # tied: lm_head is the embedding
    filled[lm_head] = {None}

  missing = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(k.key for k in path)
    stacked = name.split("/")[1] == "layers" if "/" in name else False
    want = set(range(leaf.shape[0])) if stacked else {None}
    lacking = want - filled.get(tuple(k.key for k in path), set())
    if lacking:
      missing.append(f"{name} {leaf.shape}" + (f" (layers {sorted(lacking)})" if stacked else ""))
  if missing or unexpected or errors:
    parts = [f"The checkpoint in {src!r} ({fmt} key layout) does not match its config.json:"]
    for title, items in (("shape mismatches", errors), ("params not found in the checkpoint", missing),
                         ("unexpected tensors", unexpected)):
      if items:
        parts.append(f"{len(items)} {title}:\n    " + "\n    ".join(items[:40]) +
                     (f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""))
    parts.append("Check that config.json belongs to these weights.")
    raise ValueError("\n  ".join(parts))

  n = sum(x.size for x in jax.tree.leaves(params))
  with staged_directory(dst, overwrite=overwrite, log=log) as tmp:
    for name in sorted(os.listdir(src)):
      if name.endswith(_COPIED_SUFFIXES) and name != INDEX_FILE and os.path.isfile(os.path.join(src, name)):
        shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    checkpoint.save(tmp, params, config)  # its config file last: a directory without it is never loaded
  log(f"Converted {src} ({fmt} layout, {len(reader.keys())} tensors, {len(skipped)} unused skipped) -> {dst}: "
      f"{n:,} params in {dtype}, {time.time() - start:.1f} s.")
  return config


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Convert a DeepSeek-VL PyTorch (safetensors) checkpoint, "
                                   "transformers '-hf' or original deepseek-ai layout, to a dvl_jax Orbax checkpoint.")
  parser.add_argument("--src", required=True, help="directory with config.json and *.safetensors")
  parser.add_argument("--dst", required=True, help="output directory (new or empty; see --overwrite)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="dtype of the stored params (default: the source's)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --dst, once the new checkpoint is complete")
  args = parser.parse_args(argv)
  try:
    convert_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, PathError) as e:  # the arguments name the wrong places
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (ValueError, OSError) as e:  # the source checkpoint is broken or inconsistent, or writing failed
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"Interrupted; {args.dst} is unchanged.", file=sys.stderr)
    return 130
  return 0
