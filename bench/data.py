"""Data pipeline throughput (dvl_jax.data.DataIterator) on this machine, and where its time goes.

  python bench/data.py                                   # workers 0,1,2; padding and packing; 20 timed steps
  python bench/data.py --steps 5 --batch-size 8          # a quick look
  python bench/data.py --workers 0,4,8 --modes packing   # a bigger host

Builds a synthetic data set in a temporary directory: --images JPEGs of 640 x 480 (a colour gradient under
noise, saved at quality 90: about the size of a web photo), a captions JSONL (ShareGPT4V-style pairs) and an
LLaVA conversations JSONL, both multimodal sources (no text source: every step is a multimodal step, the kind
that costs the pipeline most). The processor is DeepSeek-VL's real image geometry (384 px, 576 image tokens a
image) with the test suite's tiny BPE tokenizer (vocab 320: it cuts text into ~3x the tokens DeepSeek's 100k
vocabulary would, so the text parts are longer and tokenising costs more than with the real tokenizer).

For each mode (padding: one sample a row, padded to the default buckets of --seq-len; packing: rows of --seq-len
tokens, up to --max-images images each) and each worker count, one DataIterator: --warmup batches (worker start
included), then --steps timed batches: batches/s, samples/s, images/s and real (non-pad) tokens/s. Then the
parts alone, in this process, per sample: image decode + preprocess (dvl_jax.processing.images.preprocess: load,
resize, pad to square, normalise), tokenisation (tokenize_conversation: chat template, offsets, loss mask), and
the whole make_example (parse + both + fit + stacking); and the step consumption of a 1.3B model on one GPU, with
the pipeline workers that would take.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # reference.hf_processor

CORES = len(os.sched_getaffinity(0))
WORDS = ("a the of and in on with at by from image photo picture shows shown showing man woman child dog cat car "
         "street building tree sky cloud water river mountain table chair window door red blue green white black "
         "large small old new bright dark standing sitting walking running holding looking near behind front left "
         "right background foreground several two three people group scene view close up colorful").split()
QUESTIONS = ("What is shown in this image?", "Describe the image in detail.", "What color is the main object?",
             "How many people are there?", "What is happening in the scene?", "Where might this photo be taken?")

# The estimate's assumptions (printed with it).
MODEL_PARAMS = 1.3e9  # deepseek-vl-1.3b: the LLaMA decoder (the 6 N D count leaves out SigLIP, ~0.3B)
GPU_PEAK = 989e12  # H100 SXM dense bf16 FLOP/s
MFU = 0.40
EST_BATCH, EST_SEQ = 256, 4096


def sentence(rng: random.Random, lo: int, hi: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def build_data(d: str, images: int, records: int, seed: int = 0) -> None:
  """JPEGs, captions.jsonl and llava.jsonl under d."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng, nrng = random.Random(seed), np.random.default_rng(seed)
  os.makedirs(os.path.join(d, "images"))
  y, x = np.mgrid[0:480, 0:640].astype(np.float32)
  for i in range(images):
    c0, c1 = nrng.uniform(0, 255, 3), nrng.uniform(0, 255, 3)
    t = ((x / 640 + y / 480) / 2)[..., None]
    img = c0 * (1 - t) + c1 * t + nrng.normal(0, 25, (480, 640, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(d, "images", f"{i:04d}.jpg"),
                                                                  quality=90)
  with open(os.path.join(d, "captions.jsonl"), "w") as f:
    for i in range(records):
      f.write(json.dumps({"image": f"images/{rng.randrange(images):04d}.jpg", "caption": sentence(rng, 15, 60)}) + "\n")
  with open(os.path.join(d, "llava.jsonl"), "w") as f:
    for i in range(records):
      turns = [{"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)}, {"from": "gpt", "value": sentence(rng, 20, 80)}]
      for _ in range(rng.randint(0, 2)):
        turns += [{"from": "human", "value": rng.choice(QUESTIONS)}, {"from": "gpt", "value": sentence(rng, 10, 50)}]
      f.write(json.dumps({"image": f"images/{rng.randrange(images):04d}.jpg", "conversations": turns}) + "\n")


def data_config(d: str, args, mode: str, workers: int):
  from dvl_jax.data import DataConfig, SourceConfig  # pylint: disable=import-outside-toplevel

  sources = (SourceConfig(os.path.join(d, "captions.jsonl"), "captions"),
             SourceConfig(os.path.join(d, "llava.jsonl"), "conversations"))
  return DataConfig(sources, batch_size=args.batch_size, seq_len=args.seq_len, packing=mode == "packing",
                    max_images=args.max_images if mode == "packing" else 1, workers=workers, seed=0)


def run_pipeline(d: str, processor, args, mode: str, workers: int) -> dict:
  """One DataIterator: warm-up batches, then timed ones."""
  from dvl_jax.data import DataIterator  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  with DataIterator(data_config(d, args, mode, workers), processor, process_index=0, process_count=1,
                    log=lambda *_: None) as data:
    for _ in range(args.warmup):
      next(data)
    warmup_s = time.perf_counter() - start
    samples = images = tokens = rows = 0
    lengths = []
    start = time.perf_counter()
    for _ in range(args.steps):
      batch = next(data)
      samples, images = samples + batch.samples, images + batch.images
      tokens += int((batch.arrays["attention_mask"] > 0).sum())
      rows += batch.arrays["input_ids"].shape[0]
      lengths.append(batch.arrays["input_ids"].shape[1])
      skipped = len(batch.skipped)
      assert not skipped, batch.skipped[:3]
    seconds = time.perf_counter() - start
  return {"mode": mode, "workers": workers, "seconds": seconds, "warmup_s": warmup_s,
          "batches_per_s": args.steps / seconds, "samples_per_s": samples / seconds, "images_per_s": images / seconds,
          "tokens_per_s": tokens / seconds, "images_per_row": images / rows, "samples_per_row": samples / rows,
          "fill": tokens / sum(r * l for r, l in zip([args.batch_size] * len(lengths), lengths)),
          "row_lengths": sorted(set(lengths))}


def time_parts(d: str, processor, n: int) -> dict:
  """Per-sample seconds of the parts alone (median of n): image decode + preprocess, tokenisation, make_example."""
  from dvl_jax.data import SourceConfig, make_example, parse, tokenize_conversation  # pylint: disable=import-outside-toplevel
  from dvl_jax.processing.images import preprocess  # pylint: disable=import-outside-toplevel

  out = {}
  for name, fmt in (("captions", "captions"), ("llava", "conversations")):
    source = SourceConfig(os.path.join(d, f"{name}.jsonl"), fmt)
    with open(source.path) as f:
      records = [json.loads(line) for _, line in zip(range(n), f)]
    samples = [parse(r, source) for r in records]
    tokenize_conversation(processor, samples[0].messages)  # warm
    preprocess(samples[0].images[0], processor.image_config)

    def timed(fn, items):
      times = []
      for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
      return statistics.median(times)

    out[name] = {
        "image_s": timed(lambda s: preprocess(s.images[0], processor.image_config), samples),
        "tokenize_s": timed(lambda s: tokenize_conversation(processor, s.messages), samples),
        "example_s": timed(lambda r: make_example(parse(r, source), processor, seq_len=4096, max_images=8,
                                                  overlong="truncate"), records),
        "tokens": statistics.mean(len(tokenize_conversation(processor, s.messages)[0]) for s in samples)}
  jpeg = os.path.join(d, "images", "0000.jpg")
  out["jpeg_kb"] = os.path.getsize(jpeg) / 1024
  return out


def estimate(results: list[dict], parts: dict) -> list[str]:
  """Images/s a 1.3B step on one GPU consumes, and the pipeline workers that takes."""
  step_s = 6 * MODEL_PARAMS * EST_BATCH * EST_SEQ / (MFU * GPU_PEAK)
  tokens_per_s = EST_BATCH * EST_SEQ / step_s
  packed = [r for r in results if r["mode"] == "packing"]
  images_per_row = packed[0]["images_per_row"] if packed else None
  per_image_tokens = statistics.mean(p["tokens"] for k, p in parts.items() if isinstance(p, dict))
  lines = [f"Assumptions: a {MODEL_PARAMS / 1e9:.1f}B decoder, 6 N D FLOPs (SigLIP-L's ~0.3B and attention left "
           f"out), one GPU at {GPU_PEAK / 1e12:.0f} TFLOP/s peak (H100 SXM bf16) and {MFU:.0%} MFU, batch "
           f"{EST_BATCH} x {EST_SEQ} packed tokens: a step takes 6 x {MODEL_PARAMS:.2g} x {EST_BATCH} x {EST_SEQ} / "
           f"({MFU} x {GPU_PEAK:.3g}) = {step_s:.1f} s, {tokens_per_s:,.0f} tokens/s."]
  if images_per_row:
    need = EST_BATCH * images_per_row / step_s
    lines.append(f"A multimodal step of this data packs {images_per_row:.2f} images a row (measured above; "
                 f"~{per_image_tokens:.0f} tokens a sample with the tiny tokenizer): {EST_BATCH * images_per_row:.0f} "
                 f"images a step, {need:.1f} images/s while multimodal steps run; at DeepSeek-VL's 7:3 "
                 f"text:multimodal mix of stage 2, {0.3 * need:.1f} images/s on average.")
  else:
    need = tokens_per_s / per_image_tokens
    lines.append(f"At ~{per_image_tokens:.0f} tokens a sample: {need:.1f} images/s on multimodal steps.")
  per_sample = statistics.mean(p["example_s"] for p in parts.values() if isinstance(p, dict))
  one = 1 / per_sample
  lines.append(f"One worker makes {one:.1f} samples/s (make_example alone, {per_sample * 1e3:.1f} ms a sample here): "
               f"{math.ceil(need / one)} worker(s) for the multimodal steps' rate ({need:.1f}/s), "
               f"{math.ceil(0.3 * need / one)} for the average; each is a CPU core, per GPU, with the batching in "
               "the training process on top (see the workers=0 row) and grain's prefetch buffer to ride out bursts.")
  measured = [r for r in results if r["mode"] == "packing" and r["workers"]]
  if measured:
    best = max(measured, key=lambda r: r["images_per_s"])
    lines.append(f"Measured: packing with {best['workers']} worker(s) gave {best['images_per_s']:.1f} images/s "
                 f"on {CORES} cores ({best['images_per_s'] / need:.0%} of the multimodal steps' need).")
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  parser.add_argument("--modes", default="padding,packing", help="padding, packing or both")
  parser.add_argument("--steps", type=int, default=20, help="timed batches, after --warmup")
  parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start included)")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=4096)
  parser.add_argument("--max-images", type=int, default=8, help="image slots a row when packing (padding: 1)")
  parser.add_argument("--images", type=int, default=64, help="distinct JPEGs in the data set")
  parser.add_argument("--records", type=int, default=512, help="records per data file")
  parser.add_argument("--parts", type=int, default=20, help="samples for the per-part timings")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args()

  from dvl_jax.processing import Processor  # pylint: disable=import-outside-toplevel
  from reference import hf_processor  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as d:
    start = time.perf_counter()
    build_data(d, args.images, args.records)
    hf_processor(os.path.join(d, "processor"), num_image_tokens=576, size=384)
    processor = Processor.from_pretrained(os.path.join(d, "processor"))
    print(f"data set: {args.images} JPEGs 640x480, 2 x {args.records} records, built in "
          f"{time.perf_counter() - start:.1f} s; {CORES} cores", flush=True)
    parts = time_parts(d, processor, args.parts)
    results = []
    for mode in args.modes.split(","):
      for workers in (int(w) for w in args.workers.split(",")):
        results.append(run_pipeline(d, processor, args, mode, workers))
        r = results[-1]
        print(f"  {mode} workers={workers}: {r['batches_per_s']:.2f} batches/s ({r['warmup_s']:.1f} s warm-up)",
              flush=True)

  print(f"\nDataIterator, batch {args.batch_size}, seq_len {args.seq_len}, {args.steps} timed batches after "
        f"{args.warmup}; {CORES} cores; captions + LLaVA conversations (all steps multimodal)\n")
  print("| mode | workers | batches/s | samples/s | images/s | tokens/s | samples/row | images/row | fill | row "
        "lengths | warm-up s |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
  for r in results:
    print(f"| {r['mode']} | {r['workers']} | {r['batches_per_s']:.2f} | {r['samples_per_s']:.1f} | "
          f"{r['images_per_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['samples_per_row']:.2f} | "
          f"{r['images_per_row']:.2f} | {r['fill']:.0%} | {r['row_lengths']} | {r['warmup_s']:.1f} |")
  print(f"\nThe parts alone, in this process, per sample (median of {args.parts}; JPEG {parts['jpeg_kb']:.0f} KB):\n")
  print("| source | image decode + preprocess ms | tokenise ms | make_example ms | tokens a sample |")
  print("|---|---:|---:|---:|---:|")
  for name in ("captions", "llava"):
    p = parts[name]
    print(f"| {name} | {p['image_s'] * 1e3:.1f} | {p['tokenize_s'] * 1e3:.1f} | {p['example_s'] * 1e3:.1f} | "
          f"{p['tokens']:.0f} |")
  print("\n1.3B on one GPU:")
  for line in estimate(results, parts):
    print("- " + line)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "results": results, "parts": parts}, f, indent=1)


if __name__ == "__main__":
  main()
