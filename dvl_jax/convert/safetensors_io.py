"""Reads safetensors checkpoints tensor by tensor, memory-mapped, without torch.

The `safetensors` package's numpy backend cannot return bfloat16 (the dtype of the released DeepSeek-VL
weights), so this reads the format directly: an 8-byte little-endian header length, a JSON header of
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}`, then the raw bytes. Each tensor is read into its
own buffer and nothing else is kept, so reading costs one tensor of memory at a time. (A memory map of the
whole file would leave every page read resident, a second copy of the model in the process's memory.)
"""

from __future__ import annotations

import json
import os
import struct
import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFile:
  """One .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path} is not a valid safetensors file (unreadable header: {e}).") from e
    header.pop("__metadata__", None)
    self._header = header
    self._data_start = 8 + n

  def keys(self) -> list[str]:
    return list(self._header)

  def info(self, key: str) -> tuple[tuple[int, ...], str]:
    entry = self._header[key]
    return tuple(entry["shape"]), entry["dtype"]

  def get(self, key: str) -> np.ndarray:
    """The tensor `key`, read from the file into a new array."""
    entry = self._header[key]
    if entry["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}.")
    dtype = np.dtype(_DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    count = (end - begin) // dtype.itemsize
    if count != int(np.prod(entry["shape"])):
      raise ValueError(f"{self.path}: tensor {key!r} holds {end - begin} bytes, not the {entry['shape']} "
                       f"{entry['dtype']} its header announces; the file is corrupt.")
    data = np.empty(count, dtype)
    with open(self.path, "rb") as f:
      f.seek(self._data_start + begin)
      read = f.readinto(memoryview(data.view(np.uint8)))
    if read != end - begin:
      raise ValueError(f"{self.path} is truncated: tensor {key!r} needs {end - begin} bytes at offset "
                       f"{self._data_start + begin}.")
    return data.reshape(entry["shape"])


class SafetensorsCheckpoint:
  """All the safetensors files of a checkpoint directory: `model.safetensors`, or the shards named by
  `model.safetensors.index.json`, or else every `*.safetensors` in the directory."""

  def __init__(self, directory: str | os.PathLike):
    directory = os.fspath(directory)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map", {})
      names = sorted(set(weight_map.values()))
      missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
      if missing:
        raise FileNotFoundError(f"{index} names shard(s) that are not in {directory}: {missing}.")
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      names = [SINGLE_FILE]
    else:
      names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors")) if os.path.isdir(directory) else []
    if not names:
      present = sorted(os.listdir(directory)) if os.path.isdir(directory) else "the directory does not exist"
      others = [n for n in (present if isinstance(present, list) else []) if n.endswith((".bin", ".pt", ".pth"))]
      hint = (f" It has PyTorch pickle weights {others}: re-save them as safetensors "
              "(`model.save_pretrained(dir, safe_serialization=True)`)." if others else "")
      raise FileNotFoundError(f"No safetensors weights in {directory!r} (looked for {SINGLE_FILE}, {INDEX_FILE} or "
                              f"*.safetensors; found {present}).{hint}")
    self._files = {}
    for name in names:
      file = SafetensorsFile(os.path.join(directory, name))
      for key in file.keys():
        self._files[key] = file

  def keys(self) -> list[str]:
    return sorted(self._files)

  def info(self, key: str) -> tuple[tuple[int, ...], str]:
    return self._files[key].info(key)

  def get(self, key: str) -> np.ndarray:
    return self._files[key].get(key)
