"""Writing a directory so that nothing is lost: the new one is built beside its destination, then swapped in.

  with staged_directory("ckpt/model", overwrite=True) as tmp:
    ...write everything into tmp...
  # only now is ckpt/model replaced: the old one is renamed aside, tmp renamed in, the old one removed

An exception, Ctrl-C or SIGKILL before the swap leaves the destination exactly as it was; the half-written
directory is a hidden `.NAME.partial-PID-XXXX` sibling (removed on error; after a SIGKILL, removed by the next
run for the same destination).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import tempfile
from typing import Callable, Iterator

_PARTIAL = re.compile(r"\.partial-(\d+)-[^/]*$")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def remove_stale_partials(dst: str, log: Callable[[str], object] = print) -> None:
  """Removes the half-written siblings of `dst` left by runs that were killed (their process is gone)."""
  parent, name = os.path.split(os.path.abspath(dst))
  for path in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.partial-*")):
    found = _PARTIAL.search(path)
    if found and not _alive(int(found.group(1))):
      log(f"Removing {path}, left half-written by an interrupted run.")
      shutil.rmtree(path, ignore_errors=True)


def check_destination(dst: str, *, overwrite: bool) -> None:
  """Raises FileExistsError when `dst` may not be written: a file, or a non-empty directory without overwrite."""
  if os.path.exists(dst) and not os.path.isdir(dst):
    raise FileExistsError(f"Destination {dst!r} is an existing file, not a directory; choose a directory path "
                          "(a new one, or one to replace with --overwrite).")
  if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
    raise FileExistsError(f"Destination {dst!r} is not empty; choose a new directory or pass --overwrite (the "
                          "old contents are replaced only once the new ones are complete).")


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike, *, overwrite: bool = False,
                     log: Callable[[str], object] = print) -> Iterator[str]:
  """Yields a new empty directory beside `dst`; when the block succeeds, it becomes `dst`.

  Args:
    dst: the directory to create or replace. It must not be a file; a non-empty directory needs `overwrite`.
    overwrite: replace an existing non-empty `dst` (removed only after the new one is in its place).
  """
  dst = os.path.abspath(os.fspath(dst))
  check_destination(dst, overwrite=overwrite)
  parent, name = os.path.split(dst)
  os.makedirs(parent, exist_ok=True)
  remove_stale_partials(dst, log)
  tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
  os.mkdir(tmp)  # not tempfile.mkdtemp: that one is private (0700), and it becomes the user's directory
  try:
    yield tmp
    check_destination(dst, overwrite=overwrite)  # someone may have written there meanwhile
    old = None
    if os.path.isdir(dst) and os.listdir(dst):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rename(dst, os.path.join(old, name))
    try:
      if os.path.isdir(dst):
        os.rmdir(dst)  # empty
      os.rename(tmp, dst)
    except BaseException:
      if old is not None:
        os.rename(os.path.join(old, name), dst)  # put the old one back
        os.rmdir(old)
      raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
