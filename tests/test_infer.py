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
from PIL import Image

from dvl_jax.convert import convert_checkpoint
from reference import DATA, hf_model_for_processor, hf_processor

pytestmark = pytest.mark.slow  # each test runs infer.py on a converted model (5-15 s)

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

  # A rerun retries the two failed images (they fail again: exit 1, a new line each, the captions untouched).
  args = ["--ckpt", ckpt, "--images", images, "--out", out, "--prompt", PROMPT, "--batch-size", 2,
          "--max-new-tokens", 6, "--no-progress"]
  again = _run(*args)
  assert again.returncode == 1, again.stderr
  assert "0 captioned, 2 failed (2 retried), 6 already done" in again.stderr
  assert len(_lines(out)) == len(expected_images) + 2
  skip = _run(*args, "--no-retry-errors")
  assert skip.returncode == 1, skip.stderr  # still failed, though not tried: the exit status says so
  assert "0 captioned, 0 failed, 8 already done, 2 failed earlier and not retried" in skip.stderr
  assert len(_lines(out)) == len(expected_images) + 2
  # Once the file is fixed, a rerun captions it; its last line is the one that counts.
  shutil.copy(os.path.join(DATA, "rap.jpeg"), images / "truncated.jpg")
  os.remove(images / "not_an_image.png")
  fixed = _run(*args)
  assert fixed.returncode == 0, fixed.stderr
  assert "1 captioned, 0 failed (1 retried), 6 already done" in fixed.stderr
  last = {}
  for row in _lines(out):
    last[os.path.relpath(row["image"], images)] = row
  assert last["truncated.jpg"]["error"] is None and last["truncated.jpg"]["caption"] == last["nested/rap.jpeg"][
      "caption"]


def test_failed_images_are_named_and_warnings_recorded(tiny, tmp_path, capsys, monkeypatch):
  _, _, ckpt = tiny
  images = tmp_path / "images"
  images.mkdir()
  Image.open(os.path.join(DATA, "logo.png")).convert("RGB").resize((40, 32)).save(images / "a_good.png")
  Image.new("RGB", (48, 40), (200, 30, 30)).save(images / "b_large.png")  # over the (lowered) warning limit
  (images / "c_empty.jpg").write_bytes(b"")
  for i in range(6):
    (images / f"d_text_{i}.png").write_text("not an image")
  # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; lowered so a small image warns.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 48 * 40 - 1)
  out = tmp_path / "out.jsonl"
  code = _infer_module().main([str(a) for a in ["--ckpt", ckpt, "--images", images, "--out", out,
                                                "--max-new-tokens", 2, "--batch-size", 2]])
  assert code == 1
  err = capsys.readouterr().err
  rows = {os.path.basename(r["image"]): r for r in _lines(out)}
  assert rows["a_good.png"]["error"] is None and "warning" not in rows["a_good.png"]
  assert rows["b_large.png"]["error"] is None and "DecompressionBombWarning" in rows["b_large.png"]["warning"]
  assert "DecompressionBombWarning" not in err  # recorded, not printed through the progress bar
  assert "c_empty.jpg" in rows["c_empty.jpg"]["error"] and "the file is empty" in rows["c_empty.jpg"]["error"]
  assert not any("BytesIO" in r["error"] for r in rows.values() if r["error"])
  # The terminal names the first five failures with their reasons, then points to the file for the rest.
  assert "7 image(s) without a caption:" in err
  assert re.search(r"c_empty\.jpg: ImageError: .*the file is empty", err)
  assert re.search(r"d_text_0\.png: ImageError: .*not an image file", err)
  assert "d_text_5.png" not in err and f"... and 2 more; see {out}" in err
  # One rate on the progress bar: ours (images/s and tokens/s), not tqdm's own as well.
  bar = [line for line in re.split(r"[\r\n]", err) if "/9 [" in line]
  assert bar and all(line.count("img/s") <= 1 and "it/s" not in line for line in bar)


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
  for flags, message in [(["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                         (["--batch-size", "0"], "--batch-size must be >= 1"),
                         (["--do-sample", "--temperature", "0"], "--temperature must be > 0 when sampling"),
                         (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
                         (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
                         (["--top-k", "-1"], "--top-k must be >= 0"),
                         (["--repetition-penalty", "0"], "--repetition-penalty must be > 0")]:
    with pytest.raises(SystemExit) as exit_:
      infer.main([str(a) for a in ["--ckpt", ckpt, "--images", image, "--out", tmp_path / "a.jsonl", *flags]])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "a.jsonl").exists()
  # A user's file passed as --out by mistake is refused, not truncated or appended to.
  photo = tmp_path / "photo.jpg"
  shutil.copy(os.path.join(DATA, "monday.jpg"), photo)
  manifest = tmp_path / "rows.jsonl"
  manifest.write_text(json.dumps({"image": image, "prompt": "Describe it."}) + "\n")
  other = tmp_path / "other.jsonl"
  other.write_text('{"id": 1}\n{"id": 2, "cut')
  for images, out, message in [(photo, photo, "is one of the inputs"), (manifest, manifest, "is one of the inputs"),
                               (image, photo, "not a result line of infer.py"),
                               (image, other, "not a result line of infer.py")]:
    before = out.read_bytes()
    assert infer.main([str(a) for a in ["--ckpt", ckpt, "--images", images, "--out", out]]) == 2
    assert re.search(message, capsys.readouterr().err), message
    assert out.read_bytes() == before
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
