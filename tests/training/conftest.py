import json
import os
import shutil

import pytest

from reference import DATA, converted, hf_model, hf_model_for_processor, hf_processor

IMAGES = ("dog_a.png", "chart.png", "monday.jpg", "logo.png", "app.png", "rap.jpeg")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(a tiny random transformers DeepSeek-VL ("gqa"), ours converted from it as a user's checkpoint)."""
  ref = hf_model("gqa")
  return ref, converted(ref, tmp_path_factory)


@pytest.fixture(scope="session")
def run_files(tmp_path_factory):
  """What a user has before `train.py`: a tiny transformers model with its processor (16 tokens and 32 px an
  image) saved as -hf files ("hf"), that model converted ("init"), a captions file over six real images and a
  held-out one ("data/train.jsonl", "data/eval.jsonl"), and a YAML experiment over them (`experiment_yaml`)."""
  from dvl_jax.convert import convert_checkpoint

  root = tmp_path_factory.mktemp("run_files")
  hf = root / "hf"
  processor = hf_processor(str(hf), num_image_tokens=16, size=32)
  hf_model_for_processor(processor, str(hf))
  convert_checkpoint(str(hf), str(root / "init"), log=lambda *_: None)
  data = root / "data"
  data.mkdir()
  for name in IMAGES:
    shutil.copy(os.path.join(DATA, name), data / name)
  with open(data / "train.jsonl", "w", encoding="utf-8") as f:
    for i, name in enumerate(IMAGES):
      f.write(json.dumps({"image": name, "caption": f"picture {i}: {name.split('.')[0]}"}) + "\n")
  with open(data / "eval.jsonl", "w", encoding="utf-8") as f:
    for name in IMAGES[:2]:
      f.write(json.dumps({"image": name, "caption": f"held out {name}"}) + "\n")
  return root
