"""The DeepSeek chat template, for both message formats.

transformers format (the `-hf` chat template):
  [{"role": "user", "content": [{"type": "image", "url": ...}, {"type": "text", "text": "Describe it."}]}, ...]
original deepseek-ai format (deepseek_vl/utils/conversation.py, sep_style DeepSeek):
  [{"role": "User", "content": "<image_placeholder>Describe it.", "images": ["a.png"]}, {"role": "Assistant", "content": ""}]
Both render `SYSTEM + "\\n\\n" + "User: ...\\n\\n" + "Assistant: ...<EOS>" ... + "Assistant:"`, byte-identical for
the same text (ARCHITECTURE.md 3.3).
"""

from __future__ import annotations

import os
import re
from typing import Any

# transformers' Jinja rendering of this template, as its DeepSeek-VL conversion scripts write it into the -hf
# checkpoints (the processor's chat_template); dvl_jax renders in Python below, byte for byte the same.
HF_CHAT_TEMPLATE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_template.jinja")

SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
USER_SEP = "\n\n"
Message = dict[str, Any]
# An image's place in a message's text: LLaVA's tag or DeepSeek's token; the whitespace around it is not text.
IMAGE_TAG = re.compile(r"\s*(?:<image>|<image_placeholder>)\s*")


def split_image_tags(text: str) -> list[str | None]:
  """A message's text -> its parts in order: text, or None where an image tag stands, so that
  "<image>\\nWhat is it?" -> [None, "What is it?"] renders as DeepSeek-VL's prompts do ("<image_placeholder>What
  is it?"); empty text between tags is dropped."""
  parts: list[str | None] = []
  for j, piece in enumerate(IMAGE_TAG.split(text)):  # text, image, text, image, ..., text
    if j:
      parts.append(None)
    if piece:
      parts.append(piece)
  return parts


def is_original_format(messages: list[Message]) -> bool:
  """The original format has string contents, capitalised roles or per-message "images" lists."""
  return any("images" in m or (isinstance(m.get("content"), str) and m.get("role") in ("User", "Assistant"))
             for m in messages)


def _items(message: Message) -> list[dict[str, Any]]:
  content = message["content"]
  return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _is_item(item: Any) -> bool:
  """A -hf content item: {"type": "image", ...} or {"type": "text", "text": str}."""
  return isinstance(item, dict) and (item.get("type") == "image" or
                                     item.get("type") == "text" and isinstance(item.get("text", ""), str))


def conversations(conversation: Any) -> tuple[list[list[Message]], bool]:
  """One conversation (a list of message dicts) or a batch (a list of them) -> (the batch, whether it was one),
  every message checked by `check_messages`."""
  if isinstance(conversation, dict):
    raise TypeError("A conversation is a list of message dicts, not one dict: pass [message] "
                    f"(got the message {conversation!r:.120}); a batch is a list of such lists.")
  if isinstance(conversation, str):
    raise TypeError("apply_chat_template takes messages ([{'role': 'user', 'content': ...}, ...]), not a prompt "
                    "string; to tokenise a prompt string, call the processor: processor(text, images).")
  if not isinstance(conversation, (list, tuple)):
    raise TypeError("A conversation is a list of message dicts ({'role': ..., 'content': ...}), and a batch a list "
                    f"of conversations; got {type(conversation).__name__}.")
  batched = bool(conversation) and all(isinstance(c, (list, tuple)) for c in conversation)
  batch = [list(c) for c in conversation] if batched else [list(conversation)]
  for b, messages in enumerate(batch):
    check_messages(messages, f"Conversation {b}, " if batched else "")
  return batch, batched


