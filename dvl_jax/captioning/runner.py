"""The captioning loop: images decoded on host threads ahead of the device, batches bucketed by prompt length,
one `generate` per batch, every result appended to the JSONL as soon as its batch is done.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import signal
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np

from dvl_jax import generate as generation
from dvl_jax.captioning.results import ResultFile
from dvl_jax.captioning.sources import Item
from dvl_jax.processing.images import preprocess

DEFAULT_PROMPT = "Describe this image."


@dataclasses.dataclass
class Prepared:
  """An item ready for the device: its prompt ids and preprocessed pixels, or the error that stopped it."""

  item: Item
  prompt: str
  ids: list[int] | None = None
  pixels: dict[str, np.ndarray] | None = None
  error: str | None = None


@dataclasses.dataclass
class Summary:
  done: int = 0  # captioned in this run
  failed: int = 0  # error lines written in this run
  skipped: int = 0  # already in the output
  tokens: int = 0
  seconds: float = 0.0
  interrupted: bool = False

  def __str__(self) -> str:
    rate = f"{self.done / self.seconds:.2f} images/s, {self.tokens / self.seconds:.1f} tokens/s" if self.seconds else ""
    state = "interrupted" if self.interrupted else "finished"
    return (f"{state}: {self.done} captioned, {self.failed} failed, {self.skipped} already done; "
            f"{self.seconds:.1f} s{', ' + rate if rate else ''}")


class _Stop:
  """First Ctrl-C: finish the batch on the device, write it, stop. Second: abandon it (nothing half-written:
  results are written a whole batch at a time, and the handler never fires inside a write)."""

  def __init__(self):
    self.requested = False
    self.writing = False
    self._pending_abandon = False

  def handler(self, signum, frame):
    if self.requested:
      if self.writing:
        self._pending_abandon = True
        return
      raise KeyboardInterrupt
    self.requested = True
    print("\nStopping after the current batch (Ctrl-C again to abandon it).", file=sys.stderr)

  @contextlib.contextmanager
  def installed(self) -> Iterator[None]:
    if not _main_thread():
      yield
      return
    previous = signal.signal(signal.SIGINT, self.handler)
    try:
      yield
    finally:
      signal.signal(signal.SIGINT, previous)

  @contextlib.contextmanager
  def in_write(self) -> Iterator[None]:
    self.writing = True
    try:
      yield
    finally:
      self.writing = False
      if self._pending_abandon:
        raise KeyboardInterrupt


def _main_thread() -> bool:
  import threading

  return threading.current_thread() is threading.main_thread()


class Captioner:
  """Captions items with a model and its processor, appending results to a ResultFile.

  Args:
    batch_size: rows per `generate` call; a short last batch is padded to it, so one program serves all.
    workers: host threads that decode and preprocess images; `prefetch` batches are prepared ahead.
    generate_kwargs: for `Model.generate` (max_new_tokens, sampling, seed).
  """

  def __init__(self, model, processor, *, prompt: str = DEFAULT_PROMPT, batch_size: int = 8, workers: int = 4,
               prefetch: int = 2, **generate_kwargs: Any):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    self.model, self.processor = model, processor
    self.prompt, self.batch_size, self.workers, self.prefetch = prompt, batch_size, max(1, workers), max(1, prefetch)
    self.generate_kwargs = generate_kwargs
    eos = generate_kwargs.get("eos_token_id") or model.generation_defaults.get("eos_token_id")
    eos = processor.tokenizer.eos_token_id if eos is None else eos
    self.eos_ids = {eos} if isinstance(eos, int) else set(eos)
    self._prompt_ids: dict[str, list[int]] = {}

  # ----- host side -----
  def _ids(self, prompt: str) -> list[int]:
    if prompt not in self._prompt_ids:
      messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
      text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
      self._prompt_ids[prompt] = self.processor.encode(text, 1)
    return self._prompt_ids[prompt]

  def _prepare(self, item: Item) -> Prepared:
    prompt = item.prompt if item.prompt is not None else self.prompt
    out = Prepared(item, prompt)
    try:
      out.ids = self._ids(prompt)
      out.pixels = preprocess(item.image, self.processor.image_config)
    except (OSError, ValueError) as e:  # unreadable, corrupt, truncated, not an image, too large, prompt too long
      out.error = f"{type(e).__name__}: {e}"
    return out

  def _prepared(self, items: Sequence[Item]) -> Iterator[Prepared]:
    """Prepared items in input order, up to `prefetch` batches decoded ahead on the worker threads."""
    window = self.batch_size * self.prefetch
    with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="dvl-decode") as pool:
      pending: collections.deque = collections.deque()
      it = iter(items)
      for item in it:
        pending.append(pool.submit(self._prepare, item))
        if len(pending) >= window:
          break
      while pending:
        yield pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
          pending.append(pool.submit(self._prepare, nxt))

  # ----- device side -----
  def _generate(self, batch: list[Prepared]) -> list[dict[str, Any]]:
    rows = batch + [batch[-1]] * (self.batch_size - len(batch))  # one program for every batch
    inputs = self.processor.pad([p.ids for p in rows])
    for key in rows[0].pixels:
      inputs[key] = np.stack([p.pixels[key] for p in rows])[:, None]  # [B, 1, S, S, 3]
    out = self.model.generate(**inputs, **self.generate_kwargs)
    records = []
    for p, tokens, n in zip(batch, out.tokens, out.lengths):
      tokens = tokens[:n]
      stopped = n > 0 and int(tokens[-1]) in self.eos_ids
      records.append({"image": p.item.image, "prompt": p.prompt, "caption": self.processor.decode(tokens),
                      "num_tokens": int(n), "finish_reason": "stop" if stopped else "length", "error": None})
    return records

  def run(self, items: Sequence[Item], results: ResultFile, progress: bool = True) -> Summary:
    """Captions the items not yet in `results`; returns what happened."""
    summary = Summary()
    todo = []
    for item in items:
      if (item.image, item.prompt if item.prompt is not None else self.prompt) in results.done:
        summary.skipped += 1
      else:
        todo.append(item)
    bar = _progress_bar(len(todo), progress)
    stop = _Stop()
    start = time.perf_counter()
    buckets: dict[int, list[Prepared]] = collections.defaultdict(list)

    def flush(batch: list[Prepared]) -> None:
      records = self._generate(batch)
      with stop.in_write():
        results.write(records)
      summary.done += len(records)
      summary.tokens += sum(r["num_tokens"] for r in records)
      bar.update(len(records))
      elapsed = time.perf_counter() - start
      bar.set_postfix_str(f"{summary.done / elapsed:.2f} img/s, {summary.tokens / elapsed:.1f} tok/s", refresh=False)

    try:
      with stop.installed():
        for prepared in self._prepared(todo):
          if prepared.error is not None:
            with stop.in_write():
              results.write([{"image": prepared.item.image, "prompt": prepared.prompt, "caption": None,
                              "num_tokens": 0, "finish_reason": None, "error": prepared.error}])
            summary.failed += 1
            bar.update(1)
          else:
            bucket = buckets[generation.bucket_length(len(prepared.ids))]
            bucket.append(prepared)
            if len(bucket) == self.batch_size:
              flush(bucket[:])
              bucket.clear()
          if stop.requested:
            break
        if not stop.requested:
          for bucket in buckets.values():
            if bucket:
              flush(bucket)
    except KeyboardInterrupt:
      stop.requested = True
    finally:
      bar.close()
    summary.interrupted = stop.requested
    summary.seconds = time.perf_counter() - start
    return summary


def _progress_bar(total: int, enabled: bool):
  from tqdm import tqdm

  return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr)
