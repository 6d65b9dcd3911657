"""Stopping a run cleanly: SIGTERM (a preempted TPU VM, SLURM's time limit, `kill`) or Ctrl-C asks the loop to
save a checkpoint after the current step and exit.

  with StopRequest() as stop:
    for step in ...:
      state = train_step(...)
      if stop.agreed():       # every process stops at the same step (a collective when there are several)
        save(step); break
  stop.exit_code              # 0 after SIGTERM, 130 after Ctrl-C, None when nothing asked

A second Ctrl-C stops at once (KeyboardInterrupt), losing the steps since the last checkpoint; SIGKILL cannot be
caught and loses the same. With several processes the signal may reach them at different steps, so `agreed()`
takes the OR over processes every step (a tiny all-gather) and all save the same step together.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}


class StopRequest:
  """Catches SIGTERM and SIGINT while active (a context manager); the previous handlers come back on exit.
  Outside the main thread, where Python cannot install handlers, it catches nothing."""

  def __init__(self):
    self.signal: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():
      for sig in EXIT_CODES:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, sig: int, frame: Any) -> None:
    if sig == signal.SIGINT and self.signal is not None:
      raise KeyboardInterrupt  # the second Ctrl-C: now
    self.signal = sig

  @property
  def requested(self) -> bool:
    """Whether this process was asked to stop."""
    return self.signal is not None

  def agreed(self) -> bool:
    """Whether any process was asked to stop; every process must call it at every step."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

  @property
  def exit_code(self) -> int | None:
    return None if self.signal is None else EXIT_CODES.get(self.signal, 0)
