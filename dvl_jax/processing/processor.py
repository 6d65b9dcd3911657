"""Processor: conversations and images in, model inputs out, shaped like transformers' DeepseekVLProcessor.

  processor = dvl_jax.Processor.from_pretrained("ckpt/deepseek-vl-1.3b-chat")
  inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
  logits = model(**inputs)
  texts = processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)

Arrays are numpy (return_tensors="np", the default) or jax ("jax"); a batch is always left-padded to its
longest prompt.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from dvl_jax.checkpoint import require_directory
from dvl_jax.processing import chat
from dvl_jax.processing.images import ImageConfig, ImageInput, preprocess
from dvl_jax.processing.tokenizer import Tokenizer

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _check_return_options(return_tensors: Any, padding: Any) -> None:
  if return_tensors not in (None, "np", "jax"):
    raise ValueError(f"return_tensors={return_tensors!r} is not supported: dvl_jax returns numpy arrays "
                     "(return_tensors='np', the default) or jax arrays ('jax'), which its JAX model takes; use one "
                     "of those.")
  if padding not in (True, "longest"):
    raise ValueError(f"padding={padding!r} is not supported: dvl_jax always left-pads a batch to its longest prompt, "
                     "as the model expects; pass padding=True or 'longest', or leave it out.")


def _as_tensors(out: dict[str, np.ndarray], return_tensors: str | None) -> dict[str, Any]:
  if return_tensors != "jax":
    return out
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  return {k: jnp.asarray(v) for k, v in out.items()}


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _size(value: Any, default: int) -> int:
  """A size entry: an int, or {"height": h, "width": w} with h == w."""
  if value is None:
    return default
  if isinstance(value, dict):
    h, w = value.get("height"), value.get("width")
    if h != w:
      raise ValueError(f"DeepSeek-VL images are square; the processor config asks for {h} x {w}.")
    return int(h)
  return int(value)


def image_config_from_dict(d: dict[str, Any], *, hybrid_model: dict[str, Any] | None = None,
                           **overrides) -> ImageConfig:
  """An ImageConfig from a transformers image-processor dict (DeepseekVL[Hybrid]ImageProcessor) or the original
  VLMImageProcessor's preprocessor_config.json.

  The original file describes only the image the model receives (1024 px for the 7B, no normalisation, which
  its towers do); then `hybrid_model` ({"size", "high_res_size"} from the model config) completes the hybrid
  split as the -hf processor does it. The original floors the short side; transformers rounds.
  """
  original = d.get("image_processor_type") == "VLMImageProcessor" or "image_size" in d
  kw: dict[str, Any] = dict(
      min_size=int(d.get("min_size", 14)),
      image_mean=tuple(d.get("image_mean") or (0.5, 0.5, 0.5)),
      image_std=tuple(d.get("image_std") or (0.5, 0.5, 0.5)),
      rescale_factor=float(d.get("rescale_factor", 1 / 255)),
  )
  if original:
    kw.update(rounding="floor", resample=3, exif_transpose=False)  # the original: int(), PIL bicubic, no EXIF
    size = int(d.get("image_size", 384))
    if hybrid_model is not None:  # the original 7B: CLIP-normalised 1024 px for SAM, 384 px at 0.5/0.5 for SigLIP
      kw.update(high_res_size=size, high_res_image_mean=kw["image_mean"], high_res_image_std=kw["image_std"],
                size=hybrid_model["size"], resample=2, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    else:
      kw.update(size=size)
  else:
    kw.update(size=_size(d.get("size"), 384), resample=int(d.get("resample", 3)),
              do_normalize=bool(d.get("do_normalize", True)))
    if "high_res_size" in d or "Hybrid" in str(d.get("image_processor_type", "")):
      kw.update(high_res_size=_size(d.get("high_res_size"), 1024), high_res_resample=int(d.get("high_res_resample", 3)))
      for key in ("high_res_image_mean", "high_res_image_std"):
        if d.get(key) is not None:
          kw[key] = tuple(d[key])
  kw.update(overrides)
  return ImageConfig(**kw)


class Processor:
  """Tokenizer + image preprocessing + chat template.

  Attributes:
    tokenizer: the Tokenizer.
    image_config: the ImageConfig (hybrid when `image_config.is_hybrid`).
    num_image_tokens: image tokens each `<image_placeholder>` expands to (576 for DeepSeek-VL).
    max_length: the longest prompt the model takes, in tokens.
  """

  def __init__(self, tokenizer: Tokenizer, image_config: ImageConfig, num_image_tokens: int = 576,
               max_length: int = 16384):
    if tokenizer.image_token_id is None:
      raise ValueError(f"The tokenizer has no id for the image token {tokenizer.image_token!r}; DeepSeek-VL's "
                       "tokenizer files define <image_placeholder> as an added token.")
    self.tokenizer = tokenizer
    self.image_config = image_config
    self.num_image_tokens = num_image_tokens
    self.max_length = max_length

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, **image_overrides) -> Processor:
    """From a converted dvl_jax checkpoint, a transformers `-hf` directory or an original deepseek-ai one.

    image_overrides: ImageConfig fields to change, e.g. rounding="floor" to resize like the original repo.
    """
    path = os.fspath(path)
    require_directory(path, "processor")
    tokenizer = Tokenizer(path)
    proc = _read_json(os.path.join(path, "processor_config.json"))
    image_dict = proc.get("image_processor") or _read_json(os.path.join(path, "preprocessor_config.json"))
    num_tokens, max_length, hybrid = proc.get("num_image_tokens"), tokenizer.model_max_length, None
    model_cfg = _read_json(os.path.join(path, "dvl_config.json")).get("model")
    if model_cfg:  # a converted checkpoint knows its model exactly
      vision = model_cfg["vision"]
      num_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
      max_length = model_cfg["text"]["max_position_embeddings"]
      if model_cfg.get("high_res"):
        hybrid = {"size": vision["image_size"], "high_res_size": model_cfg["high_res"]["image_size"]}
    if not image_dict:
      raise FileNotFoundError(f"No image processor config in {path!r}: expected processor_config.json with an "
                              "'image_processor' entry, or preprocessor_config.json.")
    config = image_config_from_dict(image_dict, hybrid_model=hybrid, **image_overrides)
    return cls(tokenizer, config, num_image_tokens=int(num_tokens or 576), max_length=int(max_length))

  # ----- text and images -> arrays -----
  def __call__(self, text: str | Sequence[str], images: Sequence[Any] | None = None, *,
               return_tensors: str | None = None, padding: bool | str = True) -> dict[str, Any]:
    """Tokenises prompts whose `<image_placeholder>`s stand for `images`, and preprocesses the images.

    Args:
      text: a prompt or a batch of prompts.
      images: for one prompt, a list of images; for a batch, one list per prompt (empty for none).
      return_tensors: "np" (or None) for numpy arrays, "jax" for jax arrays; anything else ("pt") is refused.
      padding: True or "longest", what dvl_jax always does (accepted for transformers habits).
    Returns:
      dict of arrays: input_ids, attention_mask [B, T] (left-padded); when any row has images,
      pixel_values [B, N, S, S, 3] (N the most images in a row, unused slots zero), image_mask bool [B, N]
      and, for the hybrid model, high_res_pixel_values [B, N, S', S', 3].
    """
    _check_return_options(return_tensors, padding)
    batched = not isinstance(text, str)
    texts = list(text) if batched else [text]
    if images is None:
      per_row: list[list[Any]] = [[] for _ in texts]
    elif batched:
      per_row = [list(x) if x is not None else [] for x in images]
      if len(per_row) != len(texts):
        raise ValueError(f"Got {len(texts)} prompts but {len(per_row)} image lists; pass one list per prompt.")
    else:
      per_row = [list(images) if isinstance(images, (list, tuple)) else [images]]
    ids = [self._encode_row(t, imgs, row) for row, (t, imgs) in enumerate(zip(texts, per_row))]
    out = self.pad(ids)
    if any(per_row):
      out.update(self._images(per_row))
    return _as_tensors(out, return_tensors)

  def encode(self, text: str, num_images: int) -> list[int]:
    """One prompt with `num_images` placeholders -> its token ids, each placeholder expanded."""
    return self._encode_row(text, [None] * num_images, 0)

  def _encode_row(self, text: str, images: list[Any], row: int) -> list[int]:
    token = self.tokenizer.image_token
    placeholders = text.count(token)
    if placeholders != len(images):
      raise ValueError(f"Prompt {row} has {placeholders} {token} placeholder(s) but {len(images)} image(s) were "
                       "given; put one placeholder where each image goes, in order.")
    ids = self.tokenizer.encode(text.replace(token, token * self.num_image_tokens))
    if len(ids) > self.max_length:
      raise ValueError(f"Prompt {row} is {len(ids)} tokens long ({placeholders} image(s) x {self.num_image_tokens} "
                       f"tokens included), over the model's limit of {self.max_length}. Shorten the text or send "
                       "fewer images.")
    return ids

  def pad(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
    """Token rows -> input_ids, attention_mask [B, T]: left padding with the pad id (EOS when the tokenizer
    names none), as the references do."""
    length = max(len(r) for r in rows)
    input_ids = np.full((len(rows), length), self.tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
      input_ids[i, length - len(r):] = r
      mask[i, length - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}

  def _images(self, per_row: list[list[Any]]) -> dict[str, np.ndarray]:
    n = max(len(r) for r in per_row)
    out: dict[str, np.ndarray] = {}
    image_mask = np.zeros((len(per_row), n), bool)
    for b, row in enumerate(per_row):
      for i, image in enumerate(row):
        for key, value in preprocess(image, self.image_config).items():
          if key not in out:
            out[key] = np.zeros((len(per_row), n, *value.shape), np.float32)
          out[key][b, i] = value
        image_mask[b, i] = True
    out["image_mask"] = image_mask
    return out

  def preprocess_images(self, images: Sequence[ImageInput]) -> dict[str, np.ndarray]:
    """Images alone -> {"pixel_values": [N, S, S, 3], ...}."""
    arrays = [preprocess(image, self.image_config) for image in images]
    return {k: np.stack([a[k] for a in arrays]) for k in arrays[0]} if arrays else {}

  # ----- conversations -----
  def apply_chat_template(self, conversation: list[dict] | list[list[dict]], add_generation_prompt: bool = True,
                          tokenize: bool = False, return_dict: bool = False, return_tensors: str | None = None,
                          padding: bool | str = True, processor_kwargs: dict[str, Any] | None = None) -> Any:
    """Renders one conversation or a batch in the DeepSeek template (either message format).

    Unlike transformers, add_generation_prompt defaults to True: the prompt ends with "Assistant:".

    Args:
      conversation: a list of {"role", "content"} message dicts, or a batch: a list of such lists.
      tokenize: return token ids rather than the prompt string(s).
      return_dict: with tokenize, return the full model inputs of `__call__`, the images taken from the messages.
      return_tensors: with tokenize, "np" or "jax" for arrays (the ids [B, T] left-padded, as transformers returns
        them with padding=True); None for ids as lists (unpadded, one per conversation) and numpy arrays in the
        dict. "pt" is refused: dvl_jax returns numpy or jax arrays.
      padding: True or "longest" (what dvl_jax always does); processor_kwargs: {"padding", "return_tensors"},
        the way transformers 5 passes them.
    """
    if processor_kwargs:
      unknown = sorted(set(processor_kwargs) - {"padding", "return_tensors"})
      if unknown:
        raise TypeError(f"processor_kwargs {unknown} are not supported; dvl_jax's processor takes padding and "
                        "return_tensors.")
      padding = processor_kwargs.get("padding", padding)
      return_tensors = processor_kwargs.get("return_tensors", return_tensors)
    _check_return_options(return_tensors, padding)
    conversations, batched = chat.conversations(conversation)
    prompts = [chat.render(c, self.tokenizer.image_token, self.tokenizer.eos_token, add_generation_prompt)
               for c in conversations]
    if not tokenize:
      return prompts if batched else prompts[0]
    out = self(prompts, [chat.message_images(c) for c in conversations], return_tensors=return_tensors)
    if return_dict:
      return out
    if return_tensors is not None:
      return out["input_ids"]
    return [row[m.astype(bool)].tolist() for row, m in zip(out["input_ids"], out["attention_mask"])]

  # ----- ids -> text -----
  def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
    """Rows of ids -> texts. `sequences` may be `model.generate`'s GenerationOutput: its rows are the new tokens,
    each cut at its length (transformers' output also holds the prompt; ours does not)."""
    return self.tokenizer.batch_decode(sequences, skip_special_tokens)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens)
