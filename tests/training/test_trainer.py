"""train.py's run (dvl_jax/training/trainer.py): from YAML and files on disk to an exported checkpoint that infer.py
captions with; a finished run rerun; the errors raised before any compute. (Resuming: test_trainer_resume.py.)"""

import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml

import dvl_jax
from dvl_jax.training.experiment import load_experiment
from dvl_jax.data.report import DataError
from dvl_jax.training.metrics import read_metrics
from dvl_jax.processing import Processor
from dvl_jax.training.trainer import CHECKPOINTS, RUN_CONFIG, RunLock, export_run, sample_generation_config, train
from dvl_jax.typed_config import ConfigError
from training.runs import ENV, ONE, ROOT, curve as _curve, experiment as _run

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
  """configs/tiny.yaml run from the repository (its paths are relative to it) on the fixture's model, with a
  held-out loss and its sample every 4 of its 8 steps, to its end."""
  tmp = tmp_path_factory.mktemp("finished")
  overrides = [f"model.init_from={run_files / 'init'}", f"train.run_dir={tmp / 'run'}", "data.seq_len=192",
               "data.buckets=[192]", "eval_data.sources.0.path=tests/data/captions.jsonl",
               "eval_data.sources.0.format=captions", "eval_data.batch_size=2", "eval_data.seq_len=192",
               "eval_data.buckets=[192]", "train.eval_every=4", "train.eval_steps=1", "train.sample_tokens=4"]
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(ROOT)
    experiment = load_experiment("configs/tiny.yaml", overrides)
    result = train(experiment, progress=False, log=lambda _: None, devices=ONE)
  return experiment, result


def test_a_run_writes_metrics_checkpoints_and_an_export_that_infer_captions_with(finished, run_files, tmp_path):
  experiment, result = finished
  run_dir = experiment.train.run_dir
  assert result.step == 8 and result.exit_code == 0 and result.export == os.path.join(run_dir, "export")
  curve = _curve(run_dir)
  assert [c[0] for c in curve] == list(range(1, 9))
  assert all(np.isfinite(c[1]) for c in curve) and curve[-1][1] < curve[0][1]  # it learns the seven captions
  assert curve[0][3] == 0.0 and curve[2][3] == pytest.approx(1e-3)  # warm-up 2, then the peak
  evals = [m for m in read_metrics(run_dir) if "eval/loss" in m]
  assert [m["step"] for m in evals] == [4, 8] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
  samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
  assert [s["step"] for s in samples] == [4, 8] and all(isinstance(s["text"], str) for s in samples)
  assert samples[0]["image"] == "tests/data/dog_a.png"
  events = _events(os.path.join(run_dir, "tensorboard"))
  assert [s for s, _ in events["train/loss"]] == list(range(1, 9))
  assert np.allclose([v for _, v in events["train/loss"]], [c[1] for c in curve], rtol=1e-6)
  assert [s for s, _ in events["eval/loss"]] == [4, 8]
  with open(os.path.join(run_dir, RUN_CONFIG)) as f:
    assert yaml.safe_load(f)["optimizer"]["learning_rate"] == 1e-3
  assert sorted(os.listdir(os.path.join(run_dir, CHECKPOINTS))) == ["4", "8"]

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
  assert len(lines) == 6 and all(line["error"] is None and line["num_tokens"] >= 1 for line in lines)  # 6 images


def test_a_rerun_of_a_finished_run_trains_nothing_and_another_experiment_is_refused(finished):
  experiment, _ = finished
  run_dir = experiment.train.run_dir
  before = open(os.path.join(run_dir, "metrics.jsonl")).read()
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(ROOT)
    result = train(experiment, progress=False, log=lambda _: None, devices=ONE)
  assert result.step == 8 and result.export is None  # the export of the finished run is there already
  assert open(os.path.join(run_dir, "metrics.jsonl")).read() == before
  changed = load_experiment(os.path.join(run_dir, RUN_CONFIG), ["optimizer.learning_rate=0.01", "data.seq_len=256",
                                                                "data.buckets=[256]", "train.log_every=2"])
  with pytest.raises(ConfigError, match=r"holds another experiment(.|\n)*data.buckets.0: saved 192, now 256(.|\n)*"
                                        r"optimizer.learning_rate: saved 0.001, now 0.01") as e, \
      pytest.MonkeyPatch.context() as patch:
    patch.chdir(ROOT)
    train(changed, progress=False, devices=ONE)
  assert "log_every" not in str(e.value)  # how often to log may change between runs


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


