"""The output JSONL: one line per image, appended a batch at a time, read back to resume."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable


class ResultFile:
  """Append-only JSONL of results. Opening it checks that it is writable, repairs a line cut short by a crash,
  and reads which (image, prompt) pairs are already done.

  A retried pair gets a new line; the last line of a pair is the one that counts.

  Attributes:
    done: {(image, prompt): the error of its last line, None for a caption} of the lines already in the file.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(self.path))
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"The output directory {directory!r} does not exist; create it first.")
    try:
      self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
      raise PermissionError(f"Cannot write the output {self.path!r}: {e.strerror}. Choose a writable --out.") from None
    self.done: dict[tuple[str, str], str | None] = {}
    self._repair_and_read()

  def _repair_and_read(self) -> None:
    """Reads the lines; a last line cut short by a crash is dropped, but only once every other line has proved
    this file to be ours (a user's image or manifest passed as --out is refused, never truncated)."""
    with open(self.path, "rb") as f:
      data = f.read()
    keep = data.rfind(b"\n") + 1
    for number, line in enumerate(data[:keep].splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        if not {"image", "prompt", "caption", "error"} <= row.keys():
          raise KeyError
        self.done[(row["image"], row["prompt"])] = row["error"]  # a later line replaces an earlier one
      except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{self.path}:{number} is not a result line of infer.py ({line[:80]!r}); pass a new --out "
                         "or fix the file.") from None
    if keep < len(data):  # the last write was cut short
      if not data[keep:].startswith(b'{"image": '):
        raise ValueError(f"{self.path} ends with {data[keep:keep + 40]!r}, not a result line of infer.py; pass a "
                         "new --out.")
      os.ftruncate(self._fd, keep)

  def write(self, records: Iterable[dict[str, Any]]) -> None:
    """Appends whole lines in one write and syncs them to disk: a crash leaves no half record behind (and if
    the system cuts the write short anyway, the next open drops the partial line)."""
    data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    while data:
      written = os.write(self._fd, data)
      data = data[written:]
    os.fsync(self._fd)

  def close(self) -> None:
    os.close(self._fd)
