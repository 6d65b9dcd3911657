"""Prefill attention on XLA:CPU: queries in blocks (dvl_jax's dot_product_attention) vs all queries at once.

  python bench/attention.py     # 12 heads of 64, batch 1: a ~600-token image prompt, with and without a cache

One layer's attention, float32, causal mask. "one block" computes the whole [T, S] logits at once; "blocked"
is dvl_jax.nn.attention.dot_product_attention (blocks of `query_block(T)` queries under lax.map), whose
logits per block stay in cache through the softmax and whose memory does not grow with T^2.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import dvl_jax  # noqa: F401  (sets the CPU scheduler flag dvl_jax runs with)
from dvl_jax.nn.attention import _attend, causal_mask, dot_product_attention, query_block


def one_block(q, k, v, mask):
  """The same math with every query in one block."""
  b, t, n, h = q.shape
  g = n // k.shape[1]
  out = _attend(q.reshape(b, t, k.shape[1], g, h).transpose(0, 2, 3, 1, 4), k, v, mask, h**-0.5)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def best_ms(fn, *args, repeat: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeat):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best * 1e3


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--batch", type=int, default=1)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  b, n, h = args.batch, args.heads, args.head_dim
  print("| queries T | keys S | block | one block ms | blocked ms |")
  print("|---|---|---|---|---|")
  for t, s in [(600, 600), (640, 664), (1024, 1048)]:
    q = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((b, n, s, h), np.float32)) for _ in range(2))
    mask = causal_mask(jnp.arange(s - t, s), jnp.ones((b, s), bool))
    whole = best_ms(jax.jit(one_block), q, k, v, mask)
    blocked = best_ms(jax.jit(dot_product_attention), q, k, v, mask)
    print(f"| {t} | {s} | {query_block(t)} | {whole:.1f} | {blocked:.1f} |", flush=True)


if __name__ == "__main__":
  main()
