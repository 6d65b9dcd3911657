"""The decoder's explicit, static KV cache.

Preallocated to a fixed number of slots S; every call writes its T new tokens at slots [end, end + T) of
all rows at once (rows of a left-padded batch advance in lockstep) and marks the real ones in `valid`.
One `[B, K, S, H]` array per layer for k and for v: a query reads one contiguous [S, H] block per (row, kv
head), which XLA:CPU reads 5-10x faster than `[B, S, K, H]` (../shared/PERF_NOTES.md); and separate arrays,
not one `[L, ...]` stack, because XLA:CPU copies a slice of a stack into its own buffer before a dot reads it.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dvl_jax.config import LlamaConfig
from dvl_jax.sharding import constrain

# Logical axes of k and v, for sharding.
CACHE_AXES = ("batch", "act_kv_heads", "cache_seq", "head_dim")


@flax.struct.dataclass
class KVCache:
  """Attributes:
    k, v: tuples of L arrays [B, K, S, H], one per layer.
    valid: bool [B, S], slots that hold a real token (False for padding and for slots not written yet).
    end: int32 [], the number of slots written so far (the next write starts here).
    empty: static: nothing was written yet (as `init` returns it). A prefill into an empty cache attends only
      to its own tokens, causally, and skips the keys after each block of queries; a program traced for an
      empty cache is not reused for a filled one.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  end: jax.Array
  empty: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def init(cls, config: LlamaConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Zeros, laid out by the active sharding plan (if any): jit it to create the arrays in their shards."""
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)

    def zeros():
      return constrain(jnp.zeros(shape, dtype), CACHE_AXES)

    layers = range(config.num_layers)
    return cls(k=tuple(zeros() for _ in layers), v=tuple(zeros() for _ in layers),
               valid=constrain(jnp.zeros((batch_size, max_len), bool), ("batch", "cache_seq")),
               end=jnp.zeros((), jnp.int32), empty=True)

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]

  def next_positions(self) -> jax.Array:
    """int [B]: the position of each row's next token (its count of real tokens so far)."""
    return jnp.sum(self.valid, axis=1, dtype=jnp.int32)
