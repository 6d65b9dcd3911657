"""What to caption: image files, directories, globs and manifests expanded into an ordered list of items."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to caption. `image` is an absolute path (or a URL from a manifest); `prompt` None means the run's
  default prompt."""

  image: str
  prompt: str | None = None


@dataclasses.dataclass
class Sources:
  """items: in input order, each (image, prompt) once; skipped: files in directories that are not images by
  their extension (reported, never captioned)."""

  items: list[Item]
  skipped: list[str]


def _is_url(s: str) -> bool:
  return s.startswith(("http://", "https://", "data:"))


def _manifest(path: str) -> list[Item]:
  """A .txt manifest (one image per line, # comments) or .jsonl ({"image": ..., "prompt": ...} per line); relative
  paths are relative to the manifest's directory."""
  base = os.path.dirname(os.path.abspath(path))
  items = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      prompt = None
      if path.endswith(".jsonl"):
        try:
          row = json.loads(line)
          image, prompt = row["image"], row.get("prompt")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{number}: expected a JSON object with an 'image' key (and optionally 'prompt'); "
                           f"got {line[:80]!r} ({e}).") from None
      else:
        image = line
      items.append(Item(image if _is_url(image) else os.path.join(base, image), prompt))
  return items


def collect(paths: Sequence[str]) -> Sources:
  """Expands PATHs: an image file, a directory (recursively, image extensions only, sorted), a glob, or a
  .txt/.jsonl manifest. A path that matches nothing is an error: a typo must not silently caption nothing."""
  items, skipped = [], []
  for path in paths:
    if _is_url(path):
      items.append(Item(path))
    elif os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
          if name.startswith("."):
            continue
          full = os.path.abspath(os.path.join(root, name))
          (items.append(Item(full)) if name.lower().endswith(IMAGE_EXTENSIONS) else skipped.append(full))
    elif os.path.isfile(path) and path.endswith((".txt", ".jsonl")):
      items.extend(_manifest(path))
    elif os.path.isfile(path):
      items.append(Item(os.path.abspath(path)))
    elif glob.has_magic(path):
      matches = sorted(glob.glob(path, recursive=True))
      if not matches:
        raise FileNotFoundError(f"The pattern {path!r} matches no file.")
      found = collect([m for m in matches if not os.path.isdir(m)])
      items.extend(found.items)
      skipped.extend(found.skipped)
    else:
      raise FileNotFoundError(f"No such image, directory, pattern or manifest: {path!r}.")
  unique = list(dict.fromkeys(items))  # the same image twice (two globs) is captioned once
  return Sources(unique, skipped)
