"""Grounding regions (dvl_jax/data/regions.py): boxes placed on the grid of the processor's own preprocessing,
words dealt out to their cells, records parsed and checked, and the targets carried to the batches, packed."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dvl_jax.data import DataConfig, DataIterator, SourceConfig
from dvl_jax.data.examples import make_example
from dvl_jax.data.formats import BadRecord, parse
from dvl_jax.data.regions import NO_TARGET, Region, cell_centres, image_token_labels
from dvl_jax.processing import Processor
from dvl_jax.processing.tokenizer_training import write_processor
from dvl_jax.training.loss import IGNORE

WORDS = ["red circle", "blue square", "a green triangle", "and"] * 20


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
  """A 64 px processor with 8 x 8 image tokens (the shapes model's grid), its tokenizer trained on WORDS."""
  d = str(tmp_path_factory.mktemp("processor"))
  write_processor(d, WORDS, image_size=64, num_image_tokens=64, vocab_size=300)
  return Processor.from_pretrained(d)


@pytest.mark.parametrize("size", [(100, 70), (70, 100), (64, 64), (33, 90)])
def test_cells_land_where_the_processor_puts_the_box(processor, size):
  """A red box drawn into an image: the preprocessed pixel under each cell's centre is red exactly where the
  centre, mapped back by cell_centres, lies in the box (cells within 1.5 px of its edges aside: resampling)."""
  w, h = size
  box = (0.2 * w, 0.15 * h, 0.65 * w, 0.7 * h)
  image = Image.new("RGB", size, (255, 255, 255))
  ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 0, 0))
  pixels = processor.preprocess_images([image])["pixel_values"][0]  # [64, 64, 3] in [-1, 1]
  cfg = processor.image_config
  centres = cell_centres(size, cfg.size, 8, cfg.min_size, cfg.rounding)  # [64, 2]
  seen = pixels[4::8, 4::8].reshape(64, 3)  # the pixel right of and below each cell's centre
  red = (seen[:, 0] > 0.5) & (seen[:, 1] < -0.5)
  margin = 1.5 * max(w, h) / 64
  clear = ((np.abs(centres[:, 0, None] - np.asarray([box[0], box[2]])) > margin).all(-1)
           & (np.abs(centres[:, 1, None] - np.asarray([box[1], box[3]])) > margin).all(-1))
  inside = ((centres[:, 0] >= box[0]) & (centres[:, 0] < box[2]) & (centres[:, 1] >= box[1])
            & (centres[:, 1] < box[3]))
  np.testing.assert_array_equal(red[clear], inside[clear])
  assert inside[clear].sum() >= 4 and (~inside[clear]).sum() >= 4


def test_words_are_dealt_to_the_cells_of_the_smallest_box(processor):
  ids = lambda text: processor.tokenizer.encode(" " + text, add_special_tokens=False)  # noqa: E731
  regions = [Region(0, (0, 0, 64, 64), "and"), Region(0, (8, 8, 40, 24), "red circle")]
  labels = image_token_labels(regions, (64, 64), processor.image_config, 8, ids).reshape(8, 8)
  words = np.asarray(ids("red circle"))
  assert len(words) >= 2
  np.testing.assert_array_equal(labels[1:3, 1:5].ravel(), words[np.arange(8) % len(words)])  # row-major, in turn
  outer = np.ones((8, 8), bool)
  outer[1:3, 1:5] = False
  other = np.asarray(ids("and"))
  np.testing.assert_array_equal(labels[outer], other[np.arange(outer.sum()) % len(other)])
  assert (image_token_labels(regions[1:], (64, 64), processor.image_config, 8, ids).reshape(8, 8)[outer]
          == NO_TARGET).all()
  assert NO_TARGET == IGNORE


def _record(image, regions=None, **kw):
  record = {"image": image, "conversations": [{"from": "human", "value": "<image>\nDescribe this image."},
                                              {"from": "gpt", "value": "a red circle"}], **kw}
  if regions is not None:
    record["regions"] = regions
  return record


@pytest.mark.parametrize("regions, message", [
    ({"box": [0, 0, 1, 1]}, "'regions' must be a list"),
    ([{"box": [0, 0, 1], "text": "x"}], r"region 0 needs 'box': \[x0, y0, x1, y1\]"),
    ([{"box": [5, 0, 1, 1], "text": "x"}], "x0 < x1"),
    ([{"box": [0, 0, 1, 1], "text": " "}], "region 0 needs 'text'"),
    ([{"box": [0, 0, 1, 1], "text": "x"}, {"box": [0, 0, 1, 1], "text": "y", "image": 1}],
     r"region 1 is of image 1; the record has 1 image\(s\)"),
])
def test_bad_regions_are_named(regions, message):
  with pytest.raises(BadRecord, match=message):
    parse(_record("a.png", regions), SourceConfig("x.jsonl", "conversations"))


def test_examples_and_packed_batches_carry_each_samples_targets(processor, tmp_path):
  """Records with and without regions, packed two a row: each image token's target in the batch is the one its
  example computed from the image's own size; the text tokens and the samples without regions have none."""
  for i, size in enumerate([(80, 60), (50, 90), (64, 64)]):
    Image.new("RGB", size, (200, 200, 200)).save(tmp_path / f"{i}.png")
  records = [_record("0.png", [{"box": [10, 10, 50, 40], "text": "red circle"}]),
             _record("1.png"),
             _record("2.png", [{"box": [0, 0, 30, 64], "text": "blue square"},
                               {"box": [30, 0, 64, 64], "text": "a green triangle"}])]
  with open(tmp_path / "r.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  source = SourceConfig(str(tmp_path / "r.jsonl"), "conversations", images=str(tmp_path))
  examples = [make_example(parse(r, source), processor, seq_len=256, max_images=1, overlong="drop")
              for r in records]
  assert examples[1].image_labels is None
  is_image = examples[0].ids == processor.tokenizer.image_token_id
  ids = lambda text: processor.tokenizer.encode(" " + text, add_special_tokens=False)  # noqa: E731
  np.testing.assert_array_equal(
      examples[0].image_labels[is_image],
      image_token_labels([Region(0, (10, 10, 50, 40), "red circle")], (80, 60), processor.image_config, 8, ids))
  assert (examples[0].image_labels[~is_image] == NO_TARGET).all()
  assert (examples[2].image_labels[examples[2].ids == processor.tokenizer.image_token_id] != NO_TARGET).all()

  config = DataConfig([source], batch_size=1, seq_len=256, packing=True, max_images=2, shuffle=False)
  with DataIterator(config, processor, process_index=0, process_count=1) as data:
    rows = [next(data).arrays for _ in range(3)]
  got = [(a["input_ids"][0][a["attention_mask"][0] == s], a["image_labels"][0][a["attention_mask"][0] == s])
         for a in rows for s in range(1, a["attention_mask"][0].max() + 1)]
  for e in examples:
    want = e.image_labels if e.image_labels is not None else np.full(len(e.ids), NO_TARGET)
    assert any(len(g) == len(e.ids) and (g == e.ids).all() and (labels == want).all() for g, labels in got)
  assert all((a["image_labels"][0][a["attention_mask"][0] == 0] == NO_TARGET).all() for a in rows)
