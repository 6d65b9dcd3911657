"""Train step speed, dvl_jax vs transformers + torch.optim, on the same weights and the same batch.

  python bench/train.py                        # ~130M, batch 8, one image + 32 text tokens per row, stage S3
  python bench/train.py --batch 1 --steps 2    # a quick look
  python bench/train.py --size 1.3b --no-torch --dtype bfloat16 --peak-tflops 989   # an accelerator, its peak

The step: forward, backward, gradient clipping to global norm 1.0 and AdamW(0.9, 0.95), stage S3 (the
non-hybrid model trains every param; SAM, absent here, would stay frozen). Each row is one 384 px image
(576 image tokens) and 32 text tokens, 608 in all; the text tokens after the first are the targets.

One script run: builds the transformers model (bench/generate.py's sizes, random weights), saves it and
converts it, then runs each framework in a child process of its own, so that each one's peak memory is its
own: transformers' DeepseekVLForConditionalGeneration with torch.optim.AdamW and clip_grad_norm_ (defaults
otherwise), then dvl_jax's jit_train_step. Each child first measures its framework's float32 matmul rate
(4096^3), then takes one warm-up step (its loss is printed: the two must agree) and times --steps more; the
step time is their median. FLOPs are MaxText's count (dvl_jax/training/flops.py); MFU divides them by the step
time and by --peak-tflops or, without it, by the better of the two measured matmul rates (this machine's
floor). For dvl_jax, XLA's own count of the compiled step's matmuls (recompute included) is printed beside it.
Torch runs with as many threads as XLA:CPU (the cores this process may use).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from generate import IMAGE_TOKEN, SIZES, build_hf, inputs, timed  # noqa: E402

TEXT_TOKENS = 32
LEARNING_RATE = 2e-5  # the paper's S3 peak; constant here, no warm-up (the speed does not depend on it)
BETAS = (0.9, 0.95)
CLIP_NORM = 1.0
THREADS = len(os.sched_getaffinity(0))


def make_batch(batch: int) -> tuple[np.ndarray, ...]:
  """(ids, mask, pixels [B, 1, 384, 384, 3], labels): labels are the ids where a token is a target (text tokens
  after the first), -100 elsewhere, as dvl_jax's make_labels and transformers' loss read them."""
  ids, mask, pixels = inputs(batch, TEXT_TOKENS)
  labels = np.where(ids == IMAGE_TOKEN, -100, ids)
  labels[:, 0] = -100
  return ids, mask, pixels, labels


def matmul_rate(square, a) -> float:
  """FLOP/s of `square(a)`, a 4096 x 4096 float32 matmul that waits for its result: best of 3 after a warm-up."""
  square(a)
  return 2 * a.shape[0] ** 3 / timed(lambda: square(a), 3)


def rss_mb() -> float:
  """This process's resident memory now, MB."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_torch(ckpt: str, args) -> dict:
  """transformers + torch.optim.AdamW + clip_grad_norm_: the rate of a float32 matmul, then the steps."""
  import torch
  from transformers import DeepseekVLForConditionalGeneration

  torch.set_num_threads(THREADS)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  rate = matmul_rate(lambda a: (a @ a, sync()), torch.ones(4096, 4096, device=device))
  model = DeepseekVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).to(device).train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=BETAS, eps=1e-8, weight_decay=0.0)
  ids, mask, pixels, labels = make_batch(args.batch)
  kw = dict(input_ids=torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device),
            pixel_values=torch.tensor(pixels[:, 0], device=device).permute(0, 3, 1, 2),
            labels=torch.tensor(labels, dtype=torch.long, device=device))
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    with autocast:
      loss = model(**kw).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    opt.step()
    return loss.item()  # waits for the step

  before = rss_mb()
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  return {"matmul_flops_per_s": rate, "rss_before_mb": before, **_timed_steps(step, args.steps),
          "peak_rss_mb": peak_rss_mb(),
          "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def run_jax(ckpt: str, args) -> dict:
  """dvl_jax's jit_train_step: the rate of a float32 matmul, compile, then the steps."""
  import jax
  import jax.numpy as jnp

  import dvl_jax
  from dvl_jax.nn.vlm import DeepseekVL
  from dvl_jax.training import Batch, init_train_state, jit_train_step
  from dvl_jax.training.flops import hlo_matmul_flops

  matmul = jax.jit(lambda a: a @ a)
  rate = matmul_rate(lambda a: matmul(a).block_until_ready(), jnp.ones((4096, 4096), jnp.float32))
  model = dvl_jax.load(ckpt)
  module = DeepseekVL(model.config.replace(dtype=args.dtype).with_attention(args.attention), remat_policy=args.remat)
  optimizer = optimizer_config(args.steps)
  state = init_train_state(jax.tree.map(jnp.array, model.params), optimizer)  # float32 master weights
  del model
  gc.collect()
  ids, mask, pixels, labels = make_batch(args.batch)
  batch = Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), labels=jnp.asarray(labels),
                pixel_values=jnp.asarray(pixels))
  start = time.perf_counter()
  compiled = jit_train_step(module, optimizer, microbatches=args.microbatches).lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  holder = [state]

  def step() -> float:
    holder[0], metrics = compiled(holder[0], batch)  # the state is donated
    return float(metrics["loss"])  # waits for the step

  before = rss_mb()
  out = {"matmul_flops_per_s": rate, "compile_s": compile_s, "rss_before_mb": before,
         "xla_matmul_flops": hlo_matmul_flops(compiled.as_text()),
         # What the step's buffers take, as XLA planned them: state and batch in, outputs, temporaries.
         "xla_step_mb": (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                         + memory.temp_size_in_bytes) / 2**20 if memory else None,
         **_timed_steps(step, args.steps), "peak_rss_mb": peak_rss_mb()}
  stats = jax.devices()[0].memory_stats()
  out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None
  return out


