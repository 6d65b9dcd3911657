import json
import os
import shutil

import pytest

from dvl_jax.processing import Processor
from reference import DATA, hf_processor

TOKENS_PER_IMAGE, IMAGE_SIZE = 16, 32


@pytest.fixture(scope="session")
def processors(tmp_path_factory):
  """(transformers' DeepseekVLProcessor with the tiny tokenizer, ours loaded from its files); 16 tokens and
  32 px an image."""
  d = str(tmp_path_factory.mktemp("processor"))
  return hf_processor(d, num_image_tokens=TOKENS_PER_IMAGE, size=IMAGE_SIZE), Processor.from_pretrained(d)


@pytest.fixture(scope="session")
def processor(processors):
  return processors[1]


@pytest.fixture
def images(tmp_path):
  """A directory of images: two real PNGs, a JPEG, a corrupt file and a truncated JPEG."""
  d = tmp_path / "images"
  d.mkdir()
  for name in ("dog_a.png", "chart.png", "monday.jpg"):
    shutil.copy(os.path.join(DATA, name), d / name)
  (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
  data = (d / "monday.jpg").read_bytes()
  (d / "truncated.jpg").write_bytes(data[:len(data) // 3])
  return d


def write_jsonl(path, records) -> str:
  """Writes records (dicts, or raw strings written as they are) one a line."""
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
  return str(path)
