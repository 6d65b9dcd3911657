"""Prefill attention on XLA:CPU: dvl_jax's dot_product_attention vs the whole batch at once, and torch's SDPA.

  python bench/attention.py     # batch 8, one layer: the 130M decoder's and SigLIP's shapes

One layer's attention, float32, heads of 64. "batch at once" is the textbook formulation: the [B, N, T, S]
logits of every row in one einsum, softmax, P.V. dvl_jax runs one row at a time (lax.map) in tiles whose logits
stay in the CPU's cache (attention.LOGITS_BUDGET), and with `causal=True` (a prefill into an empty cache) in
query blocks that skip the keys after them. torch: scaled_dot_product_attention on the same arrays, with
is_causal for the causal rows, 2 threads (this machine's cores).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import dvl_jax  # noqa: F401  (sets the CPU scheduler flag dvl_jax runs with)
from dvl_jax.nn.attention import causal_mask, dot_product_attention

SHAPES = [  # (what, heads, tokens, causal)
    ("130M decoder prefill", 12, 608, True),
    ("SigLIP-S/16 tower (130M)", 6, 576, False),
    ("SigLIP-L/16 tower (1.3B)", 16, 576, False),
]


def batch_at_once(q, k, v, mask):
  """q [B, T, N, H]; k, v [B, N, S, H]; mask [B, T, S] or None."""
  logits = jnp.einsum("BTNH,BNSH->BNTS", q, k) * q.shape[-1]**-0.5
  if mask is not None:
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("BNTS,BNSH->BTNH", jax.nn.softmax(logits, axis=-1), v)


def best_ms(fn, *args, repeat: int = 5) -> float:
  fn(*args)
  best = float("inf")
  for _ in range(repeat):
    start = time.perf_counter()
    fn(*args)
    best = min(best, time.perf_counter() - start)
  return best * 1e3


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  args = parser.parse_args()
  import torch

  torch.set_num_threads(os.cpu_count())
  rng = np.random.default_rng(0)
  b, h = args.batch, args.head_dim
  print(f"batch {b}, heads of {h}, float32; ms per layer, best of 5")
  print("| shape | heads | T = S | causal | batch at once | dvl_jax | torch SDPA | dvl_jax vs torch |")
  print("|---|---|---|---|---|---|---|---|")
  for what, n, t, causal in SHAPES:
    q = rng.standard_normal((b, t, n, h), np.float32)
    k, v = (rng.standard_normal((b, n, t, h), np.float32) for _ in range(2))
    mask = np.asarray(causal_mask(jnp.arange(t), jnp.ones((b, t), bool))) if causal else None
    jq, jk, jv = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    jmask = None if mask is None else jnp.asarray(mask)
    whole_fn = jax.jit(batch_at_once)
    ours_fn = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, m, causal=causal))
    whole = best_ms(lambda *a: whole_fn(*a).block_until_ready(), jq, jk, jv, jmask)
    ours = best_ms(lambda *a: ours_fn(*a).block_until_ready(), jq, jk, jv, jmask)
    tq, tk, tv = torch.tensor(q).transpose(1, 2), torch.tensor(k), torch.tensor(v)
    with torch.no_grad():
      ref = best_ms(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal))
    print(f"| {what} | {n} | {t} | {causal} | {whole:.1f} | {ours:.1f} | {ref:.1f} | {ref / ours:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