def _timed_steps(step, steps: int) -> dict:
  """One warm-up step (its loss kept), then `steps` timed ones."""
  start = time.perf_counter()
  first_loss = step()
  first_s = time.perf_counter() - start
  times, losses = [], []
  for _ in range(steps):
    start = time.perf_counter()
    losses.append(step())
    times.append(time.perf_counter() - start)
  return {"first_loss": first_loss, "first_step_s": first_s, "last_loss": losses[-1] if losses else first_loss,
          "step_s": statistics.median(times) if times else first_s, "step_times_s": times}


def optimizer_config(steps: int):
  from dvl_jax.training import OptimizerConfig

  return OptimizerConfig(learning_rate=LEARNING_RATE, total_steps=steps + 1, schedule="constant", stage="S3",
                         b1=BETAS[0], b2=BETAS[1], eps=1e-8, clip_norm=CLIP_NORM)


def step_flops(config, args):
  """MaxText's count of this step (training/flops.py)."""
  from dvl_jax.training.flops import train_step_flops

  return train_step_flops(config, optimizer_config(args.steps), batch=args.batch, seq_len=576 + TEXT_TOKENS,
                          images_per_row=1)


def child(framework: str, ckpt: str, args) -> dict:
  """Runs this script as a child for one framework; returns its results."""
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--ckpt", ckpt, "--worker-out",
           out.name, "--batch", str(args.batch), "--steps", str(args.steps), "--remat", args.remat,
           "--microbatches", str(args.microbatches), "--dtype", args.dtype]
    subprocess.run(cmd, check=True)
    with open(out.name) as f:
      return json.load(f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="130m")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
  parser.add_argument("--remat", default="none", help="dvl_jax's remat policy (dvl_jax/nn/remat.py)")
  parser.add_argument("--microbatches", type=int, default=1, help="dvl_jax's gradient accumulation steps")
  parser.add_argument("--attention", default="auto", help="dvl_jax's attention implementation (cpu, xla, ...)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="compute dtype (params stay float32; torch: autocast)")
  parser.add_argument("--no-torch", action="store_true", help="time dvl_jax only")
  parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU, instead of the measured rate")
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
  parser.add_argument("--ckpt", help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    result = (run_torch if args.worker == "torch" else run_jax)(
        os.path.join(args.ckpt, "hf" if args.worker == "torch" else "dvl"), args)
    with open(args.worker_out, "w") as f:
      json.dump(result, f)
    return

  from dvl_jax.convert import convert_checkpoint

  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    hf = build_hf(args.size)
    hf.save_pretrained(os.path.join(tmp, "hf"))
    del hf
    gc.collect()
    config = convert_checkpoint(os.path.join(tmp, "hf"), os.path.join(tmp, "dvl"), log=lambda *_: None)
    flops = step_flops(config, args)
    if not args.no_torch:
      results["transformers"] = child("torch", tmp, args)
    results["dvl_jax"] = child("jax", tmp, args)

  rates = {k: r["matmul_flops_per_s"] for k, r in results.items()}
  peak = args.peak_tflops * 1e12 if args.peak_tflops else max(rates.values())
  peak_name = f"--peak-tflops {args.peak_tflops}" if args.peak_tflops else "the better measured matmul rate"
  print(f"\n{args.size}, batch {args.batch} x {576 + TEXT_TOKENS} tokens (one image + {TEXT_TOKENS} text), stage S3, "
        f"{args.dtype}, remat {args.remat}, microbatches {args.microbatches}; {THREADS} threads; float32 4096^3 "
        "matmul: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
  print(f"model FLOPs per step (MaxText's count): {flops.total / 1e12:.3f} TFLOP = decoder weights "
        f"{flops.decoder_weights / 1e12:.3f} + attention {flops.attention / 1e12:.3f} + logits "
        f"{flops.logits / 1e12:.3f} + vision {flops.vision / 1e12:.3f} + aligner {flops.aligner / 1e12:.3f}")
  if "xla_matmul_flops" in results["dvl_jax"]:
    print(f"XLA's compiled step runs {results['dvl_jax']['xla_matmul_flops'] / 1e12:.3f} TFLOP of matmuls "
          "(recompute and the masked part of causal attention included)")
  print("first-step loss: " + ", ".join(f"{k} {r['first_loss']:.6f}" for k, r in results.items())
        + "; last: " + ", ".join(f"{k} {r['last_loss']:.6f}" for k, r in results.items()))
  print(f"\n| run | step s (median of {args.steps}) | vs transformers | tokens/s | images/s | TFLOP/s | MFU vs "
        f"{peak_name} | peak RSS MB | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  base = results.get("transformers", {}).get("step_s")
  for name, r in results.items():
    s = r["step_s"]
    r.update(tokens_per_s=flops.tokens_per_second(s), images_per_s=flops.images_per_second(s),
             model_flops_per_s=flops.per_second(s), mfu=flops.mfu(s, peak))
    ratio = f"{base / s:.2f}x" if base else ""
    memory = f"{r['peak_rss_mb']:.0f}"
    if r.get("xla_step_mb"):
      memory += f" (XLA's step buffers {r['xla_step_mb']:.0f})"
    if r.get("device_peak_mb"):
      memory += f", device {r['device_peak_mb']:.0f}"
    print(f"| {name} | {s:.2f} | {ratio} | {r['tokens_per_s']:.0f} | {r['images_per_s']:.2f} | "
          f"{r['model_flops_per_s'] / 1e12:.3f} | {r['mfu'] * 100:.1f}% | {memory} | {r.get('compile_s', 0):.1f} |")
  floors = [f"{k}: {flops.total / r['matmul_flops_per_s']:.2f} s" for k, r in results.items()]
  if "xla_matmul_flops" in results["dvl_jax"]:
    j = results["dvl_jax"]
    floors.append(f"dvl_jax with its recompute: {j['xla_matmul_flops'] / j['matmul_flops_per_s']:.2f} s")
  print("floor (the step's matmuls at the framework's own measured 4096^3 rate): " + "; ".join(floors))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "peak_flops_per_s": peak, "flops": vars(flops) | {"total": flops.total},
                 "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
