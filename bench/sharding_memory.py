"""Per-device bytes of the params (and of a KV cache) under each sharding strategy, from the shardings alone.

  python bench/sharding_memory.py [--preset deepseek-vl-7b-chat] [--devices 8] [--dtype bfloat16]
                                  [--batch 8] [--cache-len 4096]

No weights are needed: the params' shapes come from `jax.eval_shape` of the model's init, their shardings from
dvl_jax.sharding's rules, and each device's share from `NamedSharding.shard_shape`. The devices are simulated
CPU devices. Prints a markdown table for BENCHMARKS.md.
"""

import argparse
import math
import os
import sys


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="deepseek-vl-7b-chat")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--batch", type=int, default=8, help="rows of the KV cache")
  parser.add_argument("--cache-len", type=int, default=4096, help="slots of the KV cache")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  import jax
  import numpy as np

  import dvl_jax
  from dvl_jax.model import abstract_params, param_shardings
  from dvl_jax.nn.kv_cache import CACHE_AXES
  from dvl_jax.sharding import ShardingPlan

  config = dvl_jax.preset(args.preset).replace(dtype=args.dtype, param_dtype=args.dtype)
  itemsize = np.dtype(jax.numpy.dtype(args.dtype)).itemsize
  n = args.devices
  half = int(math.isqrt(n)) if math.isqrt(n) ** 2 == n else 2
  cases = [
      (f"data={n}", "data", None),
      (f"fsdp={n}", "fsdp", None),
      (f"tensor={n}", "tensor", "data"),  # SAM-B's 12 heads do not split 8 ways: the towers stay replicated
      (f"fsdp={n // half},tensor={half}", "fsdp_tensor", None),
  ]
  if n == 8:
    cases.append(("data=2,fsdp=2,tensor=2", "fsdp_tensor", None))
  shapes = abstract_params(config)
  total = sum(x.size for x in jax.tree.leaves(shapes)) * itemsize
  text = config.text
  cache_shape = (args.batch, text.num_kv_heads, args.cache_len, text.head_dim)
  cache_total = 2 * text.num_layers * math.prod(cache_shape) * itemsize
  print(f"{args.preset}, {args.dtype}: params {total / 2**30:.2f} GiB in all; KV cache for {args.batch} rows x "
        f"{args.cache_len} slots {cache_total / 2**30:.2f} GiB in all; {n} devices.\n")
  print("| mesh | strategy (vision) | params per device, GiB | of all | KV cache per device, GiB | sum, GiB |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  for mesh, strategy, vision in cases:
    plan = ShardingPlan(mesh, strategy, vision)
    shardings = param_shardings(config, plan)
    per_device = sum(math.prod(s.shard_shape(x.shape)) for x, s in zip(jax.tree.leaves(shapes),
                                                                       jax.tree.leaves(shardings))) * itemsize
    cache = plan.sharding(CACHE_AXES, cache_shape, what="the KV cache")
    cache_per_device = 2 * text.num_layers * math.prod(cache.shard_shape(cache_shape)) * itemsize
    print(f"| {mesh} | {strategy} ({vision or strategy}) | {per_device / 2**30:.2f} | {per_device / total:.1%} | "
          f"{cache_per_device / 2**30:.2f} | {(per_device + cache_per_device) / 2**30:.2f} |")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
