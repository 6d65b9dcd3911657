"""Prefill and decode speed, dvl_jax vs transformers, on the same random weights, beside this machine's floor.

  python bench/generate.py --size 130m            # LLM 12 x 768, SigLIP 12 x 384 at 384 px; batch 1 and 8
  python bench/generate.py --size 1.3b --batch 1  # the full 1.3B config, random weights

One script run: builds the transformers model, saves it, times transformers, frees it, converts the checkpoint
(in a child process), then times dvl_jax. Also measured in the same run: memory bandwidth (a large float32
matrix-vector product) and the float32 matmul rate, which give the floors: decode step >= (weight bytes + KV
bytes read) / bandwidth, prefill >= FLOPs / matmul rate. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "130m": dict(text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                           num_key_value_heads=12, vocab_size=32000),
                 vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6)),
    "1.3b": dict(text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=16, vocab_size=102400),
                 vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)),
}
IMAGE_TOKEN = 100  # any id below the vocabulary: the benchmark needs no tokenizer


def timed(fn, repeat: int = 3) -> float:
  """Best wall time of `repeat` calls (after the caller's warm-up)."""
  best = float("inf")
  for _ in range(repeat):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def machine_floor() -> tuple[float, float]:
  """(memory bandwidth GB/s, float32 matmul GFLOP/s), measured with jax on this machine now."""
  import jax
  import jax.numpy as jnp

  w = jnp.asarray(np.random.default_rng(0).standard_normal((8192, 8192), np.float32))  # 268 MB
  x = jnp.ones((8192,), jnp.float32)
  matvec = jax.jit(lambda w, x: w @ x)
  matvec(w, x).block_until_ready()
  bandwidth = w.nbytes / timed(lambda: matvec(w, x).block_until_ready(), 5) / 1e9
  a = jnp.ones((2048, 2048), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  flops = 2 * 2048**3 / timed(lambda: matmul(a).block_until_ready(), 3) / 1e9
  return bandwidth, flops


def build_hf(size: str):
  import torch
  from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration

  s = SIZES[size]
  config = DeepseekVLConfig(
      text_config=dict(model_type="llama", max_position_embeddings=4096, **s["text"]),
      vision_config=dict(model_type="siglip_vision_model", image_size=384, patch_size=16, hidden_act="gelu",
                         vision_use_head=False, **s["vision"]),
      image_token_id=IMAGE_TOKEN, tie_word_embeddings=False)
  torch.manual_seed(0)
  return DeepseekVLForConditionalGeneration(config).eval()


def inputs(batch: int, text_tokens: int = 24, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(200, 1000, (batch, 576 + text_tokens))
  ids[:, 1:577] = IMAGE_TOKEN
  pixels = rng.standard_normal((batch, 1, 384, 384, 3)).astype(np.float32)
  return ids, np.ones_like(ids), pixels


def bench_hf(model, batch: int, new_tokens: int) -> dict[str, float]:
  import torch

  torch.set_num_threads(os.cpu_count())
  ids, mask, pixels = inputs(batch)
  kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(pixels[:, 0]).permute(0, 3, 1, 2), do_sample=False, eos_token_id=None,
            pad_token_id=0)
  with torch.no_grad():
    model.generate(**kw, max_new_tokens=2)  # warm-up
    prefill = timed(lambda: model.generate(**kw, max_new_tokens=1), 2)
    total = timed(lambda: model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens), 1)
  return {"prefill_s": prefill, "step_s": (total - prefill) / (new_tokens - 1)}


def bench_ours(ckpt: str, batch: int, new_tokens: int, dtype: str | None,
               reference: np.ndarray | None = None) -> dict:
  """Times dvl_jax; with `reference` tokens (the float32 run's), also the top-1 agreement: the share of
  positions where this model's argmax, fed the reference's prefix (teacher forcing), is the reference token."""
  import dvl_jax

  model = dvl_jax.load(ckpt, dtype=dtype)
  ids, mask, pixels = inputs(batch)
  run = lambda n: model.generate(ids, mask, pixels, max_new_tokens=n, eos_token_id=[])  # noqa: E731
  start = time.perf_counter()
  run(1)
  first_prefill = time.perf_counter() - start
  prefill = timed(lambda: run(1), 2)
  start = time.perf_counter()
  run(new_tokens)
  first_total = time.perf_counter() - start
  total = timed(lambda: run(new_tokens), 1)
  compile_s = (first_prefill - prefill) + (first_total - total)
  result = {"prefill_s": prefill, "step_s": (total - prefill) / (new_tokens - 1), "compile_s": compile_s,
            "tokens": run(new_tokens).tokens}
  if reference is not None:
    seq = np.concatenate([ids, reference[:, :-1]], axis=1)
    logits = model(seq, np.ones_like(seq), pixels)[:, ids.shape[1] - 1:]  # [B, new_tokens, V]
    result["top1"] = float(np.mean(np.argmax(np.asarray(logits, np.float32), -1) == reference))
  return result


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", choices=sorted(SIZES), default="130m")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--dtypes", nargs="+", default=["float32"], help="dvl_jax compute dtypes to time")
  args = parser.parse_args()

  bandwidth, gflops = machine_floor()
  hf = build_hf(args.size)
  # Decoder weights a step reads in full (and prefill multiplies by): all but the embedding table, a gather.
  text_params = sum(p.numel() for n, p in hf.named_parameters()
                    if ("language_model" in n or "lm_head" in n) and "embed_tokens" not in n)
  vision_params = sum(p.numel() for n, p in hf.named_parameters() if "vision_model" in n or "aligner" in n)
  cfg = hf.config.text_config
  results = {"transformers": {b: bench_hf(hf, b, args.new_tokens) for b in args.batch}}
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(os.path.join(tmp, "hf"))
    del hf
    gc.collect()
    subprocess.run([sys.executable, os.path.join(ROOT, "convert", "torch_to_orbax.py"), "--src",
                    os.path.join(tmp, "hf"), "--dst", os.path.join(tmp, "dvl")], check=True, stdout=subprocess.DEVNULL)
    for dtype in args.dtypes:
      reference = results.get("dvl_jax float32")
      results[f"dvl_jax {dtype}"] = {
          b: bench_ours(os.path.join(tmp, "dvl"), b, args.new_tokens, dtype,
                        None if reference is None or dtype == "float32" else reference[b]["tokens"])
          for b in args.batch}

  seq = 576 + 24 + args.new_tokens // 2  # average context during decode
  kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
  print(f"\nmachine: {os.cpu_count()} cores; measured now: {bandwidth:.1f} GB/s (float32 matvec), "
        f"{gflops:.0f} GFLOP/s (float32 2048^3 matmul); decoder params read per step (embedding "
        f"excluded) {text_params / 1e6:.1f} M, "
        f"vision+aligner {vision_params / 1e6:.1f} M\n")
  print("| run | batch | prefill s (floor) | decode ms/step (floor) | tokens/s | vs transformers | compile s | "
        "top-1 vs float32 |")
  print("|---|---|---|---|---|---|---|---|")
  for name, per_batch in results.items():
    width = 2 if name.endswith("bfloat16") else 4  # bytes per weight and per cached value
    for b, r in per_batch.items():
      prefill_flops = 2 * text_params * 600 * b + 2 * vision_params * 576 * b
      step_floor = (text_params + kv_per_token * seq * b) * width / (bandwidth * 1e9)
      ref = results["transformers"][b]
      ratio = "" if name == "transformers" else (f"prefill {ref['prefill_s'] / r['prefill_s']:.2f}x, "
                                                 f"decode {ref['step_s'] / r['step_s']:.2f}x")
      top1 = f"{r['top1'] * 100:.1f}%" if "top1" in r else ""
      print(f"| {name} | {b} | {r['prefill_s']:.2f} ({prefill_flops / gflops / 1e9:.2f}) | "
            f"{r['step_s'] * 1e3:.1f} ({step_floor * 1e3:.1f}) | {b / r['step_s']:.1f} | {ratio} | "
            f"{r.get('compile_s', float('nan')):.1f} | {top1} |")

if __name__ == "__main__":
  main()
