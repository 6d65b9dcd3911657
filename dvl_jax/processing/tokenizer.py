"""The text tokenizer: DeepSeek's byte-level BPE from `tokenizer.json` (through `tokenizers`), or a
sentencepiece `tokenizer.model`.

BOS is prepended as the reference does (`add_bos_token`, true for DeepSeek); special tokens and ids come from
the checkpoint's files (`tokenizer_config.json`, `special_tokens_map.json`), never from constants.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
IMAGE_TOKEN = "<image_placeholder>"


def _load_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_str(value: Any) -> str | None:
  """A special token entry: a string, or an AddedToken dict {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value


class Tokenizer:
  """Encodes text to ids and decodes ids to text.

  Attributes:
    bos_token, eos_token, pad_token, image_token: the special strings; *_id their ids.
    add_bos_token: whether `encode` prepends BOS.
    model_max_length: the tokenizer's declared limit (informational).
  """

  def __init__(self, directory: str | os.PathLike):
    directory = os.fspath(directory)
    cfg = _load_json(os.path.join(directory, "tokenizer_config.json"))
    special = _load_json(os.path.join(directory, "special_tokens_map.json"))
    tok_json = os.path.join(directory, "tokenizer.json")
    sp_model = os.path.join(directory, "tokenizer.model")
    self._sp = self._tok = None
    if os.path.isfile(tok_json):
      from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel

      self._tok = HFTokenizer.from_file(tok_json)
      added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
    elif os.path.isfile(sp_model):
      import sentencepiece  # pylint: disable=import-outside-toplevel

      self._sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
      added = {}
    else:
      raise FileNotFoundError(f"No tokenizer in {directory!r}: expected tokenizer.json (DeepSeek's byte-level BPE) or "
                              "a sentencepiece tokenizer.model.")
    # Added tokens declared by tokenizer_config.json (the original checkpoints list <image_placeholder> there).
    for i, entry in cfg.get("added_tokens_decoder", {}).items():
      added.setdefault(_token_str(entry), int(i))
    self._added = added
    self._special_ids = {int(i) for i, e in cfg.get("added_tokens_decoder", {}).items()
                         if isinstance(e, dict) and e.get("special")}

    def pick(name: str, default: str | None) -> str | None:
      return _token_str(cfg.get(name)) or _token_str(special.get(name)) or default

    self.bos_token = pick("bos_token", BOS_TOKEN)
    self.eos_token = pick("eos_token", EOS_TOKEN)
    self.pad_token = pick("pad_token", None) or self.eos_token  # the original pads with EOS
    self.image_token = pick("image_token", IMAGE_TOKEN)
    self.add_bos_token = bool(cfg.get("add_bos_token", True))
    self.add_eos_token = bool(cfg.get("add_eos_token", False))
    self.model_max_length = int(cfg.get("model_max_length", 16384))
    self.bos_token_id = self.token_to_id(self.bos_token)
    self.eos_token_id = self.token_to_id(self.eos_token)
    self.pad_token_id = self.token_to_id(self.pad_token)
    self.image_token_id = self.token_to_id(self.image_token)
    self._special_ids |= {i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id) if i is not None}
    if self._tok is not None:
      self._special_ids |= {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    # Added tokens are matched as whole strings before the model sees the text (sentencepiece path).
    self._added_re = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))) if added else None

  def token_to_id(self, token: str | None) -> int | None:
    if token is None:
      return None
    if token in self._added:
      return self._added[token]
    if self._tok is not None:
      return self._tok.token_to_id(token)
    i = self._sp.piece_to_id(token)
    return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

  @property
  def vocab_size(self) -> int:
    n = self._tok.get_vocab_size(with_added_tokens=True) if self._tok is not None else self._sp.get_piece_size()
    return max([n, *(i + 1 for i in self._added.values())])

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Text -> ids, BOS first when `add_special_tokens` and the tokenizer says so. Added tokens such as
    `<image_placeholder>` are single ids wherever they appear."""
    if self._tok is not None:
      ids = self._tok.encode(text, add_special_tokens=False).ids
    else:
      ids, pos = [], 0
      for m in self._added_re.finditer(text) if self._added_re else ():
        ids += self._sp.encode(text[pos:m.start()]) if m.start() > pos else []
        ids.append(self._added[m.group()])
        pos = m.end()
      ids += self._sp.encode(text[pos:]) if pos < len(text) else []
    if add_special_tokens:
      if self.add_bos_token and self.bos_token_id is not None:
        ids = [self.bos_token_id] + ids
      if self.add_eos_token and self.eos_token_id is not None:
        ids = ids + [self.eos_token_id]
    return ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """Text -> (ids, the character offset in `text` where each token starts), no special tokens added: what a
    training pipeline needs to mark which tokens came from which part of a rendered conversation."""
    if self._tok is None:
      raise ValueError("Token offsets need the fast tokenizer (tokenizer.json); this tokenizer is a sentencepiece "
                       "model. Convert it with transformers (AutoTokenizer.from_pretrained(...).save_pretrained) to "
                       "get a tokenizer.json.")
    encoding = self._tok.encode(text, add_special_tokens=False)
    return encoding.ids, [start for start, _ in encoding.offsets]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    ids = list(ids)
    if any(np.ndim(i) for i in ids):
      raise TypeError("decode takes one sequence of token ids; got a sequence of sequences. For a batch [B, T] or "
                      "a GenerationOutput, use batch_decode.")
    ids = [int(i) for i in ids]
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._special_ids]
    if self._tok is not None:
      return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
    return self._sp.decode(ids)

  def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
    return [self.decode(s, skip_special_tokens) for s in sequences]
