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
import threading
import time
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from dvl_jax import generate as generation
from dvl_jax.captioning.results import ResultFile
from dvl_jax.captioning.sources import Item
from dvl_jax.processing.images import load_image, preprocess

DEFAULT_PROMPT = "Describe this image."


@dataclasses.dataclass
class Prepared:
  """An item ready for the device: its prompt ids and preprocessed pixels, or the error that stopped it; the
  warnings raised while decoding it (e.g. Pillow's DecompressionBombWarning), if any."""

  item: Item
  prompt: str
  ids: list[int] | None = None
  pixels: dict[str, np.ndarray] | None = None
  error: str | None = None
  warning: str | None = None


@dataclasses.dataclass
class Summary:
  done: int = 0  # captioned in this run
  failed: int = 0  # error lines written in this run
  skipped: int = 0  # already in the output (captioned, or failed and not retried)
  retried: int = 0  # failed in an earlier run and tried again in this one
  tokens: int = 0
  seconds: float = 0.0
  interrupted: bool = False
  failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (image, error) still failed

  def __str__(self) -> str:
    rate = f"{self.done / self.seconds:.2f} images/s, {self.tokens / self.seconds:.1f} tokens/s" if self.seconds else ""
    state = "interrupted" if self.interrupted else "finished"
    retried = f" ({self.retried} retried)" if self.retried else ""
    earlier = len(self.failures) - self.failed
    earlier = f", {earlier} failed earlier and not retried" if earlier else ""
    return (f"{state}: {self.done} captioned, {self.failed} failed{retried}, {self.skipped} already done{earlier}; "
            f"{self.seconds:.1f} s{', ' + rate if rate else ''}")

  def failure_report(self, out: str, show: int = 5) -> str:
    """The first `show` failed images with their reasons, then how many more and where to find them."""
    lines = [f"  {image}: {error}" for image, error in self.failures[:show]]
    if len(self.failures) > show:
      lines.append(f"  ... and {len(self.failures) - show} more; see {out}")
    return "\n".join(lines)


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
    # The ids `generate` stops at, resolved as Model.generate resolves them (dvl_jax.generate.GenerationConfig);
    # where the model has none, the tokenizer's EOS still marks a caption that ends with it as stopped.
    eos = model.generation_config.override(eos_token_id=generate_kwargs.get("eos_token_id")).eos_token_id
    if eos is None and processor.tokenizer.eos_token_id is not None:
      eos = (processor.tokenizer.eos_token_id,)
    self.eos_ids = set(eos or ())
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
    _caught.messages = caught = []  # the warnings of this thread's image (see _warnings_per_image)
    try:
      out.ids = self._ids(prompt)
      config = self.processor.image_config
      out.pixels = preprocess(load_image(item.image, max_pixels=config.max_pixels), config)
    except (OSError, ValueError) as e:  # unreadable, corrupt, truncated, not an image, too large, prompt too long
      out.error = f"{type(e).__name__}: {e}"
    finally:
      _caught.messages = None
    out.warning = "; ".join(dict.fromkeys(caught)) or None
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
      if p.warning:
        records[-1]["warning"] = p.warning
    return records

  def run(self, items: Sequence[Item], results: ResultFile, progress: bool = True,
          retry_errors: bool = True) -> Summary:
    """Captions the items not yet in `results`, and those whose last line there is an error unless
    `retry_errors` is False; returns what happened (`failures`: every item whose last line is an error)."""
    summary = Summary()
    todo = []
    for item in items:
      key = (item.image, item.prompt if item.prompt is not None else self.prompt)
      if key not in results.done:
        todo.append(item)
      elif results.done[key] is not None and retry_errors:
        todo.append(item)
        summary.retried += 1
      else:
        summary.skipped += 1
        if results.done[key] is not None:
          summary.failures.append((item.image, results.done[key]))
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
      with stop.installed(), _warnings_per_image(bar):
        for prepared in self._prepared(todo):
          if prepared.error is not None:
            with stop.in_write():
              results.write([{"image": prepared.item.image, "prompt": prepared.prompt, "caption": None,
                              "num_tokens": 0, "finish_reason": None, "error": prepared.error}])
            summary.failed += 1
            summary.failures.append((prepared.item.image, prepared.error))
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


_caught = threading.local()  # .messages: the list collecting the warnings of the image this thread decodes


@contextlib.contextmanager
def _warnings_per_image(bar) -> Iterator[None]:
  """Warnings raised while an image is decoded (Pillow's DecompressionBombWarning, corrupt EXIF, ...) go to that
  image's record, each time; any other warning is written above the progress bar, not through it."""
  with warnings.catch_warnings():
    warnings.simplefilter("always", Image.DecompressionBombWarning)
    warnings.filterwarnings("always", module=r"PIL\.")

    def show(message, category, filename, lineno, file=None, line=None):
      text = f"{category.__name__}: {message}"
      if getattr(_caught, "messages", None) is not None:
        _caught.messages.append(text)
      else:
        bar.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=sys.stderr)

    warnings.showwarning = show
    yield


def _progress_bar(total: int, enabled: bool):
  """One rate only: ours (captioned images and tokens per second, in the postfix), not tqdm's own it/s."""
  from tqdm import tqdm

  return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
