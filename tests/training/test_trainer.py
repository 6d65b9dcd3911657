"""train.py's run (dvl_jax/training/trainer.py): from YAML and files on disk to an exported checkpoint that infer.py
captions with; resume after SIGKILL and SIGTERM equal to the uninterrupted run, bit for bit; resume on another
mesh; the errors raised before any compute."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

import dvl_jax
from dvl_jax.training.experiment import load_experiment
from dvl_jax.training.metrics import read_metrics
from dvl_jax.training.preemption import StopRequest
from dvl_jax.training.trainer import CHECKPOINTS, RUN_CONFIG, RunLock, export_run, train
from dvl_jax.typed_config import ConfigError
from training.runs import experiment_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILL_STEPS = 40  # long enough that a kill lands midway
ONE = jax.devices()[:1]  # the runs' mesh is data=1; the tests' process has 8 simulated devices
# train.py in a subprocess: one CPU device, as the in-process runs use.
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


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


def _run(run_files, tmp_path, name, overrides=(), **train_keys):
  path = experiment_yaml(run_files, tmp_path / f"{name}.yaml", tmp_path / name, **train_keys)
  return load_experiment(path, list(overrides))


def _curve(run_dir) -> list[tuple]:
  return [(m["step"], m["loss"], m["grad_norm"], m["learning_rate"]) for m in read_metrics(str(run_dir))
          if "loss" in m]


def _events(directory) -> dict[str, list[tuple[int, float]]]:
  """TensorBoard scalars of the event files in `directory`: tag -> [(step, value)], read from the TFRecord
  framing (length, crc, data, crc) with tensorboardX's Event proto."""
  from tensorboardX.proto.event_pb2 import Event

  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


# ----- a whole run -----
@pytest.fixture(scope="module")
def finished(run_files, tmp_path_factory):
  """A 6-step run with evaluation (held-out loss and a sample) every 3 steps, run to its end."""
  tmp = tmp_path_factory.mktemp("finished")
  overrides = [f"eval_data.sources.0.path={run_files / 'data' / 'eval.jsonl'}", "eval_data.sources.0.format=captions",
               "eval_data.batch_size=2", "eval_data.seq_len=192", "eval_data.buckets=[192]", "train.eval_every=3",
               "train.eval_steps=1", f"train.samples.0.image={run_files / 'data' / 'dog_a.png'}",
               "train.samples.0.prompt=Describe this image.", "train.sample_tokens=4"]
  experiment = _run(run_files, tmp, "run", overrides)
  result = train(experiment, progress=False, log=lambda _: None, devices=ONE)
  return experiment, result


def test_a_run_writes_metrics_checkpoints_and_an_export_that_infer_captions_with(finished, run_files, tmp_path):
  experiment, result = finished
  run_dir = experiment.train.run_dir
  assert result.step == 6 and result.exit_code == 0 and result.export == os.path.join(run_dir, "export")
  curve = _curve(run_dir)
  assert [c[0] for c in curve] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(c[1]) for c in curve) and curve[-1][1] < curve[0][1]  # it learns the six captions
  assert curve[0][3] == 0.0 and curve[2][3] == pytest.approx(1e-3)  # warm-up 2, then the peak
  evals = [m for m in read_metrics(run_dir) if "eval/loss" in m]
  assert [m["step"] for m in evals] == [3, 6] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
  samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
  assert [s["step"] for s in samples] == [3, 6] and all(isinstance(s["text"], str) for s in samples)
  events = _events(os.path.join(run_dir, "tensorboard"))
  assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4, 5, 6]
  assert np.allclose([v for _, v in events["train/loss"]], [c[1] for c in curve], rtol=1e-6)
  assert [s for s, _ in events["eval/loss"]] == [3, 6]
  with open(os.path.join(run_dir, RUN_CONFIG)) as f:
    assert yaml.safe_load(f)["optimizer"]["learning_rate"] == 1e-3
  assert sorted(os.listdir(os.path.join(run_dir, CHECKPOINTS))) == ["3", "6"]

  # The export is the final state's params, at the checkpoint's shapes, and loads as a converted checkpoint does.
  model = dvl_jax.load(result.export)
  start = dvl_jax.load(run_files / "init")
  leaves = jax.tree_util.tree_leaves_with_path(model.params)
  assert any(not np.array_equal(a, b) for (_, a), b in zip(leaves, jax.tree.leaves(start.params)))
  assert jax.tree.map(np.shape, model.params) == jax.tree.map(np.shape, start.params)

  out = tmp_path / "captions.jsonl"
  subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--ckpt", result.export, "--images",
                  str(run_files / "data"), "--out", str(out), "--max-new-tokens", "4", "--no-progress"], check=True,
                 capture_output=True, text=True, env=ENV)
  lines = [json.loads(line) for line in open(out)]
  assert len(lines) == 6 and all(line["error"] is None and line["num_tokens"] >= 1 for line in lines)


