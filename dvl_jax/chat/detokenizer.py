"""Incremental detokenization: the text of a stream of token ids, piece by piece, never half a character.

A byte-level BPE token can hold part of a UTF-8 character (an emoji is often 2-4 tokens), and a sentencepiece
token's leading "▁" becomes a space only after another token. Decoding each token alone would print "\ufffd"
and lose spaces; decoding everything at each step costs O(n^2). As vLLM and text-generation-inference do, each
step decodes a short window (the tokens since the last emitted boundary) twice, with and without the new
tokens, and emits the difference, holding back a trailing replacement character: the start of a character
whose other bytes are still to come. Only the last one or few can be that (a lossy UTF-8 decoder writes one
"\ufffd" per invalid stretch, and a pending character has at most 3 bytes), so at most 3 are held: a model
that writes invalid bytes (a random one does) still streams. The pieces joined equal `tokenizer.decode(all_ids)`
(tests/chat/test_detokenizer.py checks it against transformers' decode).
"""

from __future__ import annotations

from typing import Any, Iterable

REPLACEMENT = "\ufffd"
MAX_HELD = 3  # replacement characters that may still turn into a character (UTF-8: at most 3 bytes pending)


class IncrementalDetokenizer:
  """Feed token ids with `push`; each call returns the text they complete ("" while a character is unfinished).
  `flush` returns what is left at the end (a cut-off character as "\\ufffd", as a full decode shows it).

  tokenizer: anything with `decode(ids, skip_special_tokens)` (dvl_jax's Tokenizer or Processor).
  """

  def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
    self._tokenizer = tokenizer
    self._skip = skip_special_tokens
    self.ids: list[int] = []
    self._prefix = 0  # the window starts here: a token boundary that is also a character boundary
    self._read = 0    # ids before this are emitted
    self._sent = 0    # characters of the window's text emitted, when it ended in held-back replacements

  def _decode(self, ids: list[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

  def push(self, ids: int | Iterable[int]) -> str:
    self.ids.extend([int(ids)] if isinstance(ids, int) or hasattr(ids, "__index__") else map(int, ids))
    done = max(len(self._decode(self.ids[self._prefix:self._read])), self._sent)
    text = self._decode(self.ids[self._prefix:])
    held = min(len(text) - len(text.rstrip(REPLACEMENT)), MAX_HELD)
    if len(text) - held <= done:
      return ""
    if held:  # the window stays; remember how much of it is out
      self._sent = len(text) - held
    else:  # a clean boundary: the next window starts at the previous one's end (context for a leading "▁")
      self._prefix, self._read, self._sent = self._read, len(self.ids), 0
    return text[done:len(text) - held]

  def flush(self) -> str:
    """The text of the ids not yet emitted (possibly ending in "\\ufffd"); nothing after this is pending."""
    done = max(len(self._decode(self.ids[self._prefix:self._read])), self._sent)
    text = self._decode(self.ids[self._prefix:])
    self._prefix = self._read = len(self.ids)
    self._sent = 0
    return text[done:]
