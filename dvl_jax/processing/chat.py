"""The DeepSeek chat template, for both message formats.

transformers format (the `-hf` chat template):
  [{"role": "user", "content": [{"type": "image", "url": ...}, {"type": "text", "text": "Describe it."}]}, ...]
original deepseek-ai format (deepseek_vl/utils/conversation.py, sep_style DeepSeek):
  [{"role": "User", "content": "<image_placeholder>Describe it.", "images": ["a.png"]}, {"role": "Assistant", "content": ""}]
Both render `SYSTEM + "\\n\\n" + "User: ...\\n\\n" + "Assistant: ...<EOS>" ... + "Assistant:"`, byte-identical for
the same text (ARCHITECTURE.md 3.3).
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
USER_SEP = "\n\n"
Message = dict[str, Any]


def is_original_format(messages: list[Message]) -> bool:
  """The original format has string contents, capitalised roles or per-message "images" lists."""
  return any("images" in m or (isinstance(m.get("content"), str) and m.get("role") in ("User", "Assistant"))
             for m in messages)


def _items(message: Message) -> list[dict[str, Any]]:
  content = message.get("content", "")
  if isinstance(content, str):
    return [{"type": "text", "text": content}]
  if not isinstance(content, list) or not all(isinstance(c, dict) and "type" in c for c in content):
    raise ValueError(f"A message's content must be a string or a list of {{'type': 'text'|'image', ...}} items; "
                     f"got {content!r:.200}.")
  return content


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
      elif item["type"] == "text":
        text = item.get("text", "")
        text = text.lstrip() if j == 0 else text
        text = text.rstrip() if j == len(items) - 1 else text
        out.append(" " + text if j > 0 and items[j - 1]["type"] == "text" else text)
      else:
        raise ValueError(f"Unknown content type {item['type']!r}; expected 'text' or 'image'.")
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
  if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
    raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts; got {type(messages).__name__}.")
  if is_original_format(messages):
    return render_original(messages, eos_token, add_generation_prompt)
  return render_hf(messages, image_token, eos_token, add_generation_prompt)
