"""Writes a tiny random DeepSeek-VL checkpoint with its tokenizer and processor files, in the transformers
`-hf` layout (needs torch + transformers, the test extra).

  python examples/make_tiny_checkpoint.py OUT_DIR

A stand-in for a released checkpoint on machines that cannot download one: the full architecture (SigLIP at
384 px with 576 tokens per image, MLP aligner, LLaMA decoder) at a few MB.
"""

import sys

from dvl_jax.testing import write_tiny_checkpoint

if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  write_tiny_checkpoint(sys.argv[1])
  print(f"Wrote a tiny random -hf DeepSeek-VL checkpoint to {sys.argv[1]}")
