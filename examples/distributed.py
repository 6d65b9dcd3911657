"""Captions images with one model sharded over the devices of several processes (hosts); each process feeds its
own images and prints its own captions.

  # two processes on one machine, two CPU devices each (README, "Sharding over a device mesh"):
  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_COORDINATOR_ADDRESS=127.0.0.1:12355 JAX_NUM_PROCESSES=2 \\
  JAX_PROCESS_ID=0 python examples/distributed.py --ckpt /tmp/dvl-tiny --mesh data=2,tensor=2   # and =1
"""

import argparse
import glob
import os

import jax

import dvl_jax
from dvl_jax import distributed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ckpt", required=True)
  parser.add_argument("--mesh", default="data=-1", help="mesh spec over every device of every process")
  parser.add_argument("--images", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data"))
  parser.add_argument("--max-new-tokens", type=int, default=16)
  args = parser.parse_args()

  distributed.initialize()  # first: before anything touches jax's devices
  model = dvl_jax.load(args.ckpt, mesh=args.mesh)
  processor = dvl_jax.Processor.from_pretrained(args.ckpt)
  rank, count = jax.process_index(), jax.process_count()
  images = sorted(p for p in glob.glob(os.path.join(args.images, "*")) if p.endswith((".png", ".jpg", ".jpeg")))
  mine = images[rank::count]  # this process's share
  messages = [[{"role": "user", "content": [{"type": "image", "path": p},
                                            {"type": "text", "text": "Describe this image."}]}] for p in mine]
  inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
  out = model.generate(**inputs, max_new_tokens=args.max_new_tokens)
  texts = processor.batch_decode([t[:n] for t, n in zip(out.tokens, out.lengths)], skip_special_tokens=True)
  print(f"process {rank}/{count}, {model.plan}:")
  for path, text in zip(mine, texts):
    print(f"  {os.path.basename(path)}: {text!r}")
  distributed.shutdown()


if __name__ == "__main__":
  main()
