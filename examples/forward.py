"""One image through a converted checkpoint: the chat prompt, the next-token logits and their top tokens.

  python examples/forward.py --ckpt CKPT_DIR --image tests/data/monday.jpg [--prompt "Describe this image."]
"""

import argparse
import time

import numpy as np

import dvl_jax


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ckpt", required=True)
  parser.add_argument("--image", required=True)
  parser.add_argument("--prompt", default="Describe this image.")
  args = parser.parse_args()

  processor = dvl_jax.Processor.from_pretrained(args.ckpt)
  model = dvl_jax.load(args.ckpt)
  messages = [{"role": "user", "content": [{"type": "image", "path": args.image}, {"type": "text", "text": args.prompt}]}]
  inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
  start = time.time()
  logits = np.asarray(model(**inputs))
  top = np.argsort(logits[0, -1])[::-1][:5]
  print(f"{args.image}: {inputs['input_ids'].shape[1]} tokens ({processor.num_image_tokens} for the image) -> "
        f"logits {logits.shape} in {time.time() - start:.2f} s (compile included)")
  print("top next tokens:", ", ".join(f"{processor.decode([i])!r} ({logits[0, -1, i]:.3f})" for i in top))


if __name__ == "__main__":
  main()
