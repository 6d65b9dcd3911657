"""Where a train step's time goes, op by op: a jax.profiler trace of one `jit_train_step`, grouped.

  pip install xprof            # converts the trace (not a dependency of dvl_jax)
  python bench/profile_train.py [--batch 2] [--attention cpu] [--remat none] [--top 25]

The ~130M model and batch of bench/train.py (random weights, one 576-token image + 32 text tokens per row, stage
S3, float32). Ops are charged and grouped as bench/profile_prefill.py does; here every dot and convolution is
one group (forward and backward matmuls alike: a weight gradient's output has no batch dimension), loop bodies'
own time another, the rest by fusion kind. Compare one group across runs, not across machines.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile

import profile_prefill  # sets XLA_FLAGS to dump the optimised HLO, before jax starts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def group(name: str, line: str) -> str:
  if name.startswith("while"):
    return "loop overhead (lax.map, lax.scan)"
  if "dot(" in line or "convolution(" in line or name.startswith("ynn_fusion"):
    return "matmuls (forward and backward)"
  return re.sub(r"[.\d]+$", "", name)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--attention", default="auto", help="dvl_jax's attention implementation")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  try:
    from xprof.convert import raw_to_tool_data
  except ImportError:
    sys.exit("bench/profile_train.py needs xprof to read the trace: pip install xprof")
  import jax
  import jax.numpy as jnp

  import dvl_jax
  from dvl_jax.convert import convert_checkpoint
  from dvl_jax.nn.vlm import DeepseekVL
  from dvl_jax.training import Batch, init_train_state, jit_train_step
  from generate import build_hf
  from train import make_batch, optimizer_config

  with tempfile.TemporaryDirectory() as tmp:
    build_hf("130m").save_pretrained(os.path.join(tmp, "hf"))
    convert_checkpoint(os.path.join(tmp, "hf"), os.path.join(tmp, "dvl"), log=lambda *_: None)
    model = dvl_jax.load(os.path.join(tmp, "dvl"))
    module = DeepseekVL(model.config.with_attention(args.attention), remat_policy=args.remat)
    optimizer = optimizer_config(3)
    state = init_train_state(jax.tree.map(jnp.array, model.params), optimizer)
    ids, mask, pixels, labels = make_batch(args.batch)
    batch = Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), labels=jnp.asarray(labels),
                  pixel_values=jnp.asarray(pixels))
    step = jit_train_step(module, optimizer)
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    with jax.profiler.trace(os.path.join(tmp, "trace")):
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
    data, _ = raw_to_tool_data.xspace_to_tool_data(
        glob.glob(os.path.join(tmp, "trace", "**", "*.xplane.pb"), recursive=True), "trace_viewer", {})
  traced = [e for e in json.loads(data)["traceEvents"] if e.get("ph") == "X"]
  with open(os.path.join(profile_prefill.DUMP, "trace_events.json"), "w") as f:
    json.dump(traced, f)  # to regroup without rerunning
  # The step's module: of the dumped ones, the one whose instructions the trace names most.
  modules = [profile_prefill.hlo_lines(p) for p in glob.glob(os.path.join(profile_prefill.DUMP,
                                                                            "*.cpu_after_optimizations.txt"))]
  lines = max(modules, key=lambda m: sum(e["name"] in m for e in traced))
  events = [e for e in traced if e["name"] in lines]
  print(f"HLO and trace kept in {profile_prefill.DUMP}")
  title = f"train step, batch {args.batch} x 608 tokens, attention {args.attention!r}, remat {args.remat!r}"
  profile_prefill.report(title, events, lines, lambda name: group(name, lines[name]), args.top)

if __name__ == "__main__":
  main()
