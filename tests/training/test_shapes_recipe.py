"""configs/shapes/: the recipe of the shipped model, cut down (a small dataset, a few steps of each stage, its own
YAML files with overrides), so that it cannot rot: the four stages run on the data they name (stage 0 the
captions' grounding regions, stages 1 and 2 the captions, stage 3 the chats), each from the export of the one
before, and the loss falls."""

import os

import numpy as np
import pytest

from dvl_jax.data import shapes
from dvl_jax.training.experiment import load_experiment
from dvl_jax.training.trainer import train
from training.runs import ONE, ROOT, curve

pytestmark = pytest.mark.slow


def test_the_recipe_trains_its_four_stages_and_the_loss_falls(tmp_path):
  data = tmp_path / "shapes"
  shapes.write_dataset(str(data), train=96, eval=8, test=0, seed=5)
  common = ["data.batch_size=8", "train.log_every=1", "train.checkpoint_every=100"]
  captions = common + [f"data.sources.0.path={data / 'train_captions.jsonl'}", "data.buckets=[128]"]
  chats = common + [f"data.sources.0.path={data / 'train.jsonl'}", "data.buckets=[192]"]
  stage0 = load_experiment(os.path.join(ROOT, "configs/shapes/stage0_tower.yaml"), captions + [
      f"model.processor={data / 'processor'}", f"train.run_dir={tmp_path / 'stage0'}", "train.steps=12",
      "optimizer.warmup_steps=2"])
  assert stage0.train.objective == "region_words"
  assert train(stage0, progress=False, devices=ONE).export == str(tmp_path / "stage0" / "export")
  losses = [loss for _, loss, _, _ in curve(tmp_path / "stage0")]
  assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses

  stage1 = load_experiment(os.path.join(ROOT, "configs/shapes/stage1_aligner.yaml"), captions + [
      f"model.init_from={tmp_path / 'stage0' / 'export'}", f"train.run_dir={tmp_path / 'stage1'}", "train.steps=2",
      "optimizer.warmup_steps=1"])
  assert train(stage1, progress=False, devices=ONE).export == str(tmp_path / "stage1" / "export")

  stage2 = load_experiment(os.path.join(ROOT, "configs/shapes/stage2_pretrain.yaml"), captions + [
      f"model.init_from={tmp_path / 'stage1' / 'export'}", f"train.run_dir={tmp_path / 'stage2'}", "train.steps=2",
      "optimizer.warmup_steps=1"])
  assert train(stage2, progress=False, devices=ONE).export == str(tmp_path / "stage2" / "export")

  stage3 = load_experiment(os.path.join(ROOT, "configs/shapes/stage3_sft.yaml"), chats + [
      f"model.init_from={tmp_path / 'stage2' / 'export'}", f"train.run_dir={tmp_path / 'stage3'}",
      "train.steps=14", "optimizer.warmup_steps=2", "train.eval_every=0", "train.samples=[]",
      f"eval_data.sources.0.path={data / 'eval.jsonl'}"])
  result = train(stage3, progress=False, devices=ONE)
  losses = [loss for _, loss, _, _ in curve(tmp_path / "stage3")]
  assert len(losses) == 14 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
  assert os.path.isfile(os.path.join(result.export, "tokenizer.json"))

  # The alternative stage 3 (not shipped): the drill's chats and the captions, mixed.
  drill = load_experiment(os.path.join(ROOT, "configs/shapes/stage3_drill.yaml"), common + [
      f"data.sources.0.path={data / 'train_drill.jsonl'}", f"data.sources.1.path={data / 'train_captions.jsonl'}",
      f"model.init_from={tmp_path / 'stage2' / 'export'}", f"train.run_dir={tmp_path / 'stage3_drill'}",
      "train.steps=2", "optimizer.warmup_steps=1", "train.eval_every=0", "train.samples=[]",
      f"eval_data.sources.0.path={data / 'eval_drill.jsonl'}"])
  assert drill.optimizer.trainable and not any(t.startswith("vision") for t in drill.optimizer.trainable)
  assert train(drill, progress=False, devices=ONE).export == str(tmp_path / "stage3_drill" / "export")
