"""Dot-product attention, masks and rotary position embeddings.

Axis letters used in shape comments and einsums across dvl_jax:
  B batch, T query length, S key length (the KV cache's slots), D embed, N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, F mlp, V vocab, P patches, C channels, L layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dvl_jax import sharding


def rope_sin_cos(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """Rotary tables for integer positions, in float32.

  Ref: transformers LlamaRotaryEmbedding ("default" rope type): inv_freq = theta^(-2i/H), and the angles
  are repeated over both halves of the head (rotate-half, non-interleaved layout).

  Args:
    positions: int [B, T].
  Returns:
    (sin, cos), each float32 [B, T, H].
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin. x: [B, T, N, H]; sin, cos: [B, T, H]. Ref: apply_rotary_pos_emb."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  sin, cos = sin[:, :, None, :].astype(x.dtype), cos[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def segment_positions(segments: jax.Array) -> jax.Array:
  """RoPE positions that restart at each segment: int [B, T] segment ids (0 padding; a row of 1s and 0s is one
  segment) -> int32 [B, T], 0 at each segment's first token, 1 at padding (as `generate.positions_from_mask`).
  For a left-padded batch this is cumsum(mask) - 1; for a packed row, each sample counts from 0."""
  segments = segments.astype(jnp.int32)
  t = jnp.arange(segments.shape[1], dtype=jnp.int32)
  previous = jnp.pad(segments[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  starts = jax.lax.cummax(jnp.where(segments != previous, t, 0), axis=1)  # [B, T]: where each run began
  return jnp.where(segments == 0, 1, t - starts)


def causal_mask(q_slots: jax.Array, kv_valid: jax.Array) -> jax.Array:
  """Which cache slots each query may attend: the ones at or before its own slot that hold real tokens.

  Args:
    q_slots: int [T], the cache slot each query token is written to.
    kv_valid: bool [B, S], slots holding real (not padding, not yet written) tokens.
  Returns:
    bool [B, T, S].
  """
  s = jnp.arange(kv_valid.shape[1])
  return (s[None, None, :] <= q_slots[None, :, None]) & kv_valid[:, None, :]


# Float32 logits computed at once, per step of the loops below: a [T, S] tile this size stays in the CPU's
# cache through the softmax and the second matmul. On XLA:CPU, batch 8 (bench/attention.py): a 608-token causal
# prefill layer (12 heads) 329 ms with all rows' logits at once, 155 ms here; SigLIP's (6 heads, 576) 153 -> 76 ms.
LOGITS_BUDGET = 4 << 20


def causal_blocks(t: int) -> int:
  """How many query blocks a causal attention over t queries is cut into: the largest divisor of t up to 8 whose
  blocks keep >= 32 queries (1 for short or prime t). Block i reads only the keys up to its last query, which
  skips (n - 1) / 2n of the work of the full square, 44% at 8 blocks; more blocks would cost compile time (each
  is its own code) for little more."""
  return next((n for n in range(8, 1, -1) if t % n == 0 and t // n >= 32), 1)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
            bias: jax.Array | None = None) -> jax.Array:
  """q [..., G, T, H]; k, v [..., S, H]; mask bool [T, S] or [..., 1, T, S] broadcastable to the logits, or
  None; bias None or broadcastable to the logits [..., G, T, S]. Returns [..., G, T, H]."""
  logits = jnp.einsum("...GTH,...SH->...GTS", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  # Normalised after the second matmul: one pass over [T, H] instead of over the [T, S] weights.
  out = jnp.einsum("...GTS,...SH->...GTH", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(v.dtype)


def _attend_row(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
  """One row: q [K, G, T, H]; k, v [K, S, H]; mask [T, S] or None. One kv head at a time (lax.map) when all
  heads' logits would overflow LOGITS_BUDGET."""
  kv_heads, g, t = q.shape[:3]
  if kv_heads == 1 or kv_heads * g * t * k.shape[1] * 4 <= LOGITS_BUDGET:
    return _attend(q, k, v, mask, scale)
  return jax.lax.map(lambda x: _attend(*x, mask, scale), (q, k, v))


def _attend_rows(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, scale: float,
                 causal: bool) -> jax.Array:
  """One row at a time (lax.map): q [B, K, G, T, H]; k, v [B, K, S, H]; mask [B, T, S] or None."""
  t, s = q.shape[3], k.shape[2]

  def row(x):
    q, k, v, mask = x  # [K, G, T, H], [K, S, H], [K, S, H], [T, S] | None
    if not causal:
      return _attend_row(q, k, v, mask, scale)
    n_blocks, offset = causal_blocks(t), s - t
    size = t // n_blocks
    outs = []
    for i in range(n_blocks):  # static slices: each block is its own code
      end = offset + (i + 1) * size  # keys after the block's last query are never read
      outs.append(_attend_row(q[:, :, i * size:(i + 1) * size], k[:, :end], v[:, :end],
                              None if mask is None else mask[i * size:(i + 1) * size, :end], scale))
    return jnp.concatenate(outs, axis=2)

  return jax.lax.map(row, (q, k, v, mask))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          scale: float | None = None, *, causal: bool = False,
                          bias: jax.Array | None = None) -> jax.Array:
  """Softmax attention with grouped kv heads; logits and softmax in float32: the "cpu" implementation, tuned for
  XLA:CPU (the others, and the switch between them: attention_impls.py).

  A query whose mask is all False (a left-padding position) gets a uniform average instead of NaN, and finite
  gradients; its output is never used. Few queries (a decode step), small logits or a bias run at once over the
  batch; otherwise one row at a time (lax.map, on each device over its own rows), in tiles of at most
  LOGITS_BUDGET bytes of logits.

  Args:
    q: [B, T, N, H].
    k, v: [B, K, S, H] with K dividing N; query head n reads kv head n // (N / K), as transformers' repeat_kv.
    mask: optional bool [B, T, S].
    scale: logit scale, default H^-0.5.
    causal: query t sits at key slot S - T + t and the mask hides every later slot (a prefill: S == T). The
      queries then run in `causal_blocks(T)` blocks, each against the keys up to its last query only. The mask
      is applied as given either way.
    bias: optional float [B, N, T, S] added to the scaled logits (SAM's relative positions).
  Returns:
    [B, T, N, H].
  """
  b, t, n, h = q.shape
  kv_heads, s = k.shape[1], k.shape[2]
  g = n // kv_heads
  scale = h**-0.5 if scale is None else scale
  q = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  # With fewer queries than head dims, the logits are smaller than the keys they are computed from: nothing
  # to gain from tiles.
  if bias is not None:  # SAM's, whose logits were always computed at once
    out = _attend(q, k, v, None if mask is None else mask[:, None, None], scale,
                  bias.reshape(b, kv_heads, g, t, s))
  elif not causal and (t < h or b * n * t * s * 4 <= LOGITS_BUDGET):
    out = _attend(q, k, v, None if mask is None else mask[:, None, None], scale)
  else:
    heads, kv = ("batch", "act_kv_heads", None, None, None), ("batch", "act_kv_heads", None, None)
    rows = sharding.per_shard(functools.partial(_attend_rows, scale=scale, causal=causal),
                              in_axes=(heads, kv, kv, ("batch", None, None)), out_axes=heads)
    out = rows(q, k, v, mask)  # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
