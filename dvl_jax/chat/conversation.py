"""A chat's history: the user's turns with their images, the model's answers, and the prompt that fits.

  conversation = Conversation()
  conversation.add_user("What colour is the circle?", [image])    # images: loaded PIL images, in order
  prompt = conversation.fit(processor, max_tokens=384)             # the newest turns that fit, as model inputs
  ... generate, then conversation.set_answer(text)

The prompt is the DeepSeek chat template (dvl_jax/processing/chat.py) of the turns as transformers' messages.
When the whole history is longer than the model can take, the oldest turns are left out, a whole turn (question
and answer, with its images) at a time, as the official demo does; `Prompt.dropped` says how many, so a front
end can tell the user. The history itself keeps every turn (a later, shorter question may fit more of it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from dvl_jax.generate import bucket_length
from dvl_jax.processing import chat


class ContextTooLong(ValueError):
  """The newest message alone does not fit the model's context; the message says by how much."""


@dataclasses.dataclass
class Turn:
  """text: the user's text; an image tag (<image_placeholder>, or <image>) marks where each image goes, and
  images without a tag come before the text. images: PIL images. names: how to show them (file names).
  answer: the model's answer, None while it is being written."""

  text: str
  images: list[Any] = dataclasses.field(default_factory=list)
  names: list[str] = dataclasses.field(default_factory=list)
  answer: str | None = None

  def content(self) -> list[dict[str, Any]]:
    """The user message's content items: images and text in order."""
    parts = chat.split_image_tags(self.text)
    tags = parts.count(None)
    if tags > len(self.images):
      raise ValueError(f"The message has {tags} image tags but {len(self.images)} image(s); give one image per "
                       "<image_placeholder>.")
    images = iter(self.images)
    items = [{"type": "image", "image": next(images)} for _ in range(len(self.images) - tags)]
    for part in parts:
      items.append({"type": "image", "image": next(images)} if part is None else {"type": "text", "text": part})
    return items or [{"type": "text", "text": ""}]

  def messages(self) -> list[dict[str, Any]]:
    """The turn in transformers' message format; an unanswered turn is the user's message alone."""
    out = [{"role": "user", "content": self.content()}]
    if self.answer is not None:
      out.append({"role": "assistant", "content": [{"type": "text", "text": self.answer}]})
    return out


@dataclasses.dataclass
class Prompt:
  """The model inputs of a conversation's newest turns (`Processor.apply_chat_template(..., return_dict=True)`),
  their token count and how many of the oldest turns were left out (with how many images)."""

  inputs: dict[str, Any]
  num_tokens: int
  dropped: int = 0
  dropped_images: int = 0

  def notice(self, max_tokens: int) -> str | None:
    """What to tell the user when turns were left out, else None."""
    if not self.dropped:
      return None
    images = f" (with {self.dropped_images} image{'s' if self.dropped_images > 1 else ''})" if self.dropped_images else ""
    if self.dropped == 1:
      return (f"The oldest turn{images} no longer fits the model's context of {max_tokens} tokens: it is left out "
              "of the prompt, and the model does not see it now.")
    return (f"The oldest {self.dropped} turns{images} no longer fit the model's context of {max_tokens} tokens: "
            "they are left out of the prompt, and the model does not see them now.")


@dataclasses.dataclass
class Conversation:
  turns: list[Turn] = dataclasses.field(default_factory=list)

  def add_user(self, text: str, images: Sequence[Any] = (), names: Sequence[str] = ()) -> Turn:
    if self.turns and self.turns[-1].answer is None:
      raise ValueError("The last message has no answer yet; answer it (set_answer) or drop it (pop) first.")
    turn = Turn(text, list(images), list(names) or [f"image {i + 1}" for i in range(len(images))])
    turn.content()  # checks tags against images now, not at the next prompt
    self.turns.append(turn)
    return turn

  def set_answer(self, text: str) -> None:
    self.turns[-1].answer = text

  def pop(self) -> Turn:
    """Removes the newest turn (e.g. a message whose answer was stopped before it began) and returns it."""
    return self.turns.pop()

  def reset(self) -> None:
    self.turns.clear()

  @property
  def num_images(self) -> int:
    return sum(len(t.images) for t in self.turns)

  def messages(self, start: int = 0) -> list[dict[str, Any]]:
    return [m for turn in self.turns[start:] for m in turn.messages()]

  def fit(self, processor: Any, max_tokens: int) -> Prompt:
    """The model inputs of the newest turns whose prompt (image tokens included, generation prompt added) is
    at most `max_tokens` tokens, padded to its length bucket (generate.bucket_length, as `Model.generate` pads
    it). Raises ContextTooLong when the newest turn alone does not fit."""
    if not self.turns:
      raise ValueError("The conversation is empty: add a user message first.")
    image_token = processor.tokenizer.image_token
    for start in range(len(self.turns)):
      text = processor.apply_chat_template(self.messages(start), add_generation_prompt=True)
      # The image token is one id, which the processor expands to num_image_tokens (its own encode refuses a
      # prompt past the model's length: here that is an answer, not an error).
      num_tokens = len(processor.tokenizer.encode(text)) + text.count(image_token) * (processor.num_image_tokens - 1)
      if bucket_length(num_tokens) <= max_tokens:
        inputs = processor.apply_chat_template(self.messages(start), add_generation_prompt=True, tokenize=True,
                                               return_dict=True)
        return Prompt(inputs, num_tokens, start, sum(len(t.images) for t in self.turns[:start]))
    last = self.turns[-1]
    raise ContextTooLong(
        f"This message is {num_tokens} tokens long ({len(last.images)} image(s) x {processor.num_image_tokens} "
        f"tokens included), over the {max_tokens} that the model takes with room for its answer. Send fewer "
        "images or a shorter message (or lower the answer's length).")
