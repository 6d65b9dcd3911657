"""staged_directory: the destination changes only when the block succeeds; leftovers of dead runs are cleared,
those of live runs are not."""

import os
import subprocess
import sys

import pytest

from dvl_jax.staging import remove_stale_partials, staged_directory


def test_success_replaces_and_failure_keeps(tmp_path):
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "old.txt").write_text("old")
  with pytest.raises(RuntimeError):
    with staged_directory(dst, overwrite=True, log=lambda _: None) as tmp:
      open(os.path.join(tmp, "new.txt"), "w").write("new")
      raise RuntimeError("dies before the swap")
  assert os.listdir(dst) == ["old.txt"] and os.listdir(tmp_path) == ["out"]
  with staged_directory(dst, overwrite=True, log=lambda _: None) as tmp:
    open(os.path.join(tmp, "new.txt"), "w").write("new")
  assert os.listdir(dst) == ["new.txt"] and os.listdir(tmp_path) == ["out"]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(dst).st_mode & 0o777 == 0o777 & ~umask  # as os.mkdir makes it, not private like a temp dir


def test_non_empty_destination_needs_overwrite(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="--overwrite"):
    with staged_directory(tmp_path / "out"):
      pass
  assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_only_dead_runs_leftovers_are_removed(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  (tmp_path / f".out.partial-{int(dead.stdout)}-abc").mkdir()
  (tmp_path / f".out.partial-{os.getpid()}-xyz").mkdir()  # a live run (this one) is writing it
  (tmp_path / ".other.partial-1-abc").mkdir()  # another destination's
  logged = []
  remove_stale_partials(str(tmp_path / "out"), logged.append)
  assert sorted(os.listdir(tmp_path)) == [".other.partial-1-abc", f".out.partial-{os.getpid()}-xyz"]
  assert len(logged) == 1 and "interrupted run" in logged[0]
