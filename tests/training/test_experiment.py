"""Experiments from YAML: the sections, train.steps as the schedule's length, overrides, and each mistake named."""

import pytest

from dvl_jax.training.experiment import load_experiment
from dvl_jax.typed_config import ConfigError

YAML = """
model: {preset: tiny, processor: /ckpt/tokenizer, dtype: bfloat16, remat: save_dots}
data:
  batch_size: 8
  seq_len: 512
  packing: true
  sources:
    - {path: caps.jsonl, format: captions, weight: 0.3}
    - {path: text.jsonl, format: text, weight: 0.7}
optimizer:
  learning_rate: 2.0e-5
  schedule: cosine
  warmup_steps: 10
  stage: S3
  lr_multipliers: {"vision_model/.*": 0.1}
train: {steps: 100, run_dir: runs/s3, mesh: "fsdp=-1", microbatches: 2}
"""


def _load(tmp_path, overrides=(), text=YAML):
  path = tmp_path / "exp.yaml"
  path.write_text(text)
  return load_experiment(path, overrides)


def test_sections_and_train_steps_as_the_schedules_length(tmp_path):
  exp = _load(tmp_path)
  assert exp.model.preset == "tiny" and exp.model.dtype == "bfloat16" and exp.model.processor_dir == "/ckpt/tokenizer"
  assert exp.data.packing and [s.format for s in exp.data.sources] == ["captions", "text"]
  assert exp.data.text_share == pytest.approx(0.7)
  assert exp.optimizer.total_steps == 100 and exp.optimizer.lr_multipliers == (("vision_model/.*", 0.1),)
  assert exp.train.microbatches == 2 and exp.eval_data is None
  exp = _load(tmp_path, ["train.steps=2000", "data.sources.0.path=my.jsonl", "model.attention=xla"])
  assert (exp.train.steps, exp.optimizer.total_steps, exp.data.sources[0].path) == (2000, 2000, "my.jsonl")
  assert exp.model.attention == "xla"


@pytest.mark.parametrize("override, message", [
    ("optimiser.stage=S2", r"optimiser: unknown key. Did you mean 'optimizer'\? The keys of the config "
                           r"\(Experiment\) are: model, data, optimizer, train, eval_data."),
    ("optimizer.total_steps=5", r"optimizer.total_steps: set train.steps instead"),
    ("model.preset=huge", r"model: preset='huge' is not one of \["),
    ("model.remat=some", r"model: remat='some' is not one of \('none', 'full', 'save_dots'\)"),
    ("train.microbatches=3", r"data.batch_size=8 does not split into train.microbatches=3 equal parts"),
    ("train.eval_every=50", r"train.eval_every=50 needs eval_data"),
    ("train.steps=ten", r"train.steps: expected an integer, got 'ten' \(str\)"),
    ("optimizer.stage=S4", r"optimizer: Unknown training stage 'S4'"),
    ("data.batch_size=0", r"data: DataConfig.batch_size must be a positive integer; got 0"),
])
def test_each_mistake_is_named(tmp_path, override, message):
  with pytest.raises(ConfigError, match=message):
    _load(tmp_path, [override])


def test_a_missing_train_steps_says_so(tmp_path):
  with pytest.raises(ConfigError, match=r"train \(TrainSpec\) needs 'steps'."):
    _load(tmp_path, text=YAML.replace("steps: 100, ", ""))
