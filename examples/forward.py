"""One image through a converted checkpoint: prints the next-token logits after an image prompt.

  python examples/forward.py --ckpt CKPT_DIR --image tests/data/monday.jpg

Until dvl_jax.Processor exists, the image is prepared here the way DeepSeek-VL's processor does it
(longest side to the model's size, bicubic; pad to square with the mean colour; normalise with 0.5/0.5),
and the prompt is `<BOS> <image tokens> <a few fixed ids>` rather than tokenised text.
"""

import argparse
import time

import numpy as np
from PIL import Image

import dvl_jax

BOS_ID = 100000


def preprocess(path: str, size: int) -> np.ndarray:
  """[size, size, 3] float32 in [-1, 1]."""
  image = Image.open(path).convert("RGB")
  w, h = image.size
  scale = size / max(w, h)
  image = image.resize((max(round(w * scale), 1), max(round(h * scale), 1)), Image.BICUBIC)
  canvas = Image.new("RGB", (size, size), (127, 127, 127))
  canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
  return (np.asarray(canvas, np.float32) / 255.0 - 0.5) / 0.5


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ckpt", required=True)
  parser.add_argument("--image", required=True)
  args = parser.parse_args()

  model = dvl_jax.load(args.ckpt)
  cfg = model.config
  pixels = preprocess(args.image, cfg.vision.image_size)[None, None]  # [B=1, N=1, S, S, 3]
  ids = np.array([[BOS_ID % cfg.text.vocab_size] + [cfg.image_token_id] * cfg.tokens_per_image + [10, 11, 12]])
  start = time.time()
  logits = np.asarray(model(input_ids=ids, pixel_values=pixels))
  top = np.argsort(logits[0, -1])[::-1][:5]
  print(f"{args.image}: {ids.shape[1]} tokens ({cfg.tokens_per_image} for the image) -> logits {logits.shape} "
        f"in {time.time() - start:.2f} s (compile included)")
  print("top next-token ids:", ", ".join(f"{i} ({logits[0, -1, i]:.3f})" for i in top))


if __name__ == "__main__":
  main()
