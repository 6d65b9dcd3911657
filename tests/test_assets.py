"""The checkpoint that ships in the package (dvl_jax/assets/shapes): the `shapes` architecture, small; the
bundled example images are held-out scenes of the generator; through infer.py with no --ckpt, it scores on
held-out scenes as the README reports. Expected text is the data generator's (tests/data/shapes_examples.jsonl,
each record a scene of the held-out split of seed 0), never the model's."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import dvl_jax
from dvl_jax import assets, checkpoint
from dvl_jax.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "images")
with open(os.path.join(ROOT, "tests", "data", "shapes_examples.jsonl"), encoding="utf-8") as _f:
  EXPECTED = [json.loads(line) for line in _f]


def test_the_shipped_checkpoint_is_the_shapes_model_and_small():
  ckpt = dvl_jax.default_checkpoint()
  saved = checkpoint.read_config(ckpt)
  assert saved.with_attention("auto").replace(dtype="float32", param_dtype="float32") == dvl_jax.shapes()
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(ckpt) for f in files)
  assert size <= 20 * 2**20, size


def test_the_examples_are_held_out_scenes_of_the_generator(tmp_path):
  """Regenerating the held-out split gives the examples' images and captions."""
  last = max(e["index"] for e in EXPECTED)
  shapes.write_split(str(tmp_path), "test", last + 1, seed=0)
  regenerated = shapes.read_split(str(tmp_path / "test.jsonl"))
  assert sorted(os.listdir(EXAMPLES)) == sorted(e["image"] for e in EXPECTED)
  for e in EXPECTED:
    r = regenerated[e["index"]]
    assert (e["caption"], e["questions"]) == (r["caption"], r["questions"])
    ours = np.asarray(Image.open(os.path.join(EXAMPLES, e["image"])), np.int16)
    assert np.abs(ours - np.asarray(Image.open(r["image"]), np.int16)).mean() < 1.0


# The shipped model's held-out score (README, "The shapes captioner"; configs/shapes/evaluate.py over the 500
# held-out images: captions 78.2%, count 94.4%, colour 70.3%, exists 51.8%, left 54.6%, all questions 67.8%; on
# the 48 scored here: captions 87.5%, count 100%, all questions 75.0%), less a margin. A broken processor,
# template or decoder falls to chance: count 33%, captions 0%.
FLOORS = {"caption": 0.7, "count": 0.85, "questions": 0.6}


@pytest.mark.slow
def test_infer_without_ckpt_describes_held_out_scenes(tmp_path):
  """infer.py with no --ckpt, on the first 48 held-out scenes (the examples among them), every prompt."""
  shapes.write_split(str(tmp_path), "test", 48, seed=0)
  records = shapes.read_split(str(tmp_path / "test.jsonl"))
  manifest, out = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
  with open(manifest, "w", encoding="utf-8") as f:
    for image, prompt, _, _ in shapes.expected_answers(records):
      f.write(json.dumps({"image": image, "prompt": prompt}) + "\n")
  run = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--images", str(manifest),
                        "--out", str(out), "--no-progress", "--batch-size", "32"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
  assert run.returncode == 0, run.stderr
  with open(out, encoding="utf-8") as f:
    got = {(r["image"], r["prompt"]): r["caption"] for r in map(json.loads, f)}
  result = shapes.score(records, got)
  assert result["caption"]["accuracy"] >= FLOORS["caption"], shapes.format_score(result)
  assert result["per_kind"]["count"]["accuracy"] >= FLOORS["count"], shapes.format_score(result)
  assert result["questions"]["accuracy"] >= FLOORS["questions"], shapes.format_score(result)


def test_a_missing_default_checkpoint_is_explained(monkeypatch, tmp_path):
  monkeypatch.setattr(assets, "SHAPES", str(tmp_path / "gone"))
  with pytest.raises(FileNotFoundError, match=r"default checkpoint is missing(.|\n)*give a checkpoint \(--ckpt\)"):
    dvl_jax.default_checkpoint()
