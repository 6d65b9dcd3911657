"""Dot-product attention, masks and rotary position embeddings.

Axis letters used in shape comments and einsums across dvl_jax:
  B batch, T query length, S key length (the KV cache's slots), D embed, N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, F mlp, V vocab, P patches, C channels, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def query_block(t: int) -> int:
  """Queries per block of `dot_product_attention`: the largest divisor of t in [64, 128], else t (one block).

  A block's [T', S] float32 logits stay in cache through the softmax, and memory does not grow with T^2: on
  XLA:CPU, one layer of a 640-token prefill against a 664-slot cache ran 33 -> 23 ms, 1024 tokens 102 -> 42 ms
  (bench/attention.py)."""
  return next((c for c in range(128, 63, -1) if t % c == 0), t)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
  """q [B, K, G, T, H]; k, v [B, K, S, H]; mask bool [B, T, S] or None. Returns [B, K, G, T, H]."""
  logits = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  # Normalised after the second matmul: one pass over [T, H] instead of over the [T, S] weights.
  out = jnp.einsum("BKGTS,BKSH->BKGTH", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(v.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          scale: float | None = None) -> jax.Array:
  """Softmax attention with grouped kv heads; logits and softmax in float32, queries in blocks.

  A query whose mask is all False (a left-padding position) gets a uniform average instead of NaN; its
  output is never used.

  Args:
    q: [B, T, N, H].
    k, v: [B, K, S, H] with K dividing N; query head n reads kv head n // (N / K), as transformers' repeat_kv.
    mask: optional bool [B, T, S].
    scale: logit scale, default H^-0.5.
  Returns:
    [B, T, N, H].
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[1]
  g = n // kv_heads
  scale = h**-0.5 if scale is None else scale
  q = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  block = query_block(t)
  if block == t:
    out = _attend(q, k, v, mask, scale)
  else:  # lax.map over blocks: one compiled body however long the prompt
    c = t // block
    q_blocks = jnp.moveaxis(q.reshape(b, kv_heads, g, c, block, h), 3, 0)  # [C, B, K, G, T', H]
    mask_blocks = None if mask is None else jnp.moveaxis(mask.reshape(b, c, block, -1), 1, 0)  # [C, B, T', S]
    out = jax.lax.map(lambda qm: _attend(qm[0], k, v, qm[1], scale), (q_blocks, mask_blocks))
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv_heads, g, t, h)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
