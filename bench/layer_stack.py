"""Why the decoder's layers are unrolled: a stack of decode-step layers, scanned vs separate arrays, on XLA:CPU.

  python bench/layer_stack.py              # the ~130M decoder's shapes: 12 x 768, MLP 2048, 664-slot cache

Each layer: q/k/v/o projections, attention of one query over the cache, a SwiGLU MLP; weights `[out, in]` as
the kernel on the dot's left (as dvl_jax.nn.layers.Linear). Three ways to hold the 12 layers:
  scan: weights and cache stacked `[L, ...]`, `lax.scan` over them (what flax `nn.scan` gives);
  unrolled, stacked: a Python loop over static slices `w[l]` of the same stacks;
  unrolled, separate: a Python loop over one array per layer (what dvl_jax.nn.llama does).
Reports ms per step and the bytes it must read (weights + cache) per second. XLA:CPU copies a slice of a stack
into a fresh buffer before a dot reads it, which the separate arrays avoid.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import dvl_jax  # noqa: F401  (sets the CPU scheduler flag dvl_jax runs with)


def best_ms(fn, *args, repeat: int = 3, number: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeat):
    start = time.perf_counter()
    for _ in range(number):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / number * 1e3)
  return best


def matmul(w: jax.Array, x: jax.Array) -> jax.Array:
  """w [O, I] on the left, x [B, I] -> [B, O]."""
  return lax.dot_general(w, x, (((1,), (1,)), ((), ()))).T


def layer(x, attn_w, mlp_w, down_w, k, v, heads: int):
  """x [B, D]; attn_w [4, D, D]; mlp_w [2, F, D]; down_w [D, F]; k, v [B, N, S, H]."""
  b, d = x.shape
  q = matmul(attn_w[0], x).reshape(b, heads, d // heads)
  new_kv = matmul(attn_w[1], x) + matmul(attn_w[2], x)  # stands in for the cache write
  probs = jax.nn.softmax(jnp.einsum("bnh,bnsh->bns", q, k), axis=-1)
  out = jnp.einsum("bns,bnsh->bnh", probs, v).reshape(b, d)
  x = x + matmul(attn_w[3], out + new_kv)
  h = jax.nn.silu(matmul(mlp_w[0], x)) * matmul(mlp_w[1], x)
  return x + matmul(down_w, h)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--embed", type=int, default=768)
  parser.add_argument("--mlp", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--slots", type=int, default=664)
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  args = parser.parse_args()
  n, d, f, s, heads = args.layers, args.embed, args.mlp, args.slots, args.heads
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)  # noqa: E731
  attn_w, mlp_w, down_w = normal(n, 4, d, d), normal(n, 2, f, d), normal(n, d, f)

  print("| batch | layout | ms/step | GB/s read |")
  print("|---|---|---|---|")
  for b in args.batch:
    k, v = normal(n, b, heads, s, d // heads), normal(n, b, heads, s, d // heads)
    stacks = (attn_w, mlp_w, down_w, k, v)
    separate = tuple([a[i] for i in range(n)] for a in stacks)
    body = lambda x, ws: (layer(x, *ws, heads=heads), None)  # noqa: E731
    runs = {
        "scan": (jax.jit(lambda x, *ws: lax.scan(body, x, ws)[0]), stacks),
        "unrolled, stacked": (jax.jit(lambda x, *ws: _unrolled(x, ws, n, heads)), stacks),
        "unrolled, separate": (jax.jit(lambda x, *ws: _unrolled(x, ws, n, heads)), separate),
    }
    nbytes = sum(a.nbytes for a in stacks)
    for name, (fn, ws) in runs.items():
      ms = best_ms(fn, jnp.ones((b, d)), *ws)
      print(f"| {b} | {name} | {ms:.1f} | {nbytes / ms / 1e6:.1f} |", flush=True)


def _unrolled(x, ws, n, heads):
  for i in range(n):
    x = layer(x, *(w[i] for w in ws), heads=heads)
  return x


if __name__ == "__main__":
  main()
