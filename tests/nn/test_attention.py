"""RoPE, masks and grouped attention against transformers' LLaMA."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import (LlamaConfig as HFLlamaConfig, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb, repeat_kv)

from dvl_jax.nn import attention
from dvl_jax.generate import positions_from_mask
from dvl_jax.nn.attention import (apply_rope, causal_blocks, causal_mask, dot_product_attention, rope_sin_cos,
                                  segment_positions)
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


def reference_attention(q, k, v, mask):
  """transformers' eager LLaMA attention: repeat_kv, masked_fill with the float32 minimum, softmax, P.V."""
  n, kv_heads, h = q.shape[2], k.shape[1], q.shape[3]
  qt = torch.tensor(q).transpose(1, 2)
  kt, vt = (repeat_kv(torch.tensor(x), n // kv_heads) for x in (k, v))
  logits = qt @ kt.transpose(2, 3) * h**-0.5
  if mask is not None:
    logits = logits.masked_fill(~torch.tensor(mask)[:, None], torch.finfo(torch.float32).min)
  return (logits.softmax(-1) @ vt).transpose(1, 2).numpy()


# budget: LOGITS_BUDGET in bytes, which picks the path: whole batch at once, a row at a time, a kv head at a time.
@pytest.mark.parametrize("t, s, causal, budget", [
    (5, 5, False, None), (64, 67, False, 64 * 67 * 4 * 6), (64, 67, False, 1024),
    (256, 256, True, None), (96, 100, True, None), (96, 100, True, 1024), (37, 37, True, None)],
    ids=["batch-at-once", "row-at-once", "kv-head-at-a-time", "causal-8-blocks", "causal-behind-a-cache",
         "causal-kv-head-at-a-time", "causal-prime-length-1-block"])
def test_grouped_attention_matches_repeat_kv_eager_attention(t, s, causal, budget, monkeypatch):
  b, n, k, h = 2, 6, 2, 8
  if budget is not None:
    monkeypatch.setattr(attention, "LOGITS_BUDGET", budget)
  q = RNG.standard_normal((b, t, n, h)).astype(np.float32)
  kv = RNG.standard_normal((2, b, k, s, h)).astype(np.float32)
  mask = np.array(causal_mask(jnp.arange(s - t, s), jnp.ones((b, s), bool)))
  mask[1, :, 0] = False  # a padded first token in row 1
  ours = dot_product_attention(jnp.asarray(q), jnp.asarray(kv[0]), jnp.asarray(kv[1]), jnp.asarray(mask),
                               causal=causal)
  ref = reference_attention(q, kv[0], kv[1], mask)
  # With a cache offset of 0, row 1's first query attends nothing valid; its output is never used.
  skip = 1 if s == t else 0
  assert max_rel_err(np.asarray(ours)[:, skip:], ref[:, skip:]) < 1e-5
  assert np.isfinite(np.asarray(ours)).all()


def test_causal_blocks_divide_the_queries():
  assert [causal_blocks(t) for t in (1, 37, 64, 256, 600, 608, 640)] == [1, 1, 2, 8, 8, 8, 8]
  assert all(t % causal_blocks(t) == 0 for t in range(1, 2049))


@pytest.mark.parametrize("budget", [None, 1024], ids=["row-at-once", "head-at-a-time"])
def test_attention_without_mask(budget, monkeypatch):
  if budget is not None:
    monkeypatch.setattr(attention, "LOGITS_BUDGET", budget)
  b, t, n, h = 2, 96, 2, 4
  q, k, v = (RNG.standard_normal(shape).astype(np.float32) for shape in ((b, t, n, h), (b, n, t, h), (b, n, t, h)))
  ours = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  ref = torch.nn.functional.scaled_dot_product_attention(
      torch.tensor(q).transpose(1, 2), torch.tensor(k), torch.tensor(v)).transpose(1, 2).numpy()
  assert max_rel_err(np.asarray(ours), ref) < 1e-5


def test_segment_positions_restart_per_sample_and_equal_the_padded_batch_rule():
  packed = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(segment_positions(jnp.asarray(packed)),
                                [[0, 1, 2, 0, 1, 0, 1, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
  left_padded = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(segment_positions(jnp.asarray(left_padded)), positions_from_mask(left_padded))
