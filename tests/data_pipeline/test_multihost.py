"""The data pipeline over two processes (jax.distributed on localhost, 2 CPU devices each): each process's
DataIterator reads its share of every step, both pick the same modality, place_batch assembles the global batch
over the 4-device mesh, and the union of the two shares is exactly the one-process run's batch.
tests/data_pipeline/multihost_worker.py is the program each process runs."""

import json
import os
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from dvl_jax.data import DataIterator
from dvl_jax.data.mixture import is_text_step
from dvl_jax.processing import Processor
from multihost_worker import data_config
from reference import DATA, hf_processor

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
STEPS = 3
BUCKETS = (32, 64, 128, 256)
WORDS = ("the a dog cat runs over under chart shows sales rising falling in the morning logo app screen blue red "
         "green quickly slowly").split()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _seed_with_both_modalities() -> int:
  """A seed whose first STEPS steps (text share 0.5) hold a text step and a multimodal step."""
  return next(s for s in range(100) if len({is_text_step(i, s, 0.5, 0) for i in range(STEPS)}) == 2)


def _write_data(d) -> None:
  rng = random.Random(0)
  images = ["dog_a.png", "chart.png", "logo.png", "app.png"]
  for name in images:
    shutil.copy(os.path.join(DATA, name), d / name)
  # Lengths from a few tokens to past seq_len (truncated), so the rows of a batch fall in different buckets.
  with open(d / "text.jsonl", "w") as f:
    for _ in range(40):
      f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 4, 8, 16, 60])))})
              + "\n")
  with open(d / "captions.jsonl", "w") as f:
    for i in range(30):
      f.write(json.dumps({"image": images[i % len(images)],
                          "caption": " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 4, 8, 30])))})
              + "\n")
  with open(d / "settings.json", "w") as f:
    json.dump({"buckets": BUCKETS, "seed": _seed_with_both_modalities()}, f)


@pytest.mark.slow
def test_two_processes_read_the_one_process_stream(tmp_path):
  data_dir, proc_dir = tmp_path / "data", tmp_path / "processor"
  data_dir.mkdir()
  _write_data(data_dir)
  hf_processor(str(proc_dir), num_image_tokens=16, size=32)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(data_dir), str(proc_dir), str(tmp_path), str(port), str(i),
                             str(STEPS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"

  config = data_config(str(data_dir))
  processor = Processor.from_pretrained(proc_dir)
  # make_batch's padding, else 0; place_batch's of a shorter share: ids 0, masks 0, positions 1, no targets
  fill = {"input_ids": processor.tokenizer.pad_token_id, "positions": 1, "image_labels": -100}
  placed_fill = {"positions": 1, "image_labels": -100}
  one = DataIterator(config, processor, process_index=0, process_count=1)
  modalities, lengths = [], []
  for step in range(STEPS):
    single = next(one)
    got = [dict(np.load(tmp_path / f"p{p}_step{step}.npz")) for p in range(2)]
    modalities.append(single.modality)
    assert [str(g["modality"]) for g in got] == [single.modality] * 2, f"step {step}: the processes disagree"
    assert sorted(single.arrays) == sorted(k[len("local_"):] for k in got[0] if k.startswith("local_"))
    assert ("pixel_values" in single.arrays) == (single.modality == "multimodal")
    assert int(got[0]["samples"]) + int(got[1]["samples"]) == single.samples
    length = single.arrays["input_ids"].shape[1]
    lengths.append({g["local_input_ids"].shape[1] for g in got})
    for k, want in single.arrays.items():
      local = [g[f"local_{k}"] for g in got]
      assert all(x.shape[0] == config.batch_size // 2 for x in local)
      # Process p reads samples p, p + 2, ...: its row i is the one-process row p + 2 i. In padding mode each
      # process pads to the bucket of its own longest row, at most the one-process length.
      padded = [np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=fill.get(k, 0)) if want.ndim == 2
                else x for x in local]
      np.testing.assert_array_equal(np.stack(padded, axis=1).reshape(want.shape), want, err_msg=f"step {step}, {k}")
      # The global batch over the mesh, the same in both processes: process 0's rows, then process 1's, each
      # share padded by place_batch to the longest share.
      placed = [np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=placed_fill.get(k, 0))
                if want.ndim == 2 else x for x in local]
      for g in got:
        np.testing.assert_array_equal(g[f"global_{k}"], np.concatenate(placed), err_msg=f"step {step}, global {k}")
  one.close()
  assert set(modalities) == {"text", "multimodal"}
  assert any(len(x) > 1 for x in lengths), "no step had shares of different lengths: the test lost its point"
