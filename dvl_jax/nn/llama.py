"""The LLaMA-style decoder of DeepSeek-VL: RMSNorm, rotate-half RoPE, GQA attention, SwiGLU, untied lm_head.

The layers are unrolled, each with its own params (`layers_{i}`) and its own KV-cache arrays. Under `nn.scan`
the params carry a leading layer axis and XLA:CPU copies each layer's slice of the weights and of the cache
into a fresh buffer before every matmul that reads it (its dot kernels take whole buffers): at batch 8 that
was a quarter of the decode step (BENCHMARKS.md). The cost is compile time: ~8 s instead of ~2 s for the
1.3B decoder's prefill on this CPU. The KV cache is an explicit argument and return value, updated in place.
Ref: transformers LlamaForCausalLM.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dvl_jax.config import LlamaConfig
from dvl_jax.nn.attention import apply_rope, causal_mask, rope_sin_cos
from dvl_jax.nn.attention_impls import SegmentIds, attend
from dvl_jax.nn.kv_cache import CACHE_AXES, KVCache
from dvl_jax.nn.layers import Dtype, Linear, RMSNorm, SwiGLU, default_init
from dvl_jax.nn.output import Output
from dvl_jax.nn.remat import remat
from dvl_jax.sharding import constrain

CacheKV = tuple[jax.Array, jax.Array] | None  # one layer's (k, v), each [B, K, S, H]


class LlamaAttention(nn.Module):
  """Ref: transformers LlamaAttention."""

  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: jax.Array, cache_kv: CacheKV,
               write_index: jax.Array, new_only: bool,
               segment_ids: SegmentIds | None = None) -> tuple[jax.Array, CacheKV]:
    """x: [B, T, D]; sin, cos: [B, T, H]; cache_kv: this layer's cache or None, the new k, v written at slot
    `write_index`; new_only: the tokens attend only to each other (no cache, or an empty one), mask: bool
    [B, T, T]; else they attend to the whole cache, mask [B, T, S]. segment_ids: the mask as segment ids (new_only
    only), for the "splash" implementation. Returns ([B, T, D], cache_kv)."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, kvh, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = Linear((n, h), ("heads", "head_dim", "embed"), name="q_proj", **kw)(x)  # [B, T, N, H]
    k = Linear((kvh, h), ("kv_heads", "head_dim", "embed"), name="k_proj", **kw)(x)  # [B, T, K, H]
    v = Linear((kvh, h), ("kv_heads", "head_dim", "embed"), name="v_proj", **kw)(x)
    q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    if cache_kv is not None:
      start = (0, 0, write_index, 0)
      cache_kv = tuple(constrain(lax.dynamic_update_slice(c, new.astype(c.dtype), start), CACHE_AXES)
                       for c, new in zip(cache_kv, (k, v)))
      if not new_only:
        k, v = (c.astype(self.dtype) for c in cache_kv)  # [B, K, S, H]
    out = attend(q, k, v, mask, impl=cfg.attention, causal=new_only, segment_ids=segment_ids)  # [B, T, N, H]
    out = constrain(out, ("batch", "seq", "act_heads", "head_dim"))
    out = Linear((cfg.embed_dim,), ("embed", "heads", "head_dim"), num_in_axes=2, name="o_proj", **kw)(out)
    return out, cache_kv


class LlamaDecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Ref: transformers LlamaDecoderLayer."""

  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: jax.Array, cache_kv: CacheKV,
               write_index: jax.Array, new_only: bool,
               segment_ids: SegmentIds | None = None) -> tuple[jax.Array, CacheKV]:
    """x: [B, T, D]; the rest as LlamaAttention. Returns ([B, T, D], cache_kv)."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(cfg.norm_eps, name="input_layernorm", **kw)(x)
    h, cache_kv = LlamaAttention(cfg, name="self_attn", **kw)(h, sin, cos, mask, cache_kv, write_index, new_only,
                                                               segment_ids)
    x = x + h
    x = x + SwiGLU(cfg.mlp_dim, name="mlp", **kw)(RMSNorm(cfg.norm_eps, name="post_attention_layernorm", **kw)(x))
    x = constrain(x, ("batch", "seq", "act_embed"))
    return x, cache_kv


