"""A run's metrics: `metrics.jsonl` (a line per logged step), TensorBoard event files, a progress bar.

  log = MetricsLog(run_dir, total_steps=10_000, start_step=restored_step)
  log.write(step, {"loss": 2.31, "learning_rate": 2e-5, "grad_norm": 0.8, "tokens_per_second": 5.1e4, ...})
  log.close()

Only process 0 writes (`enabled`); the others get a MetricsLog that does nothing, so the loop has no branches.

Resuming at step s cuts `metrics.jsonl` back to the lines of steps <= s (a killed run may have logged steps
past its last checkpoint, which the rerun logs again), and starts the TensorBoard writer with `purge_step` s + 1,
so TensorBoard drops the earlier run's events from there on: either file shows one curve, the resumed one.

TensorBoard files come from tensorboardX (protobuf only; no TensorFlow). Keys map to TensorBoard tags under
"train/" unless they have their own prefix ("eval/loss").
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

from dvl_jax.data.report import cut_jsonl

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Shown on the progress bar, in this order, when present.
_BAR_KEYS = (("loss", "loss", "{:.4f}"), ("learning_rate", "lr", "{:.2e}"), ("tokens_per_second", "tok/s", "{:,.0f}"))


def _clean(value: Any) -> Any:
  """A JSON value: numpy and jax scalars to Python numbers, NaN and infinities to null."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricsLog:
  """Args:
    run_dir: the run's directory; None: nothing written (the progress bar only).
    total_steps: the run's length (the bar's total).
    start_step: the step the run starts or resumes at; later lines are cut from metrics.jsonl.
    enabled: False in every process but 0: nothing is written or shown.
    progress: show a tqdm bar (on a terminal, by default).
    tensorboard: write TensorBoard event files under run_dir/tensorboard.
  """

  def __init__(self, run_dir: str | None, *, total_steps: int, start_step: int = 0, enabled: bool = True,
               progress: bool | None = None, tensorboard: bool = True):
    self.enabled = enabled
    self.path = None if run_dir is None or not enabled else os.path.join(run_dir, METRICS_FILE)
    self._tb = self._bar = None
    if not enabled:
      return
    if self.path is not None:
      cut_jsonl(self.path, start_step)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        self._tb = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=start_step + 1, flush_secs=30)
    if progress is None:
      progress = sys.stderr.isatty()
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel

      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
    self._step = start_step

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `metrics` (numbers; None for unknown) at `step`: a JSON line, TensorBoard scalars, the bar."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
    if self.path is not None:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key if "/" in key else f"train/{key}", value, global_step=int(step))
    if self._bar is not None:
      shown = {label: fmt.format(record[key]) for key, label, fmt in _BAR_KEYS if record.get(key) is not None}
      if shown:
        self._bar.set_postfix(shown, refresh=False)
      self.advance(step)

  def advance(self, step: int) -> None:
    """Moves the bar to `step` (steps that are not logged still move it)."""
    if self._bar is not None and step > self._step:
      self._bar.update(step - self._step)
      self._step = step

  def message(self, text: str) -> None:
    """A line of text above the bar (or on stderr)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
  """The lines of a run's metrics.jsonl (a line cut short by a kill is left out)."""
  out = []
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        continue
  return out
