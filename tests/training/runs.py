"""Helpers of the train.py tests: a YAML experiment over the `run_files` fixture (conftest.py)."""

import yaml


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
