"""The ledger of what the pipeline did not train on: counts that survive a restart, a JSONL line per skipped
record ({"step", "where", "source", "kind", "reason"}), a summary line for the log, and strict mode.

A skipped record is reported with the step whose batch it would have been in. On a restore to step s, the
counts come back from the iterator state and the JSONL keeps its lines up to step s (the steps after it are
redone and report their records again), so neither counts nor lines are lost or doubled.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any, Callable

from dvl_jax.data.batches import HostBatch

_log = logging.getLogger(__name__)
LOGGED_ONE_BY_ONE = 20  # skipped records logged each on its own line; the rest only in the JSONL and summaries


class DataError(ValueError):
  """A bad record in strict mode."""


class SkipReport:
  """Args:
    path: the JSONL of skipped records (made when the first is written), or None.
    strict: raise DataError at the first skipped record of kind "bad" (overlong ones are a setting, not an error).
    log: where summaries and the first records go.
  """

  def __init__(self, path: str | None = None, *, strict: bool = False, log: Callable[[str], None] = _log.warning):
    self.path, self.strict, self._log = path, strict, log
    self.counts: collections.Counter[str] = collections.Counter()  # "bad", "overlong", "truncated", "samples"
    self.by_source: collections.Counter[str] = collections.Counter()

  def add(self, batch: HostBatch, step: int) -> None:
    """Counts a batch's samples and skipped records, step being the batch's step (1-based)."""
    self.counts["samples"] += batch.samples
    self.counts["truncated"] += batch.truncated
    lines = []
    for s in batch.skipped:
      if self.strict and s.kind == "bad":
        raise DataError(f"{s.where}: {s.reason} (source {s.source!r}). strict mode stops at the first bad record; "
                        "fix or remove it, or turn strict off to skip and count such records.")
      self.counts[s.kind] += 1
      self.by_source[s.source] += 1
      if self.counts["bad"] + self.counts["overlong"] <= LOGGED_ONE_BY_ONE:
        self._log(f"Skipped {s.where}: {s.reason}")
      lines.append(json.dumps({"step": step, "where": s.where, "source": s.source, "kind": s.kind,
                               "reason": s.reason}, ensure_ascii=False) + "\n")
    if lines and self.path:
      with open(self.path, "a", encoding="utf-8") as f:
        f.writelines(lines)

  @property
  def skipped(self) -> int:
    return self.counts["bad"] + self.counts["overlong"]

  def summary(self) -> str:
    c = self.counts
    read = c["samples"] + self.skipped
    text = (f"data: {c['samples']:,} samples trained on, {self.skipped:,} of {read:,} records skipped "
            f"({c['bad']:,} bad, {c['overlong']:,} too long), {c['truncated']:,} truncated")
    if self.by_source:
      text += "; skipped by source: " + ", ".join(f"{k} {v:,}" for k, v in self.by_source.most_common())
    if self.skipped and self.path:
      text += f"; each in {self.path}"
    return text

  def state(self) -> dict[str, Any]:
    return {"counts": dict(self.counts), "by_source": dict(self.by_source)}

  def restore(self, state: dict[str, Any], step: int) -> None:
    """Counts from `state` (saved at `step`); the JSONL cut back to the lines of steps <= step."""
    self.counts = collections.Counter(state["counts"])
    self.by_source = collections.Counter(state["by_source"])
    if self.path:
      cut_jsonl(self.path, step)


def cut_jsonl(path: str, step: int) -> None:
  """Keeps the lines of a JSONL file whose "step" is <= step, dropping a line cut short by a kill; the file is
  replaced atomically, and left alone when nothing is to go (a resumed run rewrites what came later)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  keep = [line for line in lines if _step_of(line) <= step]
  if len(keep) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def _step_of(line: str) -> float:
  """A JSONL line's step; a line cut short by a kill counts as after every step (dropped on restore)."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")
