"""Records in the formats VLM data comes in -> one canonical sample: a Conversation in transformers' message
format (which the processor's chat template renders), or a Text.

- captions: {"image": "rel/path.jpg", "caption": "..."} (ShareGPT4V-style pretraining pairs) -> a user turn with
  the image (and the source's prompt), the caption as the assistant's answer.
- conversations, LLaVA: {"image": "x.jpg" | ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value":
  "<image>\\nWhat ..."}, {"from": "gpt", "value": "..."}]}. Each "<image>" tag (or "<image_placeholder>") becomes
  an image item, in order; the whitespace around a tag is dropped, so "<image>\\nWhat is it?" renders as
  DeepSeek-VL's prompts do, "<image_placeholder>What is it?".
- conversations, transformers: {"messages": [{"role": "user", "content": [{"type": "image", "path": ...},
  {"type": "text", "text": ...}]}, ...]} (content may also be a string).
- text: {"text": "..."}.

A record with images may also carry "regions": [{"box": [x0, y0, x1, y1], "text": "...", "image": 0}, ...], boxes
in the image's pixels naming what is in them (grounding data: dvl_jax/data/regions.py); "image" defaults to 0.

Anything else raises BadRecord, whose message says what was expected; the pipeline counts and skips it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from dvl_jax.data.config import SourceConfig
from dvl_jax.data.regions import Region
from dvl_jax.processing import chat

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadRecord(ValueError):
  """A record that cannot be trained on; the message is the reason."""


@dataclasses.dataclass
class Conversation:
  """messages: transformers' format, each image item {"type": "image", "image": ref}; images: the refs in
  order (file paths joined to the source's image root, URLs, or bytes); regions: the images' grounding regions."""

  messages: list[dict[str, Any]]
  images: list[Any]
  regions: list[Region] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Text:
  text: str


def parse(value: Any, source: SourceConfig) -> Conversation | Text:
  """A record's parsed JSON (or Parquet row) -> its sample. Raises BadRecord."""
  if not isinstance(value, dict):
    raise BadRecord(f"expected a JSON object, got {type(value).__name__} {_short(value)}")
  if source.columns:
    value = {source.columns.get(k, k): v for k, v in value.items()}
  if source.format == "text":
    return Text(_string(value, "text"))
  if source.format == "captions":
    image = _image_ref(_field(value, "image"), source.image_root)
    user = [{"type": "image", "image": image}] + ([{"type": "text", "text": source.prompt}] if source.prompt else [])
    return Conversation([{"role": "user", "content": user},
                         {"role": "assistant", "content": [{"type": "text", "text": _string(value, "caption")}]}],
                        [image], _regions(value.get("regions"), 1))
  if "messages" in value:
    conversation = _transformers_messages(value["messages"], source.image_root)
  elif "conversations" in value:
    conversation = _llava(value, source.image_root)
  else:
    raise BadRecord(f"a conversation record needs 'conversations' (LLaVA) or 'messages' (transformers); got keys "
                    f"{sorted(value)}")
  _check_conversation(conversation.messages)
  conversation.regions = _regions(value.get("regions"), len(conversation.images))
  return conversation


def _regions(value: Any, images: int) -> list[Region]:
  """A record's "regions" (None: none) -> Regions, each checked."""
  if value is None:
    return []
  if not isinstance(value, list):
    raise BadRecord(f"'regions' must be a list of {{'box': [x0, y0, x1, y1], 'text': str}}; got {_short(value)}")
  out = []
  for i, r in enumerate(value):
    box = r.get("box") if isinstance(r, dict) else None
    if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
        or not (box[0] < box[2] and box[1] < box[3])):
      raise BadRecord(f"region {i} needs 'box': [x0, y0, x1, y1] in pixels with x0 < x1 and y0 < y1; got "
                      f"{_short(r)}")
    image = r.get("image", 0)
    if not isinstance(image, int) or not 0 <= image < images:
      raise BadRecord(f"region {i} is of image {image!r}; the record has {images} image(s) (0-based)")
    text = r.get("text")
    if not isinstance(text, str) or not text.strip():
      raise BadRecord(f"region {i} needs 'text', the words naming it; got {_short(r)}")
    out.append(Region(image, tuple(float(v) for v in box), text.strip()))
  return out


