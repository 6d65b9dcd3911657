"""Examples -> rows: one sample a row (padding mode), or several packed into a row of seq_len tokens.

Packing is first fit in rounds (as grain's FirstFitPackIterDataset): up to `bins` rows are open at once; each
example goes into the first row with room for its tokens and images; when one fits in none and all rows are
open, the round's rows are emitted in order and that example opens the next round. A sample longer than a row
never comes here (examples.fit cut or dropped it).

The iterator state is the parent's state where the current round began and how many of its rows were emitted:
a restored iterator rebuilds the round from its first element and skips the rows already emitted, so it yields
exactly what an uninterrupted one would, with no example of a round held in the state. Records skipped upstream
(`Skipped`) ride along with the first row of their round, so each is reported once.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import grain

from dvl_jax.data.examples import Example


# Records skipped one after the other, with no sample between, before the pipeline gives up: the data (or the
# settings: a seq_len shorter than every sample) leave nothing to train on, and looping over it would hang.
MAX_SKIPPED_IN_A_ROW = 1000


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record the pipeline did not train on.

  Attributes:
    where: its "file:line".
    source: its source's name.
    reason: why.
    kind: "bad" (the record cannot be used) or "overlong" (dropped for its length).
  """

  where: str
  source: str
  reason: str
  kind: str = "bad"


@dataclasses.dataclass
class Row:
  """The examples of one row, in order, and the records skipped on the way to it."""

  examples: list[Example]
  skipped: list[Skipped] = dataclasses.field(default_factory=list)

  @property
  def tokens(self) -> int:
    return sum(len(e) for e in self.examples)

  @property
  def images(self) -> int:
    return sum(e.num_images for e in self.examples)


class RowsIterDataset(grain.IterDataset):
  """Example | Skipped elements -> Rows.

  Args:
    parent: an IterDataset of Example and Skipped elements.
    seq_len: the most tokens of a row; max_images: the most images.
    packing: pack several examples a row; False: one example a row.
    bins: rows open at once when packing.
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, max_images: int, packing: bool, bins: int = 8):
    super().__init__(parent)
    self._kw = dict(seq_len=seq_len, max_images=max_images, bins=bins if packing else 1, packing=packing)

  def __iter__(self) -> _RowsIterator:
    return _RowsIterator(self._parent.__iter__(), **self._kw)

  def __str__(self) -> str:
    return f"RowsIterDataset({self._kw})"


class _RowsIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, max_images: int, bins: int, packing: bool):
    super().__init__(parent)
    self._seq_len, self._max_images, self._bins, self._packing = seq_len, max_images, bins, packing
    self._pending: list[Row] = []  # the current round's rows not yet emitted
    self._round_state: Any = None  # the parent's state where the current round began
    self._emitted = 0  # rows of the current round emitted
    self._carry: tuple[Any, Any] | None = None  # (the parent's state before it, the element that opens the next round)
    self._skip_rows = 0  # after set_state: rows of the restored round to drop

  def __next__(self) -> Row:
    if not self._pending:
      self._fill_round()
      self._pending, self._emitted = self._pending[self._skip_rows:], self._skip_rows
      self._skip_rows = 0
      if not self._pending:  # the restored round had no rows left: the next one
        return next(self)
    self._emitted += 1
    return self._pending.pop(0)

  def _fits(self, row: Row, example: Example) -> bool:
    return ((self._packing or not row.examples) and row.tokens + len(example) <= self._seq_len
            and row.images + example.num_images <= self._max_images)

  def _fill_round(self) -> None:
    if self._carry is not None:
      state, element = self._carry
      self._carry = None
    else:
      state, element = self._parent.get_state(), next(self._parent)  # StopIteration ends the rows too
    self._round_state = state
    rows: list[Row] = []
    skipped: list[Skipped] = []
    while True:
      if isinstance(element, Skipped):
        skipped.append(element)
        if not rows and len(skipped) >= MAX_SKIPPED_IN_A_ROW:
          raise_all_skipped(skipped)
      else:
        row = next((r for r in rows if self._fits(r, element)), None)
        if row is not None:
          row.examples.append(element)
        elif len(rows) < self._bins:
          rows.append(Row([element]))
        else:
          self._carry = (state, element)
          break
      state = self._parent.get_state()
      try:
        element = next(self._parent)
      except StopIteration:
        if not rows:
          raise
        break
    rows[0].skipped = skipped
    self._pending = rows

  def get_state(self) -> dict[str, Any]:
    if self._pending or self._skip_rows:
      round_state = self._round_state if self._pending else self._parent.get_state()
      return {"round": round_state, "emitted": self._emitted if self._pending else self._skip_rows}
    if self._carry is not None:
      return {"round": self._carry[0], "emitted": 0}
    return {"round": self._parent.get_state(), "emitted": 0}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["round"])
    self._pending, self._carry, self._skip_rows = [], None, int(state["emitted"])


def raise_all_skipped(skipped: list[Skipped]) -> None:
  reasons = collections.Counter(s.reason for s in skipped).most_common(3)
  raise ValueError(f"The last {len(skipped)} records read were all skipped, so there is nothing to train on. "
                   "The most common reasons: " + "; ".join(f"{n} x {r} (e.g. {next(s.where for s in skipped if s.reason == r)})"
                                                           for r, n in reasons)
                   + ". Fix the data or the settings (seq_len, max_images, overlong).")
