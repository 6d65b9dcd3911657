"""Resuming train.py's runs: after SIGTERM and SIGKILL the rerun equals the uninterrupted run, bit for bit; a run
saved over 8 devices resumes over 4; Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from dvl_jax.training.experiment import load_experiment
from dvl_jax.training.metrics import read_metrics
from dvl_jax.training.preemption import StopRequest
from dvl_jax.training.trainer import CHECKPOINTS, RUN_CONFIG, train
from training.runs import ENV, ONE, ROOT, curve as _curve, experiment as _run, experiment_yaml

KILL_STEPS = 40  # long enough that a kill lands midway


class StopAfter(StopRequest):
  """Asks the run to stop (as SIGTERM does) after `steps` steps."""

  def __init__(self, steps: int):
    super().__init__()
    self.left = steps

  def agreed(self) -> bool:
    self.left -= 1
    if self.left == 0:
      self.signal = signal.SIGTERM
    return self.requested


# ----- killed and resumed -----
# Batches of 8 rows, so that the same experiment runs over 8 and 4 devices.
RESUMED = dict(steps=KILL_STEPS, checkpoint_every=4, keep_checkpoints=2, export=False)


@pytest.fixture(scope="module")
def uninterrupted(run_files, tmp_path_factory):
  """The loss curve of a KILL_STEPS-step run that nothing stops, on one device."""
  tmp = tmp_path_factory.mktemp("uninterrupted")
  experiment = _run(run_files, tmp, "run", ["data.batch_size=8"], **RESUMED)
  train(experiment, progress=False, log=lambda _: None, devices=ONE)
  return _curve(experiment.train.run_dir)


def _start(config, cache):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--config", str(config),
                           "--compilation-cache", str(cache), "--no-progress"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)


def _stop_at(config, run_dir, cache, steps: int, sig: int) -> int:
  """Starts train.py, sends `sig` once `steps` steps are logged; returns the last step logged."""
  proc = _start(config, cache)
  path, end = os.path.join(run_dir, "metrics.jsonl"), time.time() + 240
  while not (os.path.exists(path) and sum(1 for _ in open(path)) >= steps):
    if proc.poll() is not None:
      raise AssertionError(f"train.py exited ({proc.returncode}) before step {steps}:\n{proc.stderr.read()}")
    if time.time() > end:
      proc.kill()
      raise AssertionError(f"no step {steps} within 240 s")
    time.sleep(0.002)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  logged = [m["step"] for m in read_metrics(str(run_dir))][-1]
  assert logged < KILL_STEPS, "the run ended before the signal: lengthen it"
  if sig == signal.SIGKILL:
    assert proc.returncode == -signal.SIGKILL
  else:  # a checkpoint of the step just taken, then exit 0
    assert proc.returncode == 0, err
    assert f"SIGTERM: saved step {logged}" in err
    assert str(logged) in os.listdir(os.path.join(run_dir, CHECKPOINTS))
  return logged


@pytest.mark.slow
def test_preempted_then_killed_then_rerun_equals_the_uninterrupted_run_bit_for_bit(uninterrupted, run_files,
                                                                                   tmp_path):
  run_dir = tmp_path / "run"
  config = experiment_yaml(run_files, tmp_path / "run.yaml", run_dir, **RESUMED)
  with open(config) as f:
    raw = yaml.safe_load(f)
  raw["data"]["batch_size"] = 8
  with open(config, "w") as f:
    yaml.safe_dump(raw, f)
  first = _stop_at(config, run_dir, tmp_path / "cache", 6, signal.SIGTERM)
  second = _stop_at(config, run_dir, tmp_path / "cache", first + 6, signal.SIGKILL)  # resumed, then killed
  assert second > first
  rerun = _start(config, tmp_path / "cache")
  _, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err
  assert "Resuming" in err
  assert _curve(run_dir) == uninterrupted  # every step once, each loss, norm and lr equal to the last bit


def test_ctrl_c_asks_to_stop_and_a_second_stops_at_once():
  with StopRequest() as stop:
    assert not stop.requested and stop.exit_code is None
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and stop.agreed() and stop.exit_code == 130
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.exit_code == 0
  assert signal.getsignal(signal.SIGTERM) is not stop._handle  # the handlers are given back


@pytest.mark.slow
def test_a_run_saved_over_8_devices_resumes_over_4_with_equal_losses(uninterrupted, run_files, tmp_path):
  assert jax.device_count() >= 8
  experiment = _run(run_files, tmp_path, "run", ["data.batch_size=8"], **{**RESUMED, "mesh": "fsdp=8"})
  result = train(experiment, progress=False, log=lambda _: None, stop=StopAfter(4))
  assert result.step == 4 and result.stopped_by == "SIGTERM"
  resumed = load_experiment(os.path.join(experiment.train.run_dir, RUN_CONFIG), ["train.mesh=fsdp=4"])
  result = train(resumed, progress=False, log=lambda _: None, devices=jax.devices()[:4], stop=StopAfter(4))
  assert result.step == 8
  curve = _curve(experiment.train.run_dir)
  assert [s for s, *_ in curve] == list(range(1, 9))
  np.testing.assert_allclose([x[1:] for x in curve], [x[1:] for x in uninterrupted[:8]], rtol=1e-5)
