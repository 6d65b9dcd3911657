"""Peak memory of the converter against the size of what it writes.

  python bench/convert_memory.py [--layers 4] [--dtype bfloat16]

Writes a 1.3B-shaped -hf checkpoint (full vocabulary and widths, `--layers` layers in each tower, random
bfloat16 weights; needs torch + transformers), converts it in a child process and reports the child's peak
RSS beside the size of the converted params.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile

import torch
from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--dtype", default=None, help="--dtype passed to the converter")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    config = DeepseekVLConfig(
        text_config=dict(model_type="llama", vocab_size=102400, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=args.layers, num_attention_heads=16, image_size=384, patch_size=16,
                           hidden_act="gelu", vision_use_head=False),
        tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    model = DeepseekVLForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(os.path.join(tmp, "hf"))
    del model
    cmd = [sys.executable, os.path.join(ROOT, "convert", "torch_to_orbax.py"), "--src", os.path.join(tmp, "hf"),
           "--dst", os.path.join(tmp, "out")] + (["--dtype", args.dtype] if args.dtype else [])
    subprocess.run(cmd, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out_bytes = n * (4 if args.dtype == "float32" else 2)
    print(f"params {n:,}; converted size {out_bytes / 1e9:.2f} GB; converter peak RSS {peak / 1e9:.2f} GB "
          f"({peak / out_bytes:.2f}x the output)")


if __name__ == "__main__":
  main()
