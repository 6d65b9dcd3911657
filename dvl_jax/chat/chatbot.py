"""The chat engine both front ends share (chat.py, the terminal; demo.py, the web page).

  bot = Chatbot.load()                                   # the shipped shapes captioner; or Chatbot.load(ckpt)
  conversation = Conversation()
  conversation.add_user("Describe this image.", [load_image("examples/images/shapes_00.png")])
  reply = bot.reply(conversation)                        # fits the prompt now (ContextTooLong), notice
  for piece in reply:                                    # the answer's text as it is generated
    print(piece, end="", flush=True)
  reply.finish_reason                                    # "stop" (EOS), "length" or "stopped" (closed early)

The answer is written into the conversation when the reply ends, however it ends: at its EOS, at its length, or
when it is stopped (`Reply.stop()`, from chat.py's Ctrl-C handler; the web page's Stop; the iterator closed; an
exception passing through it); a stopped answer keeps the text it had. One Chatbot serves any number of
conversations; the web demo runs one reply at a time (its queue), and each conversation is its user's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Iterator

import numpy as np

from dvl_jax.chat.conversation import Conversation, Prompt
from dvl_jax.chat.detokenizer import IncrementalDetokenizer
from dvl_jax.generate import GENERATION_CONFIG_FILE, bucket_length
from dvl_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How an answer is drawn. The defaults are the official cli_chat.py's: temperature 0.2, top-p 0.95, repetition
  penalty 1.1, at most 512 new tokens. temperature 0 or greedy=True is greedy decoding; the repetition penalty
  applies either way (1.0 turns it off), as in transformers' generate."""

  temperature: float = 0.2
  top_p: float = 0.95
  top_k: int = 0
  repetition_penalty: float = 1.1
  max_new_tokens: int = 512
  greedy: bool = False

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike) -> Sampling:
    """The official defaults, with what the checkpoint's generation_config.json sets, as transformers' generate
    takes them: do_sample false is greedy; temperature, top_p, top_k, repetition_penalty, max_new_tokens. (The
    DeepSeek-VL checkpoints set none; the shapes captioner sets greedy and no penalty: its exact answers repeat
    words, "an orange square and an orange circle", which a penalty of 1.1 talks it out of.)"""
    path = os.path.join(os.fspath(directory), GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
      return cls()
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    fields = {k: raw[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
              if raw.get(k) is not None}
    if raw.get("do_sample") is False:
      fields["greedy"] = True
    try:
      return cls(**fields)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{path}: {e}") from e

  def describe(self) -> str:
    how = "greedy" if not self.do_sample else f"temperature {self.temperature}, top-p {self.top_p}" + (
        f", top-k {self.top_k}" if self.top_k else "")
    return f"{how}, repetition penalty {self.repetition_penalty}, at most {self.max_new_tokens} new tokens"

  def __post_init__(self):
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}.")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}.")
    self.config()  # SamplingConfig checks top_k, top_p and the penalty, naming the value

  @property
  def do_sample(self) -> bool:
    return not self.greedy and self.temperature > 0

  def config(self) -> SamplingConfig:
    if not self.do_sample:
      return SamplingConfig(repetition_penalty=self.repetition_penalty)
    return SamplingConfig(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          repetition_penalty=self.repetition_penalty)