def check_messages(messages: Any, where: str = "") -> None:
  """Raises a TypeError or ValueError that names the message when `messages` is not a list of
  {"role": str, "content": str | [{"type": "text"|"image", ...}, ...]} dicts."""
  if not isinstance(messages, list):
    raise TypeError(f"A conversation is a list of message dicts ({{'role': ..., 'content': ...}}); got "
                    f"{type(messages).__name__}.")
  for i, message in enumerate(messages):
    at = f"{where}message {i}" if where else f"Message {i}"
    if not isinstance(message, dict):
      hint = " (a batch is a list of conversations, each a list of messages)" if isinstance(message, list) else ""
      raise TypeError(f"{at} is a {type(message).__name__}; expected a dict {{'role': ..., 'content': ...}}{hint}.")
    role = message.get("role")
    if not isinstance(role, str) or not role:
      raise ValueError(f"{at} needs a 'role' string: 'user', 'assistant' or 'system' ('User'/'Assistant' in the "
                       f"original format); got {role!r} in {message!r:.120}.")
    if "content" not in message:
      raise ValueError(f"{at} ({role}) has no 'content': expected a string or a list of "
                       "{'type': 'text'|'image', ...} items.")
    content = message["content"]
    if not (isinstance(content, str) or isinstance(content, list) and all(map(_is_item, content))):
      raise ValueError(f"{at} ({role}): content must be a string or a list of {{'type': 'text', 'text': str}} and "
                       f"{{'type': 'image', 'image'|'url'|'path': ...}} items; got {content!r:.200}.")
    if "images" in message and not isinstance(message["images"], (list, tuple)):
      raise TypeError(f"{at} ({role}): 'images' is a list of images, one per <image_placeholder>; got "
                      f"{type(message['images']).__name__} {message['images']!r:.80}. Write 'images': [image].")


def render_hf(messages: list[Message], image_token: str, eos_token: str, add_generation_prompt: bool) -> str:
  """The -hf chat template. Ref: transformers convert_deepseek_vl*_weights_to_hf.py CHAT_TEMPLATE."""
  out = [SYSTEM_PROMPT + USER_SEP]
  for i, message in enumerate(messages):
    role, items = str(message.get("role", "")), _items(message)
    last = i == len(messages) - 1
    if role.lower() == "user":
      out.append("User: ")
    elif role.lower() == "assistant":
      empty_final = last and not add_generation_prompt and items and items[0]["type"] == "text" and not items[0].get(
          "text")
      out.append("Assistant:" + ("" if empty_final else " "))
    else:  # any other role (system included) renders as "Role: ", it does not replace the system prompt
      out.append(role.capitalize() + ": ")
    for j, item in enumerate(items):
      if item["type"] == "image":
        out.append(image_token)
      else:
        text = item.get("text", "")
        text = text.lstrip() if j == 0 else text
        text = text.rstrip() if j == len(items) - 1 else text
        out.append(" " + text if j > 0 and items[j - 1]["type"] == "text" else text)
    if not last or add_generation_prompt:
      out.append(USER_SEP if role.lower() == "user" else eos_token)
  if add_generation_prompt:
    out.append("Assistant:")
  return "".join(out)


def render_original(messages: list[Message], eos_token: str, add_generation_prompt: bool) -> str:
  """conversation.py get_prompt (DeepSeek style): separators alternate by turn, contents and the whole prompt
  are stripped, an empty message renders as "Role:". Ref: VLChatProcessor.apply_sft_template_for_multi_turn_prompts."""
  messages = list(messages)
  if add_generation_prompt and not (messages and messages[-1].get("role") == "Assistant"
                                    and not str(messages[-1].get("content", "")).strip()):
    messages.append({"role": "Assistant", "content": ""})
  seps = [USER_SEP, eos_token]
  out = SYSTEM_PROMPT + seps[0]
  for i, message in enumerate(messages):
    content = message.get("content", "")
    if not isinstance(content, str):
      raise ValueError("In the original format a message's content is a string with one <image_placeholder> per "
                       f"image; got {type(content).__name__}.")
    content = content.strip()
    out += f"{message['role']}: {content}{seps[i % 2]}" if content else f"{message['role']}:"
  return out.strip()


def message_images(messages: list[Message]) -> list[Any]:
  """The images a conversation refers to, in order: "image" content items (their "url", "path" or "image"
  value) in the -hf format, the "images" lists in the original one."""
  images = []
  for message in messages:
    images.extend(message.get("images", []))
    content = message.get("content")
    if isinstance(content, list):
      for item in content:
        if isinstance(item, dict) and item.get("type") == "image":
          src = next((item[k] for k in ("image", "url", "path") if item.get(k) is not None), None)
          if src is None:
            raise ValueError(f"An image content item needs an 'image', 'url' or 'path' value; got {item!r}.")
          images.append(src)
  return images


def render(messages: list[Message], image_token: str, eos_token: str, add_generation_prompt: bool = True) -> str:
  check_messages(messages)
  if is_original_format(messages):
    return render_original(messages, eos_token, add_generation_prompt)
  return render_hf(messages, image_token, eos_token, add_generation_prompt)


def hf_chat_template() -> str:
  """The -hf checkpoints' Jinja chat template (for transformers' processor, and processor files we write)."""
  with open(HF_CHAT_TEMPLATE_FILE, encoding="utf-8") as f:
    return f.read().rstrip("\n")
