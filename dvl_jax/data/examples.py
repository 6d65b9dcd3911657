"""One sample -> one training Example: token ids rendered exactly as the processor renders the conversation, the
loss mask (the assistant's answers and their EOS), and the images preprocessed exactly as at inference.

  example = make_example(parse(record.value, source), processor, seq_len=4096, max_images=1)

Token ids: BOS + the DeepSeek chat template of all the messages (Processor.apply_chat_template with
add_generation_prompt=False) + EOS after a final answer, each image placeholder expanded to the model's image
tokens. Which tokens are learned is read off the token offsets: a token is learned when it starts inside an
assistant's answer (its leading space included) or is the EOS that ends it. System and user turns, the "User:" /
"Assistant:" headers and image tokens never are. A Text sample is BOS + text + EOS, all learned.

A sample with grounding regions (dvl_jax/data/regions.py) also gets a word target on each image token of its
regions' images (`image_labels`), for the region_words objective.

A sample over seq_len tokens (or max_images images) is truncated before the first token or image that does not
fit, never inside an image, or dropped (`overlong`); one with nothing left to learn is dropped either way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from PIL import ImageOps

from dvl_jax.data.formats import BadRecord, Conversation, Text
from dvl_jax.data.regions import NO_TARGET, image_token_labels
from dvl_jax.processing import chat
from dvl_jax.processing.images import load_image, preprocess
from dvl_jax.processing.processor import Processor


class Overlong(ValueError):
  """A sample dropped for its length (overlong="drop", or nothing left to learn after truncation)."""


@dataclasses.dataclass
class Example:
  """One sample, ready to go into a row.

  Attributes:
    ids: int32 [n] token ids, each image as `num_image_tokens` image tokens.
    loss_mask: int32 [n], 1 for the tokens to learn.
    pixel_values: float32 [k, S, S, 3], the sample's k images in order (k may be 0).
    high_res_pixel_values: float32 [k, S', S', 3] for the hybrid model, else None.
    where: the record's "file:line".
    source: the source's name.
    truncated: whether tokens or images were cut off to fit.
    image_labels: int32 [n], the word target of each image token in a region (regions.py), NO_TARGET elsewhere;
      None: the sample has no regions.
  """

  ids: np.ndarray
  loss_mask: np.ndarray
  pixel_values: np.ndarray
  high_res_pixel_values: np.ndarray | None
  where: str
  source: str
  truncated: bool = False
  image_labels: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def num_images(self) -> int:
    return len(self.pixel_values)


def tokenize_conversation(processor: Processor, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """transformers-format messages -> (ids int32 [n], loss_mask int32 [n]); see the module doc."""
  tok = processor.tokenizer
  image, eos, per_image = tok.image_token, tok.eos_token, processor.num_image_tokens

  def render(upto: int, generation_prompt: bool) -> str:  # the expanded template of messages[:upto]
    return chat.render_hf(messages[:upto], image, eos, generation_prompt).replace(image, image * per_image)

  text = render(len(messages), False) + (eos if messages[-1]["role"] == "assistant" else "")
  spans = []  # [start, end) of each answer in `text`, its EOS included
  for k, message in enumerate(messages):
    if message["role"] == "assistant":
      start, end = len(render(k, True)), len(render(k + 1, False)) + len(eos)
      if text[end - len(eos):end] != eos:  # the template's turns are prefixes of the whole: a change would show here
        raise AssertionError(f"The chat template does not end answer {k} with EOS at {end}: {text[:end]!r:.200}")
      spans.append((start, end))
  ids, starts = tok.encode_with_offsets(text)
  learned = np.zeros(len(ids), np.int32)
  starts = np.asarray(starts, np.int64)
  for start, end in spans:
    learned |= ((starts >= start) & (starts < end)).astype(np.int32)
  learned[np.asarray(ids) == tok.image_token_id] = 0
  return _with_bos(tok, np.asarray(ids, np.int32), learned)


def tokenize_text(processor: Processor, text: str) -> tuple[np.ndarray, np.ndarray]:
  """Plain text -> (BOS + its ids + EOS, a loss mask of ones)."""
  tok = processor.tokenizer
  ids = np.asarray(tok.encode(text, add_special_tokens=False) + [tok.eos_token_id], np.int32)
  return _with_bos(tok, ids, np.ones(len(ids), np.int32))


def _with_bos(tok, ids: np.ndarray, learned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  if tok.add_bos_token and tok.bos_token_id is not None:
    return np.concatenate([[tok.bos_token_id], ids]).astype(np.int32), np.concatenate([[0], learned]).astype(np.int32)
  return ids, learned


def fit(ids: np.ndarray, loss_mask: np.ndarray, *, image_token_id: int, tokens_per_image: int, seq_len: int,
        max_images: int, overlong: str) -> tuple[np.ndarray, np.ndarray, int, bool]:
  """Cuts a sample to seq_len tokens and max_images images, never inside an image.

  Returns:
    (ids, loss_mask, images kept, whether anything was cut).
  Raises:
    Overlong: the sample does not fit and overlong is "drop", or nothing learned is left.
  """
  image_starts = np.flatnonzero(ids == image_token_id)[::tokens_per_image]  # each image: consecutive tokens
  cut = len(ids)
  if cut > seq_len:
    cut = seq_len
  if len(image_starts) > max_images:
    cut = min(cut, int(image_starts[max_images]))
  inside = [s for s in image_starts if s < cut < s + tokens_per_image]
  cut = int(inside[0]) if inside else cut
  if cut < len(ids):
    why = (f"{len(ids)} tokens, over seq_len={seq_len}" if len(ids) > seq_len
           else f"{len(image_starts)} images, over max_images={max_images}")
    if overlong == "drop":
      raise Overlong(f"{why} (overlong='drop')")
    if not loss_mask[:cut].any():
      raise Overlong(f"{why}, and nothing to learn is left in the first {cut} tokens")
  kept = int(np.sum(image_starts + tokens_per_image <= cut))
  return ids[:cut], loss_mask[:cut], kept, cut < len(ids)


def make_example(sample: Conversation | Text, processor: Processor, *, seq_len: int, max_images: int,
                 overlong: str, where: str = "", source: str = "") -> Example:
  """A parsed sample -> its Example (tokenised, fitted, images preprocessed). Raises BadRecord (an image that
  cannot be read) or Overlong."""
  if isinstance(sample, Text):
    ids, mask = tokenize_text(processor, sample.text)
    refs: list[Any] = []
  else:
    ids, mask = tokenize_conversation(processor, sample.messages)
    refs = sample.images
  ids, mask, kept, truncated = fit(ids, mask, image_token_id=processor.tokenizer.image_token_id,
                                   tokens_per_image=processor.num_image_tokens, seq_len=seq_len,
                                   max_images=max_images, overlong=overlong)
  cfg = processor.image_config
  regions = [] if isinstance(sample, Text) else sample.regions
  pixels, sizes = [], {}
  for i, ref in enumerate(refs[:kept]):
    try:
      if any(r.image == i for r in regions):  # its size, as the boxes see it, places them on the grid
        ref = load_image(ref, max_pixels=cfg.max_pixels)
        ref = ImageOps.exif_transpose(ref) if cfg.exif_transpose else ref
        sizes[i] = ref.size
      pixels.append(preprocess(ref, cfg))
    except (ValueError, OSError) as e:  # ImageError names the image; OSError: a file truncated mid-decode
      raise BadRecord(f"image {i}: {e}") from e
  image_labels = None
  if regions:
    per = processor.num_image_tokens
    grid = int(round(per ** 0.5))
    image_labels = np.full(len(ids), NO_TARGET, np.int32)
    starts = np.flatnonzero(ids == processor.tokenizer.image_token_id)[::per]
    words = lambda text: processor.tokenizer.encode(" " + text, add_special_tokens=False)  # noqa: E731
    for i in sizes:
      image_labels[starts[i]:starts[i] + per] = image_token_labels([r for r in regions if r.image == i], sizes[i],
                                                                   cfg, grid, words)

  def stack(key: str, size: int) -> np.ndarray:  # [k, S, S, 3]
    return np.stack([p[key] for p in pixels]) if pixels else np.zeros((0, size, size, 3), np.float32)

  high = stack("high_res_pixel_values", cfg.high_res_size) if cfg.is_hybrid else None
  return Example(ids, mask, stack("pixel_values", cfg.size), high, where, source, truncated, image_labels)
