"""The streamed pieces, joined, are transformers' decode of the same ids, and no piece holds half a character."""

import random

import pytest

from dvl_jax.chat import IncrementalDetokenizer
from dvl_jax.processing.tokenizer import Tokenizer
from dvl_jax.testing import write_tokenizer

TEXT = "Ünïcödé: café, 東京 and 你好 🙂🙂 in 12 años; the red circle\tand  spaces."


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  """(ours, transformers') over one byte-level BPE, trained on a corpus where the CJK and emoji are not merged:
  their tokens are bytes, so a character spans several tokens."""
  directory = str(tmp_path_factory.mktemp("tok"))
  reference = write_tokenizer(directory)
  return Tokenizer(directory), reference


def _stream(detokenizer, ids):
  pieces = [detokenizer.push(i) for i in ids]
  return pieces + [detokenizer.flush()]


def test_pieces_join_to_transformers_decode_and_never_split_a_character(tokenizers):
  ours, reference = tokenizers
  ids = ours.encode(TEXT, add_special_tokens=False)
  assert len(ids) > len(TEXT) // 2  # many multi-byte characters are several tokens
  detokenizer = IncrementalDetokenizer(ours)
  pieces, joined = [], ""
  for n, token in enumerate(ids, 1):
    piece = detokenizer.push(token)
    pieces.append(piece)
    joined += piece
    assert "\ufffd" not in piece
    # Everything decodable is out at once: what is held back is only an unfinished character.
    assert joined == reference.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd")
  assert joined + detokenizer.flush() == reference.decode(ids, skip_special_tokens=True) == TEXT
  assert sum(p == "" for p in pieces) >= 4  # the bytes of 東, 京, 你, 好 and 🙂 were held back


@pytest.mark.parametrize("seed", range(5))
def test_random_ids_with_special_tokens_and_broken_bytes(tokenizers, seed):
  """A random model's stream: any ids, special ones among them, invalid UTF-8 included; the pieces still join to
  the full decode (replacement characters where the reference has them)."""
  ours, reference = tokenizers
  rng = random.Random(seed)
  ids = [rng.randrange(ours.vocab_size) for _ in range(200)]
  detokenizer, joined = IncrementalDetokenizer(ours), ""
  for n, token in enumerate(ids, 1):
    joined += detokenizer.push(token)
    # Never more than 3 characters behind: a stream of broken bytes still shows.
    assert len(joined) >= len(reference.decode(ids[:n], skip_special_tokens=True)) - 3
  joined += detokenizer.flush()
  assert joined == reference.decode(ids, skip_special_tokens=True)
  keep = "".join(_stream(IncrementalDetokenizer(ours, skip_special_tokens=False), ids))
  assert keep == reference.decode(ids, skip_special_tokens=False)


def test_a_cut_off_character_is_flushed_as_the_full_decode_shows_it(tokenizers):
  ours, reference = tokenizers
  ids = ours.encode("ok 🙂", add_special_tokens=False)[:-1]  # the emoji's last byte never comes
  detokenizer = IncrementalDetokenizer(ours)
  joined = "".join(detokenizer.push(i) for i in ids)
  assert joined == "ok "
  assert joined + detokenizer.flush() == reference.decode(ids)
  assert detokenizer.flush() == ""  # nothing left
