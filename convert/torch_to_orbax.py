"""Convert a DeepSeek-VL PyTorch checkpoint (safetensors) to a dvl_jax Orbax checkpoint.

  python convert/torch_to_orbax.py --src deepseek-vl-1.3b-chat --dst ckpt/deepseek-vl-1.3b-chat [--dtype bfloat16]

Reads both the transformers `-hf` layout and the original `deepseek-ai/*` one; needs no torch.
The logic lives in dvl_jax/convert/ so that it is importable (`dvl_jax.convert.convert_checkpoint`).
"""

import sys

from dvl_jax.convert import main

if __name__ == "__main__":
  sys.exit(main())
