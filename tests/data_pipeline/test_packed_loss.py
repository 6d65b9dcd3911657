"""End to end, files on disk -> the batch the train step takes -> the loss: a packed row's loss equals the sum of
its samples' losses, each computed alone (attention does not cross samples, positions restart, no sample is
predicted from the one before), for each attention implementation; and each sample's loss equals transformers'
`model(labels=...)` on the same tokens and images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dvl_jax
from dvl_jax.convert import convert_checkpoint
from dvl_jax.data import DataConfig, DataIterator, SourceConfig
from dvl_jax.nn.vlm import DeepseekVL
from dvl_jax.processing import Processor
from dvl_jax.sharding import ShardingPlan
from dvl_jax.training import (IGNORE, Batch, abstract_train_state, init_train_state, jit_train_step, loss_fn,
                              paper_config, place_batch)
from data_pipeline.conftest import write_jsonl
from reference import hf_model_for_processor, hf_processor, to_torch_images


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(our Processor, our Model, the transformers model) of one tiny random checkpoint, 16 tokens an image."""
  d = tmp_path_factory.mktemp("ckpt")
  ref = hf_model_for_processor(hf_processor(str(d / "hf"), num_image_tokens=16, size=32), str(d / "hf"))
  convert_checkpoint(d / "hf", d / "dvl", log=lambda *_: None)
  return Processor.from_pretrained(d / "dvl"), dvl_jax.load(d / "dvl"), ref


def _alone(ids, loss_mask, pixels, length=512, slots=4):
  """One sample as a one-row Batch, right-padded to `length` tokens and `slots` images (one shape for all, one
  compile)."""
  n, pad = len(ids), length - len(ids)
  images = np.zeros((1, slots, *pixels.shape[1:]), np.float32)
  images[0, :len(pixels)] = pixels
  return Batch(input_ids=np.pad(ids, (0, pad))[None], attention_mask=np.pad(np.ones(n, np.int32), (0, pad))[None],
               loss_mask=np.pad(loss_mask, (0, pad))[None], positions=np.pad(np.arange(n, dtype=np.int32), (0, pad))[None],
               pixel_values=images)


def _torch_loss_sum(ref, ids, loss_mask, pixels, image_token_id):
  labels = np.where(loss_mask.astype(bool) & (ids != image_token_id), ids, IGNORE)
  labels[0] = IGNORE
  kwargs = {"pixel_values": to_torch_images(pixels[None], [len(pixels)])} if len(pixels) else {}
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids[None].astype(np.int64)), labels=torch.tensor(labels[None].astype(np.int64)),
              attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs)
  count = int((labels[1:] != IGNORE).sum())
  return float(out.loss) * count, count


@pytest.mark.slow
def test_packed_loss_equals_the_samples_losses_and_transformers(models, images, tmp_path):
  processor, model, ref = models
  image_id = processor.tokenizer.image_token_id
  caps = write_jsonl(tmp_path / "caps.jsonl", [{"image": n, "caption": f"Caption {i}."}
                                              for i, n in enumerate(["dog_a.png", "chart.png", "monday.jpg"])])
  llava = write_jsonl(tmp_path / "llava.jsonl", [
      {"image": ["dog_a.png", "chart.png"], "conversations": [
          {"from": "human", "value": "<image> and <image>: which is brighter?"}, {"from": "gpt", "value": "The first."},
          {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "More white."}]},
      {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}])
  config = DataConfig([SourceConfig(caps, "captions", images=str(images)),
                       SourceConfig(llava, "conversations", images=str(images))], batch_size=2, seq_len=512,
                      packing=True, max_images=4, group_by_modality=False, seed=1)
  with DataIterator(config, processor, process_index=0, process_count=1) as data:
    host = next(data)
  a = host.arrays
  assert (a["attention_mask"].max(axis=1) >= 2).all(), "each row should hold several samples"
  batch = host.to_batch()
  samples = []
  for r in range(a["input_ids"].shape[0]):
    k = 0
    for s in range(1, a["attention_mask"][r].max() + 1):
      at = a["attention_mask"][r] == s
      ids = a["input_ids"][r, at]
      n = int((ids == image_id).sum()) // 16
      samples.append((ids, a["loss_mask"][r, at], a["pixel_values"][r, k:k + n]))
      k += n
  for impl in ("cpu", "xla"):
    module = DeepseekVL(model.config.with_attention(impl))
    loss = jax.jit(lambda p, b, m=module: loss_fn(p, b, m, chunk_size=64))
    packed = loss(model.params, jax.tree.map(jnp.asarray, batch))
    alone = [loss(model.params, jax.tree.map(jnp.asarray, _alone(*x))) for x in samples]
    assert int(packed.count) == sum(int(x.count) for x in alone) > 0
    total = sum(float(x.sum) for x in alone)
    assert abs(float(packed.sum) - total) <= 1e-5 * abs(total), impl
  for (ids, mask, pixels), ours in zip(samples, alone):
    expected, count = _torch_loss_sum(ref, ids, mask, pixels, image_id)
    assert int(ours.count) == count
    assert abs(float(ours.sum) - expected) <= 1e-4 * abs(expected)
  # The batch as the train step takes it: placed (here on one device, 2 microbatches), one step: the same loss.
  plan, opt = ShardingPlan.single_device(), paper_config("S3", total_steps=1000)
  state = init_train_state(model.params, opt, like=abstract_train_state(model.config, plan, opt))
  step = jit_train_step(model.module, opt, microbatches=2, plan=plan, chunk_size=64)
  _, metrics = step(state, place_batch(plan, batch, microbatches=2))
  assert int(metrics["tokens"]) == int(packed.count)
  assert abs(float(metrics["loss"]) - total / int(packed.count)) <= 1e-5 * total / int(packed.count)