def _llava(value: dict[str, Any], root: str) -> Conversation:
  turns = value["conversations"]
  if not isinstance(turns, list):
    raise BadRecord(f"'conversations' must be a list of {{'from', 'value'}} turns; got {_short(turns)}")
  images = value.get("image", value.get("images"))
  images = [] if images is None else images if isinstance(images, list) else [images]
  refs = [_image_ref(x, root) for x in images]
  messages, tags = [], 0
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      raise BadRecord(f"turn {i} must be {{'from': ..., 'value': str}}; got {_short(turn)}")
    role = ROLES.get(str(turn.get("from", "")).lower())
    if role is None:
      raise BadRecord(f"turn {i} has the unknown role {turn.get('from')!r}; expected one of {sorted(ROLES)}")
    content = []
    for text in chat.split_image_tags(turn["value"]):
      if text is None:
        content.append({"type": "image", "image": refs[tags] if tags < len(refs) else None})
        tags += 1
      else:
        content.append({"type": "text", "text": text})
    messages.append({"role": role, "content": content or [{"type": "text", "text": ""}]})
  if tags != len(refs):
    raise BadRecord(f"the conversation has {tags} <image> tag(s) but {len(refs)} image(s); give one image per tag")
  return Conversation(messages, refs)


def _transformers_messages(messages: Any, root: str) -> Conversation:
  try:
    chat.check_messages(messages)
  except (TypeError, ValueError) as e:
    raise BadRecord(str(e)) from e
  out, refs = [], []
  for i, message in enumerate(messages):
    role = message["role"].lower()
    if role not in ("user", "assistant", "system"):
      raise BadRecord(f"message {i} has the unknown role {message['role']!r}; expected 'user', 'assistant' or "
                      "'system'")
    content = message["content"]
    items = [{"type": "text", "text": content}] if isinstance(content, str) else []
    for item in [] if isinstance(content, str) else content:
      if item["type"] == "image":
        src = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
        if src is None:
          raise BadRecord(f"message {i} has an image item without 'image', 'path' or 'url': {_short(item)}")
        refs.append(_image_ref(src, root))
        items.append({"type": "image", "image": refs[-1]})
      else:
        items.append({"type": "text", "text": item.get("text", "")})
    out.append({"role": role, "content": items})
  return Conversation(out, refs)


def _check_conversation(messages: list[dict[str, Any]]) -> None:
  if not messages:
    raise BadRecord("the conversation is empty")
  if not any(m["role"] == "assistant" and any(i["type"] == "text" and i["text"].strip() for i in m["content"])
             for m in messages):
    raise BadRecord("the conversation has no assistant answer to learn from")


def _image_ref(src: Any, root: str) -> Any:
  """A path (joined to root unless absolute or a URL), bytes, or Hugging Face's {"bytes", "path"} image struct."""
  if isinstance(src, dict):
    if src.get("bytes") is not None:
      return bytes(src["bytes"])
    src = src.get("path")
  if isinstance(src, (bytes, bytearray)):
    return bytes(src)
  if isinstance(src, str) and src:
    return src if re.match(r"^(https?|data):", src) else os.path.join(root, src)
  raise BadRecord(f"an image must be a path, bytes or {{'bytes': ..., 'path': ...}}; got {_short(src)}")


def _field(value: dict[str, Any], key: str) -> Any:
  if value.get(key) is None:
    raise BadRecord(f"the record has no {key!r}; its keys are {sorted(value)} (a source's `columns` can rename them)")
  return value[key]


def _string(value: dict[str, Any], key: str) -> str:
  text = _field(value, key)
  if not isinstance(text, str) or not text.strip():
    raise BadRecord(f"{key!r} must be a non-empty string; got {_short(text)}")
  return text


def _short(x: Any) -> str:
  s = repr(x)
  return s if len(s) <= 120 else s[:117] + "..."
