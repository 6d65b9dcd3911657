"""Next-token cross-entropy from the decoder's final hidden states, in chunks so the logits never exist whole.

DeepSeek's vocabulary has 102,400 ids: the float32 logits of one 4,096-token row take 1.7 GB, and their
gradient as much again. `cross_entropy` multiplies the hidden states by lm_head's kernel a chunk of positions at
a time inside a `lax.scan`, each chunk under `jax.checkpoint`, so the forward and the backward pass each hold
one chunk's logits [B, C, V] (test_loss.py measures the saving).

The loss is returned as a sum and a count of supervised tokens (`TokenLoss`), not as a mean: a step that splits
its global batch over devices and microbatches adds the sums and the counts and divides once, so the loss (and
its gradient) is that of the whole batch however it was split. transformers does the same with
`num_items_in_batch` (Ref: transformers loss_utils.ForCausalLMLoss, fixed_cross_entropy).

Labels follow transformers: `labels` [B, T] is aligned with `input_ids`, `labels[:, t]` is predicted from
position t - 1, and `IGNORE` (-100) marks a position that is no target (padding, image tokens, prompts).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

IGNORE = -100  # transformers' ignore_index


@flax.struct.dataclass
class TokenLoss:
  """A summed cross-entropy and the number of tokens it sums over; add them across microbatches and devices.

  Attributes:
    sum: float32 [], the cross-entropy summed over the supervised tokens.
    count: int32 [], the supervised tokens.
  """

  sum: jax.Array
  count: jax.Array

  def __add__(self, other: TokenLoss) -> TokenLoss:
    return TokenLoss(self.sum + other.sum, self.count + other.count)

  @property
  def mean(self) -> jax.Array:
    """sum / count, 0 when nothing is supervised (a batch of prompts only must not turn the step into NaN)."""
    return self.sum / jnp.maximum(self.count, 1)


def make_labels(input_ids: jax.Array, attention_mask: jax.Array, image_token_id: int,
                loss_mask: jax.Array | None = None) -> jax.Array:
  """The labels for `cross_entropy`: the token ids where a token is a target, IGNORE elsewhere.

  A token is a target when it is a real token (attention_mask not 0), is not an image token, is marked by
  `loss_mask` (if given), and follows a token of its own segment (the first token of a row, or of a packed
  sample, has nothing to be predicted from: not the padding before it, nor the previous sample).

  Args:
    input_ids: int [B, T].
    attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right); or a packed row's segment ids
      (each sample its own id, padding 0).
    image_token_id: the id whose positions carry image features; never a target.
    loss_mask: optional [B, T], 1 for the tokens to learn, e.g. in SFT the assistant's answers and their EOS
      (system and user turns 0); None: every real text token.
  Returns:
    int32 [B, T].
  """
  if attention_mask.shape != input_ids.shape or (loss_mask is not None and loss_mask.shape != input_ids.shape):
    raise ValueError(f"input_ids {input_ids.shape}, attention_mask {attention_mask.shape} and loss_mask "
                     f"{None if loss_mask is None else loss_mask.shape} must have one shape [B, T].")
  segments = attention_mask.astype(jnp.int32)  # [B, T]
  previous = jnp.pad(segments[:, :-1], ((0, 0), (1, 0)))  # [B, T]: the previous position's segment (0 first)
  keep = (segments != 0) & (previous == segments) & (input_ids != image_token_id)
  if loss_mask is not None:
    keep &= loss_mask.astype(bool)
  return jnp.where(keep, input_ids, IGNORE).astype(jnp.int32)


def next_token_targets(labels: jax.Array) -> jax.Array:
  """labels [B, T] -> the target of each position [B, T]: labels[:, t + 1], IGNORE at the last position.
  Ref: transformers ForCausalLMLoss (pads labels with ignore_index and shifts them left)."""
  return jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE)


def _check(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, vocab_size: int | None) -> int:
  """Validates the shapes; returns the real vocabulary size."""
  if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
    raise ValueError(f"Expected hidden states [B, T, D] and labels [B, T]; got hidden {hidden.shape} and labels "
                     f"{labels.shape}. Pass the decoder's final normed hidden states and labels aligned with "
                     "input_ids (make_labels).")
  if kernel.ndim != 2 or kernel.shape[1] != hidden.shape[2]:
    raise ValueError(f"Expected lm_head's kernel [V, D={hidden.shape[2]}] (params['language_model']['lm_head']"
                     f"['kernel']); got shape {kernel.shape}.")
  vocab = kernel.shape[0] if vocab_size is None else vocab_size
  if not 0 < vocab <= kernel.shape[0]:
    raise ValueError(f"vocab_size {vocab_size} must lie in [1, {kernel.shape[0]}], the kernel's rows (the "
                     "real vocabulary; rows past it are padding, never a prediction).")
  return vocab


def _logits(hidden: jax.Array, kernel: jax.Array, vocab: int) -> jax.Array:
  """[..., D] x [V, D] -> float32 [..., V], accumulated in float32; padded ids (>= vocab) at the lowest logit,
  which adds exp(-huge) = 0 to a logsumexp (not -inf: 0 * -inf in a gradient is NaN)."""
  logits = lax.dot_general(hidden, kernel.astype(hidden.dtype), (((hidden.ndim - 1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)  # [..., V]
  if kernel.shape[0] > vocab:
    logits = jnp.where(jnp.arange(kernel.shape[0]) < vocab, logits, jnp.finfo(jnp.float32).min)
  return logits


def _chunk_sum(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, vocab: int) -> jax.Array:
  """hidden [B, C, D], targets int [B, C] (IGNORE: none) -> float32 [], the summed cross-entropy."""
  logits = _logits(hidden, kernel, vocab)  # [B, C, V]
  valid = targets != IGNORE  # [B, C]
  safe = jnp.where(valid, targets, 0)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # [B, C]
  per_token = jax.nn.logsumexp(logits, axis=-1) - picked  # [B, C]
  return jnp.sum(jnp.where(valid, per_token, 0.0))


def cross_entropy_plain(hidden: jax.Array, kernel: jax.Array, labels: jax.Array,
                        vocab_size: int | None = None) -> TokenLoss:
  """`cross_entropy` with the whole [B, T, V] float32 logits at once: the reference, and fine for short rows.

  Args and returns as `cross_entropy`.
  """
  vocab = _check(hidden, kernel, labels, vocab_size)
  targets = next_token_targets(labels)  # [B, T]
  valid = targets != IGNORE
  logp = jax.nn.log_softmax(_logits(hidden, kernel, vocab), axis=-1)  # [B, T, V]
  picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]  # [B, T]
  return TokenLoss(sum=-jnp.sum(jnp.where(valid, picked, 0.0)), count=jnp.sum(valid, dtype=jnp.int32))


def cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, vocab_size: int | None = None,
                  chunk_size: int | None = 512) -> TokenLoss:
  """Summed next-token cross-entropy over the supervised positions, and their count.

  The positions are cut into the fewest chunks of at most `chunk_size` (equal chunks, the last padded with
  ignored positions) and a `lax.scan` computes each chunk's logits [B, C, V], its float32 logsumexp and its
  sum; `jax.checkpoint` recomputes a chunk's logits in the backward pass rather than keeping them all. Chunks
  run along the sequence with the whole batch in each, so a batch split over devices stays split (every device
  works on each chunk of its own rows); the memory of one chunk is at most B * chunk_size * V * 4 bytes per
  device's B rows.

  Args:
    hidden: [B, T, D] the decoder's final normed hidden states (DeepseekVL.hidden_states), any float dtype;
      the matmul takes that dtype and accumulates in float32.
    kernel: lm_head's kernel [V, D] (params["language_model"]["lm_head"]["kernel"]); V may include padded rows.
    labels: int [B, T] aligned with input_ids: labels[:, t] is the target predicted at position t - 1; IGNORE
      (-100) where there is none (make_labels).
    vocab_size: the real vocabulary; rows of `kernel` from it on are padding (a mesh's padded_vocab_size), left
      out of the softmax so the loss equals the unpadded model's. None: every row is real.
    chunk_size: positions per chunk; None, or at least T: the plain computation (`cross_entropy_plain`).
  Returns:
    TokenLoss(sum float32 [], count int32 []); `.mean` is the loss of this batch alone.
  """
  vocab = _check(hidden, kernel, labels, vocab_size)
  b, t, d = hidden.shape
  if chunk_size is None or chunk_size >= t:
    return cross_entropy_plain(hidden, kernel, labels, vocab_size)
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive number of positions or None (no chunks); got {chunk_size}.")
  targets = next_token_targets(labels)  # [B, T]
  count = jnp.sum(targets != IGNORE, dtype=jnp.int32)
  n = -(-t // chunk_size)  # the fewest chunks of at most chunk_size positions
  c = -(-t // n)  # their size, as even as can be: 608 positions in chunks of 512 run as 2 x 304, not 2 x 512
  pad = n * c - t  # < n positions of padding, not up to chunk_size - 1 (each costs a row of logits)
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))  # [B, n * C, D]
  targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)  # [B, n * C]
  hidden = hidden.reshape(b, n, c, d).transpose(1, 0, 2, 3)  # [n, B, C, D]
  targets = targets.reshape(b, n, c).transpose(1, 0, 2)  # [n, B, C]

  @jax.checkpoint
  def chunk(h: jax.Array, y: jax.Array) -> jax.Array:
    return _chunk_sum(h, kernel, y, vocab)

  def step(total: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    return total + chunk(*xs), None

  total, _ = lax.scan(step, jnp.zeros((), jnp.float32), (hidden, targets))
  return TokenLoss(sum=total, count=count)
