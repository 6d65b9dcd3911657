"""The converter never loses a user's files: every refused, failed or killed run leaves the source and an existing
destination byte-for-byte as they were (hashed), and leaves nothing that `dvl_jax.load` would take."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dvl_jax
from dvl_jax import checkpoint
from dvl_jax.convert import converter, main
from reference import hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "convert", "torch_to_orbax.py")


def tree_hash(path) -> str:
  """A hash of every file's relative path and bytes under `path` (or of the file itself)."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    h.update(open(path, "rb").read())
    return h.hexdigest()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, path).encode() + b"\0" + open(full, "rb").read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
  """Two different tiny PyTorch checkpoints, and a converted checkpoint of the first."""
  root = tmp_path_factory.mktemp("originals")
  hf_model("mha", seed=0).save_pretrained(root / "a")
  hf_model("gqa", seed=1).save_pretrained(root / "b")
  main(["--src", str(root / "a"), "--dst", str(root / "a_dvl")])
  return root


@pytest.fixture
def work(tmp_path, originals):
  """Fresh copies: work/models/a (source), work/models/b (another source), work/good (converted from a)."""
  shutil.copytree(originals / "a", tmp_path / "models" / "a")
  shutil.copytree(originals / "b", tmp_path / "models" / "b")
  shutil.copytree(originals / "a_dvl", tmp_path / "good")
  return tmp_path


def _snapshot(*paths):
  return {str(p): tree_hash(p) for p in paths}


def _siblings(path):
  """Everything beside `path` (in its parent) other than itself: leftovers of a run."""
  parent, name = os.path.split(os.path.abspath(path))
  return sorted(n for n in os.listdir(parent) if n != name)


@pytest.mark.parametrize("case", ["dst_is_src", "dst_is_parent_of_src", "dst_inside_src", "src_typo",
                                  "dst_is_file", "src_is_converted"])
def test_refused_runs_change_nothing(work, capsys, case):
  src, good = work / "models" / "a", work / "good"
  (work / "notes.txt").write_text("my notes")
  args, expect = {
      "dst_is_src": ([src, src], "is the source checkpoint itself"),
      "dst_is_parent_of_src": ([src, work / "models"], "contains the source checkpoint"),
      "dst_inside_src": ([src, src / "converted"], "lies inside the source checkpoint"),
      "src_typo": ([work / "models" / "aa", good], "does not exist"),
      "dst_is_file": ([src, work / "notes.txt"], "is an existing file"),
      "src_is_converted": ([good, work / "out"], "already a converted dvl_jax checkpoint"),
  }[case]
  before = _snapshot(work)
  code = main(["--src", str(args[0]), "--dst", str(args[1]), "--overwrite"])
  assert code == 2
  assert expect in capsys.readouterr().err
  assert _snapshot(work) == before  # nothing written, nothing removed, anywhere under work/


def test_mismatched_source_fails_and_leaves_destination(work, capsys):
  src, good = work / "models" / "a", work / "good"
  os.remove(src / "model.safetensors")
  shutil.copy(work / "models" / "b" / "model.safetensors", src / "model.safetensors")  # b's weights, a's config
  before = _snapshot(work)
  assert main(["--src", str(src), "--dst", str(good), "--overwrite"]) == 1
  assert "does not match its config.json" in capsys.readouterr().err
  assert _snapshot(work) == before


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_destination(work, monkeypatch, capsys, error):
  good = work / "good"
  before = _snapshot(work)
  real_save = checkpoint.save

  def save_then_fail(path, params, config):
    real_save(path, params, config)  # everything written into the staging directory...
    raise error  # ...then the run dies before the swap

  monkeypatch.setattr(checkpoint, "save", save_then_fail)
  code = main(["--src", str(work / "models" / "b"), "--dst", str(good), "--overwrite"])
  assert code == (130 if isinstance(error, KeyboardInterrupt) else 1)
  err = capsys.readouterr().err
  assert ("is unchanged" if isinstance(error, KeyboardInterrupt) else "No space left on device") in err
  assert _snapshot(work) == before
  assert _siblings(good) == ["models"]  # the staging directory is gone


def test_overwrite_replaces_only_when_complete(work):
  good = work / "good"
  assert main(["--src", str(work / "models" / "b"), "--dst", str(good), "--overwrite"]) == 0
  assert dvl_jax.load(good).config.text.num_kv_heads == hf_model("gqa").config.text_config.num_key_value_heads
  assert _siblings(good) == ["models"]  # no staging or old directory left


@pytest.mark.slow
def test_sigkill_midway_leaves_destination_and_no_loadable_half(work):
  good = work / "good"
  before = _snapshot(good, work / "models")
  proc = subprocess.Popen([sys.executable, SCRIPT, "--src", str(work / "models" / "b"), "--dst", str(good),
                           "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  def writing_params():
    return any(n.startswith("params") for p in os.listdir(work) if ".partial-" in p for n in os.listdir(work / p))

  while not writing_params():  # Orbax has begun writing the params
    assert proc.poll() is None, proc.stderr.read()
    assert time.time() < deadline
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  partial = [work / n for n in os.listdir(work) if ".partial-" in n]
  assert _snapshot(good, work / "models") == before
  assert partial  # killed while writing: its half-written directory is still there...
  for p in partial:  # ...and is no checkpoint
    with pytest.raises((FileNotFoundError, ValueError)):
      dvl_jax.load(p)
  model = dvl_jax.load(good)  # the old checkpoint is whole
  assert model.config.text.num_kv_heads == hf_model("mha").config.text_config.num_key_value_heads
  # The next run clears the dead run's leftovers and converts.
  assert main(["--src", str(work / "models" / "b"), "--dst", str(good), "--overwrite"]) == 0
  assert _siblings(good) == ["models"]


def test_destination_that_is_an_empty_directory_is_used(work):
  (work / "empty").mkdir()
  assert main(["--src", str(work / "models" / "a"), "--dst", str(work / "empty")]) == 0
  assert np.asarray(dvl_jax.load(work / "empty").params["aligner"]["linear1"]["kernel"]).size > 0


def test_check_paths_refuses_before_reading(work):
  with pytest.raises(converter.PathError, match="choose another directory"):
    converter.check_paths(str(work / "models" / "a"), str(work / "models" / "a" / "."), overwrite=True)
