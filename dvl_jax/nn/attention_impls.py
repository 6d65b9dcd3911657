"""Attention implementations behind one switch, the `attention` field of each tower's config.

- "cpu": dvl_jax.nn.attention.dot_product_attention, tiled for XLA:CPU.
- "xla": jax.nn.dot_product_attention with implementation=None, which is XLA's own softmax(QK^T)V everywhere in
  jax 0.10 (its cuDNN kernel only runs when asked by name, and takes no dense mask with GQA on every shape).
- "splash": the Pallas splash-attention kernel on TPU (jax.experimental.pallas.ops.tpu.splash_attention). It
  takes no dense mask: causality is a static mask and padding is segment ids (a query attends only keys with its
  own id), so a caller that wants it passes `segment_ids` beside its mask.
- "auto": by `jax.default_backend()`: cpu -> "cpu"; tpu -> "splash" where `splash_unsupported` finds nothing
  against it, else "xla" (the reason is logged once); any other (gpu) -> "xla".

Every implementation computes the same function of (q, k, v, mask, causal, bias): `attend` below. Segment ids
are the form packed sequences take (each document its own id, padding 0): the dense mask for "cpu" and "xla" is
then `same segment & causal`, and "splash" reads the ids themselves.
Axis letters: see dvl_jax.nn.attention.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dvl_jax import sharding
from dvl_jax.config import ATTENTION_IMPLS
from dvl_jax.nn.attention import dot_product_attention

_log = logging.getLogger(__name__)

# The splash kernel's tiles, largest first: a sequence must divide into one of them. Its kv tiles are computed
# 128 keys at a time (the TPU's lane width), so 128 is the smallest.
SPLASH_BLOCKS = (512, 256, 128)


class SegmentIds(NamedTuple):
  """The mask as segment ids: query t of row b may attend key s iff q[b, t] == kv[b, s] (and, when causal, s is
  at or before t's slot). Today 1 for real tokens and 0 for padding; packed sequences give each document its
  own id."""

  q: jax.Array  # int32 [B, T]
  kv: jax.Array  # int32 [B, S]


def splash_unsupported(t: int, s: int, head_dim: int, *, masked: bool, segmented: bool, biased: bool) -> str | None:
  """Why the splash kernel cannot run this attention, or None when it can.

  Args:
    t, s: query and key lengths; head_dim: H.
    masked: a dense mask is given; splash needs it as segment ids too (`segmented`).
    segmented: SegmentIds are given.
    biased: an additive logit bias is given (SAM's relative positions), which splash does not take.
  """
  if biased:
    return "it takes no additive logit bias (SAM's relative positions)"
  if masked and not segmented:
    return "the mask came without segment ids (a step over the KV cache, whose query offset is not static)"
  if _block(t) is None or _block(s) is None:
    return f"the query and key lengths ({t}, {s}) must be multiples of {SPLASH_BLOCKS[-1]}"
  if head_dim % 128:  # conservative: the TPU's lanes are 128 wide and the kernel tiles [block, head_dim]
    return f"head_dim {head_dim} is not a multiple of 128"
  return None


@functools.cache
def _log_fallback(reason: str) -> None:
  _log.info("attention='auto' on TPU runs 'xla' instead of 'splash' here: %s.", reason)


def resolve_attention(name: str, t: int, s: int, head_dim: int, *, masked: bool = False, segmented: bool = False,
                      biased: bool = False, backend: str | None = None) -> str:
  """The implementation `name` runs as: "cpu", "xla" or "splash" ("auto" picks by backend; see the module doc).

  Args:
    name: one of ATTENTION_IMPLS.
    t, s, head_dim, masked, segmented, biased: the attention, as `splash_unsupported` takes them.
    backend: jax.default_backend() when None.
  Raises:
    ValueError: an unknown name, or "splash" off TPU or on shapes it cannot run.
  """
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"Unknown attention implementation {name!r}; expected one of {ATTENTION_IMPLS}.")
  backend = backend or jax.default_backend()
  reason = splash_unsupported(t, s, head_dim, masked=masked, segmented=segmented, biased=biased)
  if name == "auto":
    if backend == "cpu":
      return "cpu"
    if backend == "tpu" and reason is None:
      return "splash"
    if backend == "tpu":
      _log_fallback(reason)
    return "xla"
  if name == "splash" and backend != "tpu":
    raise ValueError(f"attention='splash' is a Pallas TPU kernel and the backend is {backend!r}; use 'xla' or "
                     "'cpu' there (or 'auto').")
  if name == "splash" and reason is not None:
    raise ValueError(f"attention='splash' cannot run this attention: {reason}. Use 'xla' or 'auto' (which "
                     "falls back to 'xla').")
  return name


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *, impl: str,
           causal: bool = False, bias: jax.Array | None = None, segment_ids: SegmentIds | None = None,
           scale: float | None = None) -> jax.Array:
  """Softmax attention with grouped kv heads, by the implementation `impl` names (resolved here, when traced).

  Query t may attend key s where mask[b, t, s] holds and, when causal, s <= S - T + t. A query that may attend
  nothing (a left-padding position) gets a finite output, never used, and finite gradients.

  Args:
    q: [B, T, N, H].
    k, v: [B, K, S, H], K dividing N; query head n reads kv head n // (N / K).
    mask: optional bool [B, T, S].
    impl: one of ATTENTION_IMPLS.
    causal: query t sits at key slot S - T + t and attends no later slot.
    bias: optional float [B, N, T, S] added to the scaled logits; not with "splash".
    segment_ids: the same mask as segment ids (with `causal`), for "splash"; the others read `mask` only.
    scale: logit scale, default H^-0.5.
  Returns:
    [B, T, N, H].
  """
  b, t, _, h = q.shape
  s = k.shape[2]
  impl = resolve_attention(impl, t, s, h, masked=mask is not None, segmented=segment_ids is not None,
                           biased=bias is not None)
  if impl == "splash":
    return splash_attention(q, k, v, segment_ids, causal=causal, scale=scale)
  if causal:
    tri = jnp.arange(s)[None, :] <= (s - t + jnp.arange(t))[:, None]  # [T, S]
    mask = jnp.broadcast_to(tri, (b, t, s)) if mask is None else mask & tri
  if impl == "cpu":
    return dot_product_attention(q, k, v, mask, scale, causal=causal, bias=bias)
  return xla_attention(q, k, v, mask, bias=bias, scale=scale)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                  bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
  """jax.nn.dot_product_attention in our layout: q [B, T, N, H]; k, v [B, K, S, H]; mask bool [B, T, S]; bias
  [B, N, T, S]. Returns [B, T, N, H]. A fully masked query row gets a uniform average (jax fills masked logits
  with a large finite negative), so no NaN forward or backward."""
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, K, H]
  return jax.nn.dot_product_attention(q, k, v, bias, None if mask is None else mask[:, None], scale=scale,
                                      implementation=None)


def _block(n: int) -> int | None:
  return next((size for size in SPLASH_BLOCKS if n % size == 0), None)


@functools.cache
def _splash_kernel(heads: int, t: int, s: int, causal: bool, interpret: bool):
  """One example's kernel: q [N, T, H], k, v [K, S, H] -> [N, T, H]; built once per shape (its mask tables are
  computed on the host)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas loads only when used

  bq, bkv = _block(t), _block(s)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  # Causal with the queries at the last T of S slots: query t attends keys <= t + (S - T).
  one = splash.CausalMask((t, s), offset=s - t) if causal else splash.FullMask((t, s))
  return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: SegmentIds | None = None, *,
                     causal: bool = False, scale: float | None = None, interpret: bool = False) -> jax.Array:
  """The Pallas splash kernel, one example at a time (vmap), on each device over its own rows and kv heads.

  Args:
    q: [B, T, N, H]; k, v: [B, K, S, H]; T and S multiples of 128 (`splash_unsupported`).
    segment_ids: optional; query t attends key s only where the ids are equal. With `causal`, a padding query
      (id 0) attends at least itself, so no row of the kernel is empty.
    causal: query t attends keys up to slot S - T + t.
    scale: logit scale, default H^-0.5 (applied to q: the kernel has none).
    interpret: run the kernel in Pallas' interpreter (off TPU, for tests; slow).
  Returns:
    [B, T, N, H].
  """
  b, t, n, h = q.shape
  kv_heads, s = k.shape[1], k.shape[2]
  scale = h**-0.5 if scale is None else scale
  q = (q * scale).astype(q.dtype).reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
  seg_q, seg_kv = (None, None) if segment_ids is None else (x.astype(jnp.int32) for x in segment_ids)

  def run(q, k, v, seg_q, seg_kv):  # this device's rows and kv heads
    rows, kvh, g = q.shape[:3]
    kernel = _splash_kernel(kvh * g, t, s, causal, interpret)
    q = q.reshape(rows, kvh * g, t, h)  # [B, N, T, H], head n = kv head n // G, as the kernel groups them
    if seg_q is None:
      out = jax.vmap(kernel)(q, k, v)
    else:
      out = jax.vmap(lambda *x: kernel(*x[:3], segment_ids=_splash_segments(*x[3:])))(q, k, v, seg_q, seg_kv)
    return out.reshape(rows, kvh, g, t, h)

  heads, kv, seg = ("batch", "act_kv_heads", None, None, None), ("batch", "act_kv_heads", None, None), ("batch", None)
  out = sharding.per_shard(run, in_axes=(heads, kv, kv, seg, seg), out_axes=heads)(q, k, v, seg_q, seg_kv)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _splash_segments(q_ids: jax.Array, kv_ids: jax.Array):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  return splash.SegmentIds(q=q_ids, kv=kv_ids)
