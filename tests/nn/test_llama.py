"""The LLaMA decoder layer against transformers, and the explicit KV cache against a forward without it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import (LlamaConfig as HFLlamaConfig, LlamaDecoderLayer as HFLayer,
                                                      LlamaRotaryEmbedding)

from dvl_jax.config import LlamaConfig
from dvl_jax.model import positions_from_mask
from dvl_jax.nn.attention import causal_mask, rope_sin_cos
from dvl_jax.nn.kv_cache import KVCache
from dvl_jax.nn.llama import LlamaDecoder, LlamaDecoderLayer
from reference import max_rel_err, torch_params


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_decoder_layer_matches_transformers(heads, kv_heads):
  b, t, d, h = 2, 7, 32, 8
  hf_cfg = HFLlamaConfig(hidden_size=d, intermediate_size=48, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=h, rms_norm_eps=1e-6)
  hf_cfg._attn_implementation = "eager"
  ref_layer = HFLayer(hf_cfg, layer_idx=0).eval()
  with torch.no_grad():
    for p in ref_layer.parameters():
      p.normal_(0, 0.2)
  cfg = LlamaConfig(vocab_size=16, embed_dim=d, mlp_dim=48, num_layers=1, num_heads=heads, num_kv_heads=kv_heads,
                    head_dim=h)
  x = np.random.default_rng(0).standard_normal((b, t, d)).astype(np.float32)
  attn = np.ones((b, t), np.int32)
  attn[1, :2] = 0  # row 1 is left-padded
  positions = np.asarray(positions_from_mask(jnp.asarray(attn)))
  sin, cos = rope_sin_cos(jnp.asarray(positions), h, cfg.rope_theta)
  mask = causal_mask(jnp.arange(t), jnp.asarray(attn, bool))
  layer = LlamaDecoderLayer(cfg)
  args = (jnp.asarray(x), sin, cos, mask, None, jnp.zeros((), jnp.int32), True)
  params = torch_params(layer, ref_layer, *args)
  ours, _ = layer.apply({"params": params}, *args)

  rope = LlamaRotaryEmbedding(hf_cfg)
  ref_cos, ref_sin = rope(torch.tensor(x), torch.tensor(positions))
  additive = torch.zeros(b, 1, t, t).masked_fill(~torch.tensor(np.asarray(mask))[:, None], torch.finfo(torch.float32).min)
  with torch.no_grad():
    ref = ref_layer(torch.tensor(x), attention_mask=additive, position_ids=torch.tensor(positions),
                    position_embeddings=(ref_cos, ref_sin))
  ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
  assert max_rel_err(ours, ref, attn) < 1e-5


def _decoder():
  cfg = LlamaConfig(vocab_size=64, embed_dim=32, mlp_dim=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
  module = LlamaDecoder(cfg)
  ids = jnp.zeros((1, 1), jnp.int32)
  params = module.init(jax.random.key(1), ids, ids, jnp.ones_like(ids),
                       method=lambda m, i, p, a: m(m.embed(i), p, a))["params"]
  return cfg, module, nn.meta.unbox(params)


# The first chunk goes into an empty cache (its tokens attend only to each other, in causal blocks); a second
# chunk of several tokens attends to the filled cache (a chunked prefill, or a follow-up turn).
@pytest.mark.parametrize("chunks", [(5,), (3, 2)], ids=["one-prefill", "prefill-in-two-chunks"])
def test_cached_prefill_and_decode_equal_the_full_forward(chunks):
  cfg, module, params = _decoder()
  b, t, prompt = 2, 9, sum(chunks)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 64, (b, t)))
  attn = np.ones((b, t), np.int32)
  attn[0, :3] = 0  # left padding in row 0
  attn = jnp.asarray(attn)
  positions = positions_from_mask(attn)

  @jax.jit
  def run(x_ids, pos, mask, cache):
    out = module.apply({"params": params}, x_ids, pos, mask, cache, method=lambda m, i, p, a, c: m(m.embed(i), p, a, c))
    return out.logits, out.cache

  full, none = run(ids, positions, attn, None)
  assert none is None
  cache = KVCache.init(cfg, b, max_len=12)
  assert cache.empty
  steps, start = [], 0
  for n in chunks:
    logits, cache = run(ids[:, start:start + n], positions[:, start:start + n], attn[:, start:start + n], cache)
    assert not cache.empty
    steps.append(logits)
    start += n
  for i in range(prompt, t):
    # Decode: the next position is the row's count of real tokens so far.
    pos = cache.next_positions()[:, None]
    np.testing.assert_array_equal(pos[:, 0], positions[:, i])
    logits, cache = run(ids[:, i:i + 1], pos, attn[:, i:i + 1], cache)
    steps.append(logits)
  cached = jnp.concatenate(steps, axis=1)
  assert int(cache.end) == t
  np.testing.assert_array_equal(cache.valid[:, :t], attn.astype(bool))
  assert not cache.valid[:, t:].any()
  assert max_rel_err(cached, full, attn) < 1e-5
  # The cache is really used: dropping it changes a decode step's logits.
  alone, _ = run(ids[:, -1:], positions[:, -1:], attn[:, -1:], None)
  assert max_rel_err(alone, full[:, -1:]) > 1e-2