def test_a_rerun_of_a_finished_run_trains_nothing_and_another_experiment_is_refused(finished):
  experiment, _ = finished
  run_dir = experiment.train.run_dir
  before = open(os.path.join(run_dir, "metrics.jsonl")).read()
  result = train(experiment, progress=False, log=lambda _: None, devices=ONE)
  assert result.step == 6 and result.export is None  # the export of the finished run is there already
  assert open(os.path.join(run_dir, "metrics.jsonl")).read() == before
  changed = load_experiment(os.path.join(run_dir, RUN_CONFIG), ["optimizer.learning_rate=0.01", "data.seq_len=256",
                                                                "data.buckets=[256]", "train.log_every=2"])
  with pytest.raises(ConfigError, match=r"holds another experiment(.|\n)*data.buckets.0: saved 192, now 256(.|\n)*"
                                        r"optimizer.learning_rate: saved 0.001, now 0.01") as e:
    train(changed, progress=False, devices=ONE)
  assert "log_every" not in str(e.value)  # how often to log may change between runs


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


# ----- errors before any compute -----
def test_missing_inputs_are_named_before_anything_is_written(run_files, tmp_path):
  experiment = _run(run_files, tmp_path, "run", ["data.sources.0.path=nope/train.jsonl", "model.init_from=nope/init"])
  with pytest.raises(FileNotFoundError, match=r"model.init_from: no directory 'nope/init'(.|\n)*"
                                              r"data.sources.0.path: no file 'nope/train.jsonl'"):
    train(experiment, progress=False, devices=ONE)
  assert not os.path.exists(experiment.train.run_dir)


def test_an_init_checkpoint_of_another_architecture_is_refused(run_files, tmp_path):
  experiment = _run(run_files, tmp_path, "run", ["model.preset=tiny"])
  with pytest.raises(ConfigError, match=r"is not a 'tiny' model(.|\n)*text.vocab_size: preset 256, checkpoint"):
    train(experiment, progress=False, devices=ONE)
  assert not os.path.exists(experiment.train.run_dir)


def test_a_batch_that_does_not_divide_over_the_data_parallel_devices_is_refused(run_files, tmp_path):
  experiment = _run(run_files, tmp_path, "run", ["data.batch_size=6"], mesh="data=4", microbatches=1)
  with pytest.raises(ConfigError, match=r"data.batch_size=6 does not divide over the 4 data-parallel shards(.|\n)*"
                                        r"give a multiple of 4"):
    train(experiment, progress=False, devices=jax.devices()[:4])
  experiment = _run(run_files, tmp_path, "run2", ["data.batch_size=4"], mesh="data=2", microbatches=4)
  with pytest.raises(ConfigError, match=r"times train.microbatches=4 .*give a multiple of 8"):
    train(experiment, progress=False, devices=jax.devices()[:2])


def test_a_run_directory_in_use_is_refused(run_files, tmp_path):
  experiment = _run(run_files, tmp_path, "run")
  lock = RunLock(experiment.train.run_dir)  # another train.py, training there
  try:
    with pytest.raises(ConfigError, match=r"is in use by another train.py \(pid \d+\)"):
      train(experiment, progress=False, devices=ONE)
  finally:
    lock.release()
  assert not os.path.exists(os.path.join(experiment.train.run_dir, CHECKPOINTS))


def test_an_export_never_replaces_its_run(finished, tmp_path):
  experiment, _ = finished
  run_dir = experiment.train.run_dir
  for out in (run_dir, os.path.dirname(run_dir), os.path.join(run_dir, CHECKPOINTS, "x")):
    with pytest.raises(ValueError, match="would replace the run directory"):
      export_run(run_dir, out, overwrite=True)
  with pytest.raises(FileNotFoundError, match="not a train.py run directory"):
    export_run(str(tmp_path), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / CHECKPOINTS)
  out = export_run(run_dir, str(tmp_path / "step3"), step=3, log=lambda *_: None)
  assert dvl_jax.load(out).config.text == dvl_jax.load(os.path.join(run_dir, "export")).config.text
