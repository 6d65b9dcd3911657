"""Next-token selection on device: repetition penalty, then greedy or temperature / top-k / top-p sampling.

Each piece is a pure function of float32 logits [B, V]; `SamplingConfig` is static (hashable) so a jitted loop
compiles once per setting. The order and the edge cases follow transformers' logits processors
(RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """do_sample=False is greedy (temperature, top_k and top_p are then unused). top_k=0 and top_p=1.0 disable
  those filters; repetition_penalty=1.0 disables the penalty (the official CLI uses 1.1)."""

  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    if self.do_sample and not self.temperature > 0:
      raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; use do_sample=False for greedy.")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
    if not self.repetition_penalty > 0:
      raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}.")


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """Tokens already in the sequence: positive logits divided by `penalty`, negative ones multiplied.
  seen: bool [B, V]."""
  penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalised, logits)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits per row (ties with the k-th kept), -inf elsewhere."""
  kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [B, 1]
  return jnp.where(logits < kth, NEG_INF, logits)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability reaches p (at least one), -inf elsewhere.
  As transformers: sort ascending, drop tokens whose cumulative probability is <= 1 - p."""
  order = jnp.argsort(logits, axis=-1)  # ascending
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  drop_sorted = (cumulative <= 1 - p).at[..., -1].set(False)
  drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
  return jnp.where(drop, NEG_INF, logits)


def next_tokens(logits: jax.Array, seen: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """logits [B, V] -> token ids int32 [B]."""
  logits = logits.astype(jnp.float32)
  if cfg.repetition_penalty != 1.0:
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
  if not cfg.do_sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if cfg.temperature != 1.0:
    logits = logits / cfg.temperature
  if cfg.top_k > 0:
    logits = top_k_mask(logits, min(cfg.top_k, logits.shape[-1]))
  if cfg.top_p < 1.0:
    logits = top_p_mask(logits, cfg.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
