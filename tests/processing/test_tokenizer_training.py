"""dvl_jax/processing/tokenizer_training.py: a processor directory for a model trained from scratch (the shapes
data's), read by ours and by transformers' alike."""

import numpy as np
import pytest
from transformers import DeepseekVLProcessor

from dvl_jax.data import shapes
from dvl_jax.processing import Processor
from dvl_jax.processing.tokenizer_training import train_tokenizer, write_processor


def test_processor_equals_transformers_and_round_trips(tmp_path):
  """transformers' DeepseekVLProcessor reads the files and gives the same ids and pixels as ours for a
  multi-turn chat; every training text decodes to itself."""
  shapes.write_split(str(tmp_path), "train", 40, seed=1)
  shapes.write_split(str(tmp_path), "test", 1, seed=1)
  d = str(tmp_path / "processor")
  write_processor(d, shapes.training_texts(str(tmp_path / "train.jsonl")), image_size=128, num_image_tokens=64,
                  vocab_size=512)
  ours, ref = Processor.from_pretrained(d), DeepseekVLProcessor.from_pretrained(d)
  tok = ours.tokenizer
  assert (tok.bos_token_id, tok.eos_token_id, tok.image_token_id) == (0, 1, 2) and ours.num_image_tokens == 64
  assert tok.vocab_size <= 512
  record = shapes.read_split(str(tmp_path / "test.jsonl"))[0]
  conv = [{"role": "user", "content": [{"type": "image", "path": record["image"]},
                                       {"type": "text", "text": shapes.CAPTION_PROMPT}]},
          {"role": "assistant", "content": [{"type": "text", "text": record["caption"]}]},
          {"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]}]
  want = ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                 return_tensors="np")
  got = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
  np.testing.assert_allclose(got["pixel_values"][:, 0], want["pixel_values"].transpose(0, 2, 3, 1), atol=1e-6)
  for text in shapes.training_texts(str(tmp_path / "train.jsonl")):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and tok.image_token_id not in ids


def test_a_vocabulary_too_small_for_the_bytes_is_refused():
  with pytest.raises(ValueError, match="cannot hold the 256 bytes"):
    train_tokenizer(["a red circle"], vocab_size=200)
