"""Learning-rate schedules: a linear warm-up, then cosine, step or constant. Each is an `optax.Schedule`.

Every schedule maps the optimizer step (0 for the first update, as optax counts it) to a learning rate:

  lr(s) = peak * warmup(s) * decay(s),   warmup(s) = min(1, s / warmup_steps)  (1 when warmup_steps == 0)

The warm-up rises linearly from 0, so the first update has lr 0 and step `warmup_steps` is the first at the peak;
this is transformers' `get_cosine_schedule_with_warmup` and optax's `warmup_cosine_decay_schedule(init_value=0)`.
torch's `LambdaLR(opt, lambda s: float(schedule(s)) / peak)` steps through the same values.

The decay shapes (DeepSeek-VL, Table 4: S1 and S3 cosine, S2 step):
- cosine: from the peak at the end of the warm-up to `final_fraction * peak` at `total_steps`, then flat;
- step: the peak, multiplied by `decay_factor` at each of the fractions `decay_at` of `total_steps` (counted
  from step 0, warm-up included). The defaults are DeepSeek LLM's multi-step schedule, which DeepSeek-VL's S2
  continues (arXiv 2401.02954, Sec. 2.3): 31.6% of the peak after 80% of training, 10% after 90%
  (0.1 ** 0.5 at 0.8 and again at 0.9);
- constant: the peak after the warm-up.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "step", "constant")
DEFAULT_DECAY_AT = (0.8, 0.9)
DEFAULT_DECAY_FACTOR = 0.1 ** 0.5


def _check_common(peak_value: float, total_steps: int, warmup_steps: int) -> None:
  if not peak_value > 0:
    raise ValueError(f"The peak learning rate must be > 0, got {peak_value!r}.")
  if not isinstance(total_steps, int) or total_steps <= 0:
    raise ValueError(f"total_steps must be a positive int, got {total_steps!r}.")
  if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}: "
                     "shorten the warm-up or train for more steps.")


def _warmup(step: jnp.ndarray, warmup_steps: int) -> jnp.ndarray:
  """min(1, step / warmup_steps): 0 at step 0, 1 from `warmup_steps` on."""
  if warmup_steps == 0:
    return jnp.ones_like(step)
  return jnp.minimum(1.0, step / warmup_steps)


def cosine(peak_value: float, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> optax.Schedule:
  """Linear warm-up to `peak_value`, then a half cosine down to `final_fraction * peak_value` at `total_steps`.

  lr(s) = peak * (f + (1 - f) * (1 + cos(pi * p)) / 2),  p = clip((s - warmup) / (total - warmup), 0, 1)
  after the warm-up: torch's CosineAnnealingLR(T_max=total - warmup, eta_min=f * peak), shifted by the warm-up.
  """
  _check_common(peak_value, total_steps, warmup_steps)
  if not 0.0 <= final_fraction <= 1.0:
    raise ValueError(f"final_fraction (the end lr over the peak) must lie in [0, 1], got {final_fraction!r}.")
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    progress = jnp.clip((s - warmup_steps) / decay_steps, 0.0, 1.0)
    shape = final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return peak_value * _warmup(s, warmup_steps) * shape

  return schedule


def decay_boundaries(total_steps: int, warmup_steps: int, decay_at: Sequence[float]) -> tuple[int, ...]:
  """The steps at which the step schedule decays: int(fraction * total_steps) for each fraction.

  Raises:
    ValueError: fractions not strictly increasing in (0, 1], or a decay that falls inside the warm-up.
  """
  fractions = tuple(decay_at)
  if any(not 0.0 < f <= 1.0 for f in fractions) or any(a >= b for a, b in zip(fractions, fractions[1:])):
    raise ValueError(f"decay_at must be strictly increasing fractions of total_steps in (0, 1], got {fractions!r}; "
                     f"e.g. {DEFAULT_DECAY_AT}.")
  boundaries = tuple(int(f * total_steps) for f in fractions)
  for f, b in zip(fractions, boundaries):
    if b <= warmup_steps:
      raise ValueError(f"decay_at={f} of total_steps={total_steps} decays at step {b}, inside the warm-up of "
                       f"{warmup_steps} steps: decay after the warm-up (a fraction above "
                       f"{warmup_steps / total_steps:.4g}) or shorten the warm-up.")
  if len(set(boundaries)) != len(boundaries):
    raise ValueError(f"decay_at={fractions!r} of total_steps={total_steps} gives repeated decay steps {boundaries}: "
                     "space the fractions further apart or train for more steps.")
  return boundaries


def step(peak_value: float, total_steps: int, warmup_steps: int = 0, decay_at: Sequence[float] = DEFAULT_DECAY_AT,
         decay_factor: float = DEFAULT_DECAY_FACTOR) -> optax.Schedule:
  """Linear warm-up to `peak_value`, then multi-step decay: times `decay_factor` from each decay step on.

  lr(s) = peak * decay_factor ** #{b in boundaries: s >= b}, boundaries = int(f * total_steps) for f in decay_at:
  torch's MultiStepLR(milestones=boundaries, gamma=decay_factor), after the warm-up.
  """
  _check_common(peak_value, total_steps, warmup_steps)
  if not 0.0 < decay_factor <= 1.0:
    raise ValueError(f"decay_factor (the lr multiplier at each decay step) must lie in (0, 1], got {decay_factor!r}.")
  boundaries = jnp.asarray(decay_boundaries(total_steps, warmup_steps, decay_at), jnp.float32)

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    decays = jnp.sum(s >= boundaries)
    return peak_value * _warmup(s, warmup_steps) * decay_factor ** decays.astype(jnp.float32)

  return schedule


def constant(peak_value: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warm-up to `peak_value`, then `peak_value`. total_steps only bounds the warm-up."""
  _check_common(peak_value, total_steps, warmup_steps)

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    return peak_value * _warmup(s, warmup_steps)

  return schedule


def make_schedule(name: str, peak_value: float, total_steps: int, warmup_steps: int = 0, *,
                  final_fraction: float = 0.0, decay_at: Sequence[float] = DEFAULT_DECAY_AT,
                  decay_factor: float = DEFAULT_DECAY_FACTOR) -> optax.Schedule:
  """The schedule `name` ("cosine", "step" or "constant"); each takes only its own keyword arguments.

  Raises:
    ValueError: an unknown name, or bad values (see `cosine`, `step`, `constant`).
  """
  if name == "cosine":
    return cosine(peak_value, total_steps, warmup_steps, final_fraction)
  if name == "step":
    return step(peak_value, total_steps, warmup_steps, decay_at, decay_factor)
  if name == "constant":
    return constant(peak_value, total_steps, warmup_steps)
  raise ValueError(f"Unknown learning-rate schedule {name!r}; expected one of {SCHEDULES}.")
