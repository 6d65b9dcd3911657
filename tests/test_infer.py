"""infer.py end to end: a tiny transformers model converted with convert/, real images, a corrupt file, a file
that is not an image; captions equal to transformers' greedy generate; resume after a kill; early errors."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dvl_jax.convert import convert_checkpoint
from reference import DATA, hf_model_for_processor, hf_processor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(ROOT, "infer.py")
IMAGES = ["monday.jpg", "dog_a.png", "app.png", "chart.png", "logo.png"]
PROMPT = "What is in this image?"


def _infer_module():
  spec = importlib.util.spec_from_file_location("infer", INFER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(transformers processor, transformers model, converted checkpoint): SigLIP at 32 px, 16 tokens per image."""
  tmp = tmp_path_factory.mktemp("infer")
  ref_proc = hf_processor(str(tmp / "hf"), num_image_tokens=16, size=32)
  model = hf_model_for_processor(ref_proc, str(tmp / "hf"), seed=1)
  convert_checkpoint(tmp / "hf", tmp / "dvl", log=lambda *_: None)
  return ref_proc, model, tmp / "dvl"


def _image_dir(path):
  """The test images, a truncated JPEG, a text file named like an image, and a text file."""
  path.mkdir()
  for name in IMAGES:
    shutil.copy(os.path.join(DATA, name), path / name)
  (path / "nested").mkdir()
  shutil.copy(os.path.join(DATA, "rap.jpeg"), path / "nested" / "rap.jpeg")
  with open(os.path.join(DATA, "rap.jpeg"), "rb") as f:
    (path / "truncated.jpg").write_bytes(f.read()[:4000])
  (path / "not_an_image.png").write_text("just text")
  (path / "notes.txt").write_text("a text file, not an image")
  return path


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, INFER, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_captions_equal_transformers_and_errors_get_a_line(tiny, tmp_path):
  ref_proc, ref_model, ckpt = tiny
  images = _image_dir(tmp_path / "images")
  out = tmp_path / "captions.jsonl"
  run = _run("--ckpt", ckpt, "--images", images, "--out", out, "--prompt", PROMPT, "--batch-size", 2,
             "--max-new-tokens", 6, "--no-progress")
  assert run.returncode == 1, run.stderr  # some images failed
  assert "Skipping 1 file(s) without an image extension" in run.stderr
  rows = {os.path.relpath(r["image"], images): r for r in _lines(out)}
  expected_images = set(IMAGES) | {"nested/rap.jpeg", "truncated.jpg", "not_an_image.png"}
  assert set(rows) == expected_images and len(_lines(out)) == len(expected_images)
  assert "truncated" in rows["truncated.jpg"]["error"] and rows["truncated.jpg"]["caption"] is None
  assert "not_an_image.png" in rows["not_an_image.png"]["error"]
  for name in IMAGES + ["nested/rap.jpeg"]:
    row = rows[name]
    assert row["error"] is None and row["prompt"] == PROMPT
    messages = [{"role": "user", "content": [{"type": "image", "path": str(images / name)},
                                             {"type": "text", "text": PROMPT}]}]
    inputs = ref_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    with torch.no_grad():
      generated = ref_model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert row["caption"] == ref_proc.decode(generated, skip_special_tokens=True), name
    assert row["num_tokens"] == len(generated)
    assert row["finish_reason"] == ("stop" if int(generated[-1]) == ref_proc.tokenizer.eos_token_id else "length")

  again = _run("--ckpt", ckpt, "--images", images, "--out", out, "--prompt", PROMPT, "--batch-size", 2,
               "--max-new-tokens", 6, "--no-progress")
  assert again.returncode == 0, again.stderr
  assert "0 captioned, 0 failed, 8 already done" in again.stderr
  assert len(_lines(out)) == len(expected_images)


def test_a_killed_run_resumes_without_losing_or_repeating(tiny, tmp_path):
  _, _, ckpt = tiny
  images = tmp_path / "images"
  images.mkdir()
  names = [f"{i:02d}_{n}" for i in range(3) for n in IMAGES]  # 15 images
  for name in names:
    shutil.copy(os.path.join(DATA, name[3:]), images / name)
  out = tmp_path / "captions.jsonl"
  args = ["--ckpt", ckpt, "--images", images, "--out", out, "--batch-size", 1, "--max-new-tokens", 4, "--no-progress"]
  proc = subprocess.Popen([sys.executable, INFER, *map(str, args)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (out.exists() and out.read_bytes().count(b"\n")):
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)  # no chance to clean up
  proc.wait()
  written = len(_lines(out))
  assert 1 <= written < len(names), "the run must be killed after its first batch and before its end"
  with open(out, "ab") as f:
    f.write(b'{"image": "/half/a/line')  # as if the kill had cut a write short
  rerun = _run(*args)
  assert rerun.returncode == 0, rerun.stderr
  assert f"{written} already done" in rerun.stderr
  rows = _lines(out)
  assert sorted(os.path.basename(r["image"]) for r in rows) == sorted(names)  # each image exactly once
  assert all(r["error"] is None for r in rows)


def test_bad_arguments_fail_before_any_work(tiny, tmp_path, capsys):
  _, _, ckpt = tiny
  infer = _infer_module()
  image = os.path.join(DATA, "monday.jpg")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.txt").write_text("no images here")
  cases = [
      (["--ckpt", tmp_path / "missing", "--images", image, "--out", tmp_path / "a.jsonl"], "No checkpoint directory"),
      (["--ckpt", ckpt, "--images", tmp_path / "nothing.jpg", "--out", tmp_path / "a.jsonl"],
       "No such image, directory, pattern or manifest"),
      (["--ckpt", ckpt, "--images", empty, "--out", tmp_path / "a.jsonl"], r"No images found .*1 file\(s\) without"),
      (["--ckpt", ckpt, "--images", str(tmp_path / "*.jpg"), "--out", tmp_path / "a.jsonl"], "matches no file"),
      (["--ckpt", ckpt, "--images", image, "--out", tmp_path / "no_dir" / "a.jsonl"], "does not exist; create it"),
  ]
  for argv, message in cases:
    assert infer.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), (message, err)
  assert not (tmp_path / "a.jsonl").exists()  # not even empty: the missing checkpoint fails after it is opened
  kept = tmp_path / "kept.jsonl"
  kept.write_text("")
  assert infer.main([str(a) for a in ["--ckpt", tmp_path / "missing", "--images", image, "--out", kept]]) == 2
  assert kept.exists()  # a file the user had is never removed


def test_a_jsonl_manifest_carries_prompts(tiny, tmp_path):
  _, _, ckpt = tiny
  manifest = tmp_path / "manifest.jsonl"
  manifest.write_text("\n".join(json.dumps(r) for r in [
      {"image": os.path.join(DATA, "monday.jpg"), "prompt": "Describe the weather."},
      {"image": os.path.join(DATA, "monday.jpg")},  # the same image with the default prompt: another task
      {"image": os.path.join(DATA, "chart.png"), "prompt": "Read the chart."}]) + "\n")
  out = tmp_path / "out.jsonl"
  run = _run("--ckpt", ckpt, "--images", manifest, "--out", out, "--max-new-tokens", 3, "--no-progress")
  assert run.returncode == 0, run.stderr
  got = [(os.path.basename(r["image"]), r["prompt"]) for r in _lines(out)]
  assert sorted(got) == sorted([("monday.jpg", "Describe the weather."), ("monday.jpg", "Describe this image."),
                                ("chart.png", "Read the chart.")])
  assert np.all([r["num_tokens"] == 3 or r["finish_reason"] == "stop" for r in _lines(out)])
