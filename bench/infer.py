"""Captioning throughput: infer.py's loop vs a straightforward transformers loop, same weights, same images.

  python bench/infer.py [--images 64] [--batch-size 8] [--new-tokens 32]

A ~130M DeepSeek-VL (bench/generate.py's "130m": LLaMA 12 x 768, SigLIP 12 x 384 at 384 px, 576 tokens per image)
with random weights and the tiny tokenizer (needs torch + transformers). `--images` images are the 7 in tests/data,
cycled. transformers: the processor's chat template with image paths, then `generate` (greedy) in batches of
`--batch-size`, decoded; one warm-up batch first. dvl_jax: the Captioner of infer.py writing a JSONL, run twice:
cold (compile included) and warm. Random weights rarely emit EOS, so every image gets `--new-tokens` tokens.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=32)
  args = parser.parse_args()

  import torch
  from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration

  import dvl_jax
  from dvl_jax import testing
  from dvl_jax.processing import chat
  from dvl_jax.captioning import Captioner, ResultFile, collect
  from dvl_jax.convert import convert_checkpoint
  from generate import SIZES

  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, dvl_dir, images = (os.path.join(tmp, d) for d in ("hf", "dvl", "images"))
    proc = testing.hf_processor(hf_dir, num_image_tokens=576, size=384,
                                chat_template=chat.hf_chat_template())
    s = SIZES["130m"]
    config = DeepseekVLConfig(
        text_config=dict(model_type="llama", max_position_embeddings=4096, **s["text"]),
        vision_config=dict(model_type="siglip_vision_model", image_size=384, patch_size=16, hidden_act="gelu",
                           vision_use_head=False, **s["vision"]),
        image_token_id=proc.image_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = DeepseekVLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = proc.tokenizer.eos_token_id
    model.save_pretrained(hf_dir)
    convert_checkpoint(hf_dir, dvl_dir, log=lambda *_: None)

    os.makedirs(images)
    data = os.path.join(ROOT, "tests", "data")
    sources = sorted(f for f in os.listdir(data) if f.endswith((".png", ".jpg", ".jpeg")))
    paths = []
    for i in range(args.images):
      name = sources[i % len(sources)]
      paths.append(os.path.join(images, f"{i:03d}_{name}"))
      shutil.copy(os.path.join(data, name), paths[-1])
    prompt = "Describe this image."

    # transformers: processor + generate in batches, decoded.
    def hf_batch(batch_paths):
      messages = [[{"role": "user", "content": [{"type": "image", "path": p}, {"type": "text", "text": prompt}]}]
                  for p in batch_paths]
      inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        padding=True, return_tensors="pt")
      with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
      return proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    hf_batch(paths[:args.batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(paths), args.batch_size):
      hf_batch(paths[i:i + args.batch_size])
    hf_seconds = time.perf_counter() - start

    ours = dvl_jax.load(dvl_dir)
    processor = dvl_jax.Processor.from_pretrained(dvl_dir)
    captioner = Captioner(ours, processor, prompt=prompt, batch_size=args.batch_size, workers=os.cpu_count() or 1,
                          max_new_tokens=args.new_tokens)
    items = collect([images]).items
    runs = {}
    for label in ("cold", "warm"):
      results = ResultFile(os.path.join(tmp, f"{label}.jsonl"))
      runs[label] = captioner.run(items, results, progress=False)
      results.close()

  n = args.images
  print(f"{n} images, batch {args.batch_size}, {args.new_tokens} new tokens each, torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} cores")
  print("| loop | seconds | images/s | vs transformers |")
  print("| --- | ---: | ---: | ---: |")
  print(f"| transformers (processor + generate, warm) | {hf_seconds:.1f} | {n / hf_seconds:.2f} | 1.00x |")
  for label, summary in runs.items():
    print(f"| dvl_jax infer.py loop, {label} | {summary.seconds:.1f} | {summary.done / summary.seconds:.2f} | "
          f"{hf_seconds / summary.seconds:.2f}x |")


if __name__ == "__main__":
  main()