class LlamaDecoder(nn.Module):
  """Token embedding, the layers, final norm and lm_head.

  Attributes:
    padded_vocab_size: the rows of the embedding and lm_head, when a mesh needs more than `config.vocab_size`
      (ShardingPlan.padded_vocab_size); None: `config.vocab_size`. The logits of the padded ids are masked to
      the dtype's lowest value, so that no sampler picks them and a loss can ignore them.
    remat_policy: rematerialisation of each layer in training, a name in dvl_jax.nn.remat.REMAT_POLICIES;
      "none" (inference) runs the plain layers.
  """

  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  padded_vocab_size: int | None = None
  remat_policy: str = "none"

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    vocab = self.padded_vocab_size or cfg.vocab_size
    assert vocab >= cfg.vocab_size, (vocab, cfg.vocab_size)
    self.embed_tokens = nn.Embed(vocab, cfg.embed_dim, embedding_init=nn.with_logical_partitioning(
        default_init, ("vocab", "embed")), **kw)
    # `new_only` (argument 7, counting self) is a Python bool that picks the mask's shape: static under remat.
    layer = remat(LlamaDecoderLayer, self.remat_policy, static_argnums=(7,))
    self.layers = [layer(cfg, **kw) for _ in range(cfg.num_layers)]  # named layers_0, layers_1, ...
    self.norm = RMSNorm(cfg.norm_eps, **kw)
    self.lm_head = Linear((vocab,), ("vocab", "embed"), **kw)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """int [B, T] -> [B, T, D]."""
    # The rows are looked up in a table whose embed axis is whole (FSDP shards it; the lookup then all-gathers
    # it, as every FSDP weight before use): a lookup into an embed-sharded table hands the batch-sharded
    # activations a layout that XLA's partitioner can only reach by replicating them first.
    table = constrain(self.embed_tokens.embedding, ("vocab", None))  # [V, D]
    return jnp.take(table, input_ids, axis=0).astype(self.dtype)  # [B, T, D]

  def hidden_states(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The final normed hidden states [B, T, D] of a plain forward (no cache), before lm_head: a chunked loss
    multiplies them by lm_head's kernel a chunk at a time (dvl_jax/training/loss.py), never holding all
    [B, T, V] logits. Args as `__call__`."""
    return self._layers(x, positions, attention_mask, None)[0]

  def __call__(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               cache: KVCache | None = None, last_only: bool = False) -> Output:
    """Runs the decoder over T new tokens.

    Args:
      x: input embeddings [B, T, D].
      positions: int [B, T], RoPE positions (for a left-padded batch: cumsum(attention_mask) - 1).
      attention_mask: [B, T], 1 for real tokens, 0 for padding; without a cache (training), a packed row's
        segment ids: each sample its own id (1, 2, ...), padding 0, and a token attends only its own sample's.
      cache: None for a plain forward (tokens attend only to each other, causally); otherwise the tokens
        are written at slots [cache.end, cache.end + T) and attend to everything written before (for an
        empty cache, only to each other, as without one).
      last_only: compute logits for the last position only (prefill before sampling): [B, 1, V].
    Returns:
      Output(logits [B, T, V], the updated cache or None); V is `padded_vocab_size` when set.
    """
    x, cache = self._layers(x, positions, attention_mask, cache)
    if last_only:
      x = x[:, -1:]
    logits = self.lm_head(x)  # [B, T, V] (V padded, if it is)
    if logits.shape[-1] > self.config.vocab_size:
      # Padded ids get the lowest finite logit: never sampled; not -inf, which a loss's 0 * -inf turns to NaN.
      real = jnp.arange(logits.shape[-1]) < self.config.vocab_size
      logits = jnp.where(real, logits, jnp.finfo(logits.dtype).min)
    logits = constrain(logits, ("batch", "seq", "act_vocab"))
    return Output(logits=logits, cache=cache)

  def _layers(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array,
              cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
    """The layers and the final norm: (normed hidden states [B, T, D], the updated cache or None)."""
    t = x.shape[1]
    new_only = cache is None or cache.empty  # the tokens attend only to each other
    write_index = jnp.zeros((), jnp.int32) if new_only else cache.end
    segments = attention_mask.astype(jnp.int32)  # [B, T]: 0 padding, else the token's segment (1 unpacked)
    valid = segments != 0
    if cache is not None:
      cache_valid = constrain(lax.dynamic_update_slice(cache.valid, valid, (0, write_index)), ("batch", "cache_seq"))
    if new_only:  # [B, T, T]: causal, within each segment (a packed row's samples do not see each other)
      mask = causal_mask(jnp.arange(t), valid) & (segments[:, :, None] == segments[:, None, :])
      # The same mask for splash: each token attends its own segment's; padding (id 0) only padding.
      segment_ids = SegmentIds(segments, segments)
    else:  # [B, T, S] over the whole cache
      mask, segment_ids = causal_mask(write_index + jnp.arange(t), cache_valid), None
    sin, cos = rope_sin_cos(positions, self.config.head_dim, self.config.rope_theta)
    x = constrain(x.astype(self.dtype), ("batch", "seq", "act_embed"))
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      x, layer_kv = layer(x, sin, cos, mask, None if cache is None else (cache.k[i], cache.v[i]), write_index,
                          new_only, segment_ids)
      if cache is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
    if cache is not None:
      cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=cache_valid, end=write_index + t)
    return self.norm(x), cache