def test_a_processor_that_is_not_the_models_is_refused(run_files, tmp_path):
  """The shapes preset (64 tokens an image of 64 px, <image_placeholder> at id 2) with the tiny model's processor
  (16 tokens, 32 px)."""
  experiment = _run(run_files, tmp_path, "run", ["model.init_from=null", "model.preset=shapes",
                                                 f"model.processor={run_files / 'init'}"])
  with pytest.raises(ConfigError, match=r"is not the model's: it gives 16 tokens an image; the model takes 64; its "
                                        r"<image_placeholder> is id \d+; the model's image_token_id is 2(; [^;]*)?; it "
                                        r"makes images of 32 px; the model's tower takes 64"):
    train(experiment, progress=False, devices=ONE)
  assert not os.path.exists(experiment.train.run_dir)


def test_samples_stop_where_the_export_will(run_files, tmp_path):
  """Greedy samples end at the EOS of the processor's generation_config.json, or at its tokenizer's EOS."""
  processor = Processor.from_pretrained(run_files / "init")
  eos = processor.tokenizer.eos_token_id
  with open(run_files / "init" / "generation_config.json") as f:
    assert sample_generation_config(str(run_files / "init"), processor).eos_token_id == (json.load(f)["eos_token_id"],)
  bare = tmp_path / "bare"
  bare.mkdir()
  assert sample_generation_config(str(bare), processor).eos_token_id == (eos,)


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
  out = export_run(run_dir, str(tmp_path / "step4"), step=4, log=lambda *_: None)
  assert dvl_jax.load(out).config.text == dvl_jax.load(os.path.join(run_dir, "export")).config.text


def _flat_params(path) -> dict:
  params = dvl_jax.load(str(path)).params
  return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_a_bag_of_words_run_pretrains_the_tower_into_an_ordinary_export(run_files, tmp_path):
  """train.objective: bag_of_words (training/bag_of_words.py) through train.py: the loss is logged each step, the
  export opens as any checkpoint, its tower and aligner moved and its decoder is the init's; a typo is named."""
  experiment = _run(run_files, tmp_path, "bow", ["optimizer.stage=null",
                                                 'optimizer.trainable=["vision_model/.*", "aligner/.*"]'],
                    objective="bag_of_words")
  result = train(experiment, progress=False, devices=ONE)
  assert len(_curve(experiment.train.run_dir)) == 6 and all(np.isfinite(l) for _, l, _, _ in
                                                             _curve(experiment.train.run_dir))
  before, after = _flat_params(run_files / "init"), _flat_params(result.export)
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  assert any(k.startswith("vision_model/") for k in moved) and any(k.startswith("aligner/") for k in moved)
  assert not any(k.startswith("language_model/") for k in moved)
  with pytest.raises(ConfigError, match=r"objective='bag_of_word' is not one of \('next_token', 'bag_of_words', "):
    _run(run_files, tmp_path, "typo", objective="bag_of_word")


def test_region_words_on_data_without_regions_is_refused_at_its_first_log(run_files, tmp_path):
  """The run's captions carry no 'regions': the first logged step has nothing learned, and the run says why."""
  experiment = _run(run_files, tmp_path, "rw", ["optimizer.stage=null",
                                                'optimizer.trainable=["vision_model/.*", "aligner/.*"]'],
                    objective="region_words")
  with pytest.raises(DataError, match=r"No image token of the first 1 batch\(es\) lies in a grounding region(.|\n)*"
                                      r"records need 'regions'"):
    train(experiment, progress=False, devices=ONE)