class Chatbot:
  """A model, its processor and the context policy.

  Attributes:
    model, processor: a dvl_jax Model and its Processor.
    name: the checkpoint's directory name, for display.
    max_context_tokens: the longest prompt to send, or None: the model's positions less the room kept for the
      answer (`context_tokens`).
    sampling: the default Sampling of `reply` (`load`: the checkpoint's, Sampling.from_checkpoint).
  """

  def __init__(self, model: Any, processor: Any, *, name: str = "model", max_context_tokens: int | None = None,
               seed: int | None = None, sampling: Sampling | None = None):
    if max_context_tokens is not None and max_context_tokens < 1:
      raise ValueError(f"max_context_tokens must be >= 1, got {max_context_tokens}.")
    self.model = model
    self.processor = processor
    self.name = name
    self.max_context_tokens = max_context_tokens
    self.sampling = sampling or Sampling()
    self._seeds = random.Random(seed)  # each reply's sampling seed: fixed by `seed`, else fresh each run
    eos = model.generation_config.eos_token_id or ()
    if not eos and processor.tokenizer.eos_token_id is not None:
      eos = (processor.tokenizer.eos_token_id,)
    self.eos_ids = tuple(int(i) for i in eos)

  @classmethod
  def load(cls, ckpt: str | os.PathLike | None = None, *, dtype: str | None = None,
           max_context_tokens: int | None = None, seed: int | None = None) -> Chatbot:
    """From a checkpoint directory (converted or exported by train.py); None: the shipped shapes captioner."""
    import dvl_jax

    path = os.fspath(ckpt) if ckpt is not None else dvl_jax.default_checkpoint()
    model = dvl_jax.load(path, dtype=dtype)
    processor = dvl_jax.Processor.from_pretrained(path)
    name = os.path.basename(os.path.normpath(path)) if ckpt is not None else "the shapes captioner (default)"
    return cls(model, processor, name=name, max_context_tokens=max_context_tokens, seed=seed,
               sampling=Sampling.from_checkpoint(path))

  @property
  def max_positions(self) -> int:
    return self.model.config.text.max_position_embeddings

  def context_tokens(self, sampling: Sampling) -> int:
    """The longest prompt (padded to its bucket) a reply sends: the model's positions less the answer's room
    (max_new_tokens, but at most half the positions, so a small model still takes a long history), capped by
    `max_context_tokens`."""
    budget = self.max_positions - min(sampling.max_new_tokens, self.max_positions // 2)
    return min(budget, self.max_context_tokens) if self.max_context_tokens else budget

  def reply(self, conversation: Conversation, sampling: Sampling | None = None, seed: int | None = None) -> Reply:
    """Starts the answer to the conversation's last (unanswered) user message (sampling: default
    `self.sampling`). Fitting the prompt happens here, so ContextTooLong (the message alone is too long) is
    raised before any text; nothing is generated until the Reply is iterated."""
    sampling = sampling or self.sampling
    if not conversation.turns or conversation.turns[-1].answer is not None:
      raise ValueError("The conversation has no unanswered user message to reply to; add_user first.")
    context = self.context_tokens(sampling)
    prompt = conversation.fit(self.processor, context)
    max_new = min(sampling.max_new_tokens, self.max_positions - bucket_length(prompt.num_tokens))
    return Reply(self, conversation, prompt, sampling, max_new, self._seeds.randrange(2**31) if seed is None else seed,
                 prompt.notice(context))


class Reply:
  """One answer being generated. Iterate it for the text's pieces (the first without leading whitespace).

  Attributes:
    text: the answer so far (the pieces joined).
    notice: what to tell the user before the answer (turns left out of the prompt), or None.
    finish_reason: None while running; "stop" (EOS), "length" (max_new_tokens, or the model's positions) or
      "stopped" (closed, or an exception such as KeyboardInterrupt passed through).
    max_new_tokens: the most tokens this answer may have (the request, capped by the room in the model).
    prompt: the Prompt sent (its inputs, token count, turns left out).
  """

  def __init__(self, chatbot: Chatbot, conversation: Conversation, prompt: Prompt, sampling: Sampling,
               max_new_tokens: int, seed: int, notice: str | None):
    self.prompt = prompt
    self.notice = notice
    self.max_new_tokens = max_new_tokens
    self.text = ""
    self.finish_reason: str | None = None
    self.num_tokens = 0
    self._turn = conversation.turns[-1]
    self._stop_requested = False
    self._pieces = self._generate(chatbot, conversation, sampling, seed)

  def __iter__(self) -> Iterator[str]:
    return self._pieces

  def stop(self) -> None:
    """Asks the answer to end after the token being generated (safe from a signal handler or another thread);
    iterating then ends, with finish_reason "stopped"."""
    self._stop_requested = True

  def close(self) -> None:
    """Stops the answer where it is (the conversation keeps the text so far)."""
    self._pieces.close()
    if self.finish_reason is None:  # closed before it started: the generator's body never ran
      self.finish_reason, self._turn.answer = "stopped", ""

  def _generate(self, chatbot: Chatbot, conversation: Conversation, sampling: Sampling, seed: int) -> Iterator[str]:
    detokenizer = IncrementalDetokenizer(chatbot.processor)
    steps = chatbot.model.stream(**self.prompt.inputs, max_new_tokens=self.max_new_tokens,
                                 eos_token_id=list(chatbot.eos_ids), seed=seed,
                                 **dataclasses.asdict(sampling.config()))
    reason = "stopped"
    try:
      for step in steps:
        if self._stop_requested:
          break
        token = int(np.asarray(step)[0])
        self.num_tokens += 1
        if token in chatbot.eos_ids:
          reason = "stop"
          break
        piece = self._add(detokenizer.push(token))
        if piece:
          yield piece
      else:
        reason = "length"
      piece = self._add(detokenizer.flush())
      if piece:
        yield piece
    finally:
      steps.close()
      self.finish_reason = self.finish_reason or reason
      self._turn.answer = self.text.rstrip()

  def _add(self, piece: str) -> str:
    if not self.text:
      piece = piece.lstrip()
    self.text += piece
    return piece
