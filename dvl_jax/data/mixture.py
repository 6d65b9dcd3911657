"""Modality-grouped steps: each step's batch comes whole from the text stream or from the multimodal one.

DeepSeek-VL trains with modality grouping (every global batch all-text or all-multimodal: no step pays for a
vision tower that a third of its rows use; +20% training efficiency in the paper) and a modality warm-up: the
share of text steps starts at 1.0 and falls linearly to its target over the first N steps, so that the language
model's skills are not swamped by the new modality (paper section 3.2.2).

Which stream feeds step s is a pure function of (seed, s): every process picks the same, and a restored
iterator picks what an uninterrupted one would. The state is the step and each stream's state.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np


def text_share(step: int, target: float, warmup_steps: int) -> float:
  """The probability that step `step` is a text step: 1.0 at step 0, falling linearly to `target` at
  `warmup_steps` (and `target` from the start when warmup_steps is 0)."""
  if warmup_steps <= 0 or step >= warmup_steps:
    return target
  return 1.0 - (1.0 - target) * step / warmup_steps


def is_text_step(step: int, seed: int, target: float, warmup_steps: int) -> bool:
  """Whether step `step` takes the text stream: a uniform draw keyed by (seed, step) below `text_share`."""
  return bool(np.random.default_rng([seed, step]).random() < text_share(step, target, warmup_steps))


class ModalityIterDataset(grain.IterDataset):
  """Two streams of batches -> one: step s takes the next batch of the text stream when
  `is_text_step(s, ...)`, else of the multimodal one.

  Args:
    text, multimodal: IterDatasets of batches.
    target: the text share of steps after the warm-up; warmup_steps: as `text_share`; seed: of the draws.
  """

  def __init__(self, text: grain.IterDataset, multimodal: grain.IterDataset, *, target: float, warmup_steps: int,
               seed: int):
    super().__init__([text, multimodal])
    self._kw = dict(target=target, warmup_steps=warmup_steps, seed=seed)

  def __iter__(self) -> _ModalityIterator:
    return _ModalityIterator([p.__iter__() for p in self._parents], **self._kw)

  def __str__(self) -> str:
    return f"ModalityIterDataset({self._kw})"


class _ModalityIterator(grain.DatasetIterator):

  def __init__(self, parents: list[grain.DatasetIterator], *, target: float, warmup_steps: int, seed: int):
    super().__init__(parents)
    self._target, self._warmup, self._seed = target, warmup_steps, seed
    self._step = 0

  def __next__(self) -> Any:
    text = is_text_step(self._step, self._seed, self._target, self._warmup)
    batch = next(self._parents[0 if text else 1])
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, "text": self._parents[0].get_state(), "multimodal": self._parents[1].get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._step = int(state["step"])
    self._parents[0].set_state(state["text"])
    self._parents[1].set_state(state["multimodal"])
