"""RoPE, masks and grouped attention against transformers' LLaMA."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import (LlamaConfig as HFLlamaConfig, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb, repeat_kv)

from dvl_jax.nn.attention import apply_rope, causal_mask, dot_product_attention, query_block, rope_sin_cos
from reference import max_rel_err

RNG = np.random.default_rng(0)


def test_rope_matches_llama_rotate_half_at_large_positions():
  head_dim, theta = 16, 10000.0
  positions = np.array([[0, 1, 2, 7, 100, 4095], [1, 1, 3, 5000, 16000, 16383]])
  q = RNG.standard_normal((2, 6, 3, head_dim)).astype(np.float32)  # [B, T, N, H]
  rope = LlamaRotaryEmbedding(HFLlamaConfig(hidden_size=48, num_attention_heads=3, head_dim=head_dim,
                                            rope_theta=theta, max_position_embeddings=16384))
  qt = torch.tensor(q).transpose(1, 2)  # [B, N, T, H]
  cos, sin = rope(qt, torch.tensor(positions))
  ref, _ = apply_rotary_pos_emb(qt, qt, cos, sin)
  ours_sin, ours_cos = rope_sin_cos(jnp.asarray(positions), head_dim, theta)
  np.testing.assert_allclose(ours_cos, cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(ours_sin, sin.numpy(), atol=1e-6)
  ours = apply_rope(jnp.asarray(q), ours_sin, ours_cos)
  assert max_rel_err(ours, ref.transpose(1, 2).numpy()) < 1e-6
  # Position 0 is the identity; the rotation preserves norms.
  np.testing.assert_allclose(ours[0, 0], q[0, 0], atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(ours, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)


def test_causal_mask_with_left_padding_and_cache_offset():
  valid = jnp.array([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]], bool)  # row 0 left-padded; slots 4-5 unwritten
  mask = np.asarray(causal_mask(jnp.array([2, 3]), valid))  # queries at slots 2 and 3
  np.testing.assert_array_equal(mask[0], [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(mask[1], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])


@pytest.mark.parametrize("t, s", [(5, 5), (256, 259), (576, 576)], ids=["one-block", "2-blocks-of-128", "6-of-96"])
def test_grouped_attention_matches_repeat_kv_eager_attention(t, s):
  b, n, k, h = 2, 6, 2, 8
  assert query_block(t) == {5: 5, 256: 128, 576: 96}[t]  # the long cases run the blocked path
  q = RNG.standard_normal((b, t, n, h)).astype(np.float32)
  kv = RNG.standard_normal((2, b, k, s, h)).astype(np.float32)
  mask = np.array(causal_mask(jnp.arange(s - t, s), jnp.ones((b, s), bool)))
  mask[1, :, 0] = False  # a padded first token in row 1
  ours = dot_product_attention(jnp.asarray(q), jnp.asarray(kv[0]), jnp.asarray(kv[1]), jnp.asarray(mask))
  qt = torch.tensor(q).transpose(1, 2)
  kt, vt = (repeat_kv(torch.tensor(x), n // k) for x in kv)
  logits = qt @ kt.transpose(2, 3) * h**-0.5
  logits = logits.masked_fill(~torch.tensor(mask)[:, None], torch.finfo(torch.float32).min)
  ref = (logits.softmax(-1) @ vt).transpose(1, 2).numpy()
  # With a cache offset of 0, row 1's first query attends nothing valid; its output is never used.
  skip = 1 if s == t else 0
  assert max_rel_err(np.asarray(ours)[:, skip:], ref[:, skip:]) < 1e-5
  assert np.isfinite(np.asarray(ours)).all()


def test_attention_without_mask_in_blocks():
  b, t, n, h = 1, 256, 2, 4
  q, k, v = (RNG.standard_normal(shape).astype(np.float32) for shape in ((b, t, n, h), (b, n, t, h), (b, n, t, h)))
  ours = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  ref = torch.nn.functional.scaled_dot_product_attention(
      torch.tensor(q).transpose(1, 2), torch.tensor(k), torch.tensor(v)).transpose(1, 2).numpy()
  assert max_rel_err(np.asarray(ours), ref) < 1e-5
