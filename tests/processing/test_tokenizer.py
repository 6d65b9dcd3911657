"""The tokenizer against transformers' (byte-level BPE with DeepSeek's special tokens), and sentencepiece."""

import numpy as np
import pytest

from dvl_jax.processing.tokenizer import Tokenizer
from reference import BOS, EOS, IMAGE, write_tokenizer

TEXTS = [
    "User: Describe this image.",
    "  leading and trailing spaces  ",
    "Ünïcödé: café, 東京 🙂 tabs\tand\nnewlines",
    f"{IMAGE}{IMAGE} two images, then text",
    f"text{EOS}after the end marker",
    "",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  return write_tokenizer(str(d)), Tokenizer(d)


def test_ids_equal_transformers(tokenizers):
  ref, ours = tokenizers
  for text in TEXTS:
    assert ours.encode(text) == ref(text).input_ids, text
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
  assert ours.encode("x")[0] == ours.bos_token_id == ref.bos_token_id


def test_special_tokens_come_from_the_files(tokenizers):
  ref, ours = tokenizers
  assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.image_token) == (BOS, EOS, EOS, IMAGE)
  assert ours.image_token_id == ref.convert_tokens_to_ids(IMAGE) != 100015
  assert ours.encode(IMAGE * 5, add_special_tokens=False) == [ours.image_token_id] * 5


def test_batch_decode_equals_transformers(tokenizers):
  ref, ours = tokenizers
  rng = np.random.default_rng(0)
  seqs = [ref(t).input_ids + [ref.eos_token_id] for t in TEXTS] + [rng.integers(0, ours.vocab_size, 30).tolist()]
  for skip in (True, False):
    assert ours.batch_decode(seqs, skip_special_tokens=skip) == ref.batch_decode(seqs, skip_special_tokens=skip)


def test_sentencepiece_model_loads(tmp_path):
  import sentencepiece as spm

  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog", "describe this image please"] * 50))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=33,
                                 user_defined_symbols=[IMAGE], bos_id=1, eos_id=2, unk_id=0)
  (tmp_path / "tokenizer_config.json").write_text(f'{{"bos_token": "<s>", "eos_token": "</s>", "image_token": "{IMAGE}"}}')
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
  tok = Tokenizer(tmp_path)
  assert tok.bos_token_id == 1 and tok.image_token_id == sp.piece_to_id(IMAGE)
  ids = tok.encode(f"describe {IMAGE}{IMAGE} the dog")
  assert ids[0] == 1 and ids.count(tok.image_token_id) == 2
  assert tok.decode(ids) == sp.decode(ids[1:])


def test_missing_tokenizer_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="expected tokenizer.json"):
    Tokenizer(tmp_path)
