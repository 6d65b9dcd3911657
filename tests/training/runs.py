"""Helpers of the train.py tests: a YAML experiment over the `run_files` fixture (conftest.py), its loss curve."""

import os

import jax
import yaml

from dvl_jax.training.experiment import load_experiment
from dvl_jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
ONE = jax.devices()[:1]  # the runs' mesh is data=1; the tests' process has 8 simulated devices
# train.py in a subprocess: one CPU device, as the in-process runs use.
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def experiment_yaml(run_files, path, run_dir, **train) -> str:
  """A YAML experiment over `run_files`: S3 from the converted model, batches of 4 rows of up to 192 tokens,
  cosine with warm-up; `train` overrides keys of its train section."""
  config = {
      "model": {"init_from": str(run_files / "init"), "remat": "none"},
      "data": {"sources": [{"path": str(run_files / "data" / "train.jsonl"), "format": "captions",
                            "prompt": "Describe this image."}],
               "batch_size": 4, "seq_len": 192, "buckets": [192]},
      "optimizer": {"stage": "S3", "learning_rate": 1e-3, "schedule": "cosine", "warmup_steps": 2},
      "train": {"steps": 6, "run_dir": str(run_dir), "mesh": "data=1", "log_every": 1, "checkpoint_every": 3,
                **train},
  }
  with open(path, "w", encoding="utf-8") as f:
    yaml.safe_dump(config, f)
  return str(path)


def experiment(run_files, tmp_path, name, overrides=(), **train):
  """The Experiment of `experiment_yaml` in tmp_path/NAME.yaml, run_dir tmp_path/NAME, with `overrides`."""
  path = experiment_yaml(run_files, tmp_path / f"{name}.yaml", tmp_path / name, **train)
  return load_experiment(path, list(overrides))


def curve(run_dir) -> list[tuple]:
  """(step, loss, grad_norm, learning_rate) of every step in the run's metrics.jsonl."""
  return [(m["step"], m["loss"], m["grad_norm"], m["learning_rate"]) for m in read_metrics(str(run_dir))
          if "loss" in m]

