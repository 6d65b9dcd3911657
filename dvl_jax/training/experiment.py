"""An experiment: everything `train.py` runs, from a YAML file and `key.sub=value` overrides.

  experiment = load_experiment("configs/deepseek-vl-1.3b/stage3_sft.yaml",
                               ["data.sources.0.path=my.jsonl", "train.steps=2000"])

  model:      a preset, or `init_from` a converted checkpoint; compute dtype, attention, remat
  data:       dvl_jax.data.DataConfig (sources, batch_size: the global batch, seq_len, packing, ...)
  optimizer:  dvl_jax.training.OptimizerConfig without total_steps: the schedule runs over train.steps
  train:      steps, run_dir, mesh, microbatches, seed, the log / checkpoint / eval cadence
  eval_data:  an optional DataConfig of held-out sources

Every key is checked (dvl_jax.typed_config): an unknown one names the valid keys and the nearest; a wrong type
names the key, the value and the type expected; each section's own checks name their key.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from dvl_jax.config import ATTENTION_IMPLS, PRESETS
from dvl_jax.data.config import DataConfig
from dvl_jax.nn.remat import REMAT_POLICIES
from dvl_jax.training.optimizer import OptimizerConfig
from dvl_jax.training.step import OBJECTIVES
from dvl_jax.typed_config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The model to train.

  Attributes:
    preset: a dvl_jax preset name: the architecture. Alone, the run starts from random weights (`train.seed`).
    init_from: a converted dvl_jax checkpoint (params/, dvl_config.json) whose weights start the run. With a
      preset too, the checkpoint's architecture must be the preset's (the run refuses a mismatch before any
      compute, naming the fields).
    processor: the directory of the tokenizer and processor files; None: `init_from`'s.
    dtype: the compute dtype; the params and optimizer state stay float32.
    attention: the attention implementation (dvl_jax.config.ATTENTION_IMPLS).
    remat: the rematerialisation policy (dvl_jax.nn.remat.REMAT_POLICIES).
  """

  preset: str | None = None
  init_from: str | None = None
  processor: str | None = None
  dtype: str = "float32"
  attention: str = "auto"
  remat: str = "full"

  def __post_init__(self):
    if self.preset is None and self.init_from is None:
      raise ValueError("give preset (an architecture, randomly initialised: one of " + ", ".join(sorted(PRESETS)) +
                       ") or init_from (a converted checkpoint), or both (the checkpoint must be of the preset)")
    if self.preset is not None and self.preset not in PRESETS:
      raise ValueError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
    if self.init_from is None and self.processor is None:
      raise ValueError("a preset model needs processor: the directory of its tokenizer and processor files")
    for name, valid in (("dtype", DTYPES), ("attention", ATTENTION_IMPLS), ("remat", tuple(REMAT_POLICIES))):
      if getattr(self, name) not in valid:
        raise ValueError(f"{name}={getattr(self, name)!r} is not one of {valid}")

  @property
  def processor_dir(self) -> str:
    return self.processor if self.processor is not None else self.init_from


@dataclasses.dataclass(frozen=True)
class Sample:
  """An image (a path, relative to the working directory; None: text only) and a prompt to caption."""

  prompt: str
  image: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """The run.

  Attributes:
    steps: optimizer steps; the learning-rate schedule spans them.
    objective: what the run learns (dvl_jax.training.OBJECTIVES): "next_token", the answers' next-token
      cross-entropy (DeepSeek-VL's stages); "bag_of_words", the words of each sample's answers predicted from
      its images alone; "region_words", each image token in a grounding region predicts the region's words
      (vision pretraining of a tower trained from scratch: training/bag_of_words.py, region_words.py).
    run_dir: where checkpoints, metrics.jsonl, skipped.jsonl and the resolved config go.
    mesh: the device mesh (dvl_jax.ShardingPlan's spec, e.g. "fsdp=-1" or "data=2,fsdp=4"), over every device
      of every process.
    strategy, vision_strategy: how the decoder and the image towers lie on the mesh (dvl_jax.sharding); None:
      the mesh's default (every axis of size > 1 used).
    microbatches: gradient accumulation steps within a step.
    seed: the params' init (preset models) and anything else random; the data has its own (data.seed).
    log_every, checkpoint_every, eval_every: cadences in steps (eval 0: never).
    keep_checkpoints: the most recent checkpoints kept.
    eval_steps: batches of eval_data per evaluation (the same batches each time).
    samples: images and prompts captioned greedily at each evaluation, into samples.jsonl and the log.
    sample_tokens: the most tokens generated per sample.
    export: write an inference checkpoint (params/, dvl_config.json, tokenizer and processor files) to
      run_dir/export when the run completes.
  """

  steps: int
  run_dir: str
  objective: str = "next_token"
  mesh: str = "fsdp=-1"
  strategy: str | None = None
  vision_strategy: str | None = None
  microbatches: int = 1
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  eval_every: int = 0
  eval_steps: int = 10
  samples: tuple[Sample, ...] = ()
  sample_tokens: int = 32
  export: bool = True

  def __post_init__(self):
    for name in ("steps", "microbatches", "log_every", "checkpoint_every", "keep_checkpoints", "eval_steps",
                 "sample_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.eval_every < 0:
      raise ValueError(f"eval_every must be >= 0 (0: no evaluation), got {self.eval_every}")
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective={self.objective!r} is not one of {tuple(OBJECTIVES)}")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A whole experiment (see the module doc)."""

  model: ModelSpec
  data: DataConfig
  optimizer: OptimizerConfig
  train: TrainSpec
  eval_data: DataConfig | None = None

  def __post_init__(self):
    if self.data.batch_size % self.train.microbatches:
      raise ValueError(f"data.batch_size={self.data.batch_size} does not split into train.microbatches="
                       f"{self.train.microbatches} equal parts")
    if self.train.eval_every and self.eval_data is None and not self.train.samples:
      raise ValueError(f"train.eval_every={self.train.eval_every} needs eval_data (held-out sources) or "
                       "train.samples (images and prompts to caption)")


def load_experiment(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Experiment:
  """The Experiment of a YAML file with `key.sub=value` overrides. Raises ConfigError naming the key."""
  raw = apply_overrides(load_yaml(path), list(overrides))
  return experiment_from_dict(raw)


def experiment_from_dict(raw: dict[str, Any]) -> Experiment:
  """A raw config (as YAML gives it) -> Experiment; optimizer.total_steps comes from train.steps."""
  optimizer, train = raw.get("optimizer"), raw.get("train")
  if isinstance(optimizer, dict) and isinstance(train, dict):
    if "total_steps" in optimizer:
      raise ConfigError("optimizer.total_steps: set train.steps instead (the schedule spans the run's steps).")
    steps = from_dict(TrainSpec, train, "train").steps  # checked first: the optimizer's schedule takes it
    raw = {**raw, "optimizer": {**optimizer, "total_steps": steps}}
  return from_dict(Experiment, raw)


def experiment_to_dict(experiment: Experiment) -> dict[str, Any]:
  """The resolved config as plain data (what config.yaml and each checkpoint keep); `experiment_from_dict` and
  `load_experiment` read it back (optimizer.total_steps is left out: train.steps gives it)."""
  raw = to_dict(experiment)
  raw["optimizer"].pop("total_steps")
  return raw

