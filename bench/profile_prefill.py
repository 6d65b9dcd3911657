"""Where a prefill's time goes, op by op: a jax.profiler trace of one `generate(max_new_tokens=1)`, grouped.

  pip install xprof            # converts the trace (not a dependency of dvl_jax)
  python bench/profile_prefill.py [--batch 8] [--text-tokens 24] [--top 25]

The ~130M model of bench/generate.py (random weights, one 576-token image + `--text-tokens` per row). The
optimised HLO of the prefill names each op (XLA_FLAGS --xla_dump_to, set here), and each traced op is charged
its share of wall time (two ops running at once on the two cores split it). Ops are grouped as: matmuls against
weights, attention (the dots of dot_product_attention), loop overhead (the lax.map bodies' own time) and the
rest by fusion kind (copies, transposes, elementwise). Compare one group across runs, not across machines.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUMP = tempfile.mkdtemp(prefix="dvl_prefill_hlo_")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP} --xla_dump_hlo_as_text " \
                          "--xla_dump_hlo_pass_re=NONE"
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def hlo_lines(path: str) -> dict[str, str]:
  """Instruction name -> its line in an HLO text dump."""
  lines = {}
  for line in open(path):
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if m:
      lines[m.group(1)] = re.sub(r", metadata=.*", "", line.strip())
  return lines


def group(name: str, line: str, rows: set[int]) -> str:
  """rows: the row counts of the weight matmuls (batch x tokens of each tower)."""
  if name.startswith("while"):
    return "loop overhead (lax.map)"
  if name.startswith("ynn_fusion") or "dot(" in line or "convolution(" in line:
    shape = re.search(r"= \w+\[([\d,]*)\]", line)
    dims = {int(d) for d in shape.group(1).split(",") if d} if shape else set()
    # A matmul against a weight has every row of the batch in its output ([out, rows], kernel on the left).
    return "matmul (weights)" if dims & rows or "convolution(" in line else "attention (dots, softmax)"
  return re.sub(r"[.\d]+$", "", name)  # fusion kind: copy_bitcast_fusion, bitcast_transpose_fusion, ...


def exclusive_ms(events: list[dict], key) -> dict[str, float]:
  """Wall time per group; time when k ops overlap is split k ways."""
  points = sorted([(e["ts"], 1, i) for i, e in enumerate(events)] + [(e["ts"] + e["dur"], -1, i)
                                                                       for i, e in enumerate(events)])
  active, last, out = set(), None, collections.defaultdict(float)
  for t, kind, i in points:
    if last is not None and active:
      for j in active:
        out[key(events[j])] += (t - last) / len(active) / 1e3
    last = t
    (active.add if kind == 1 else active.discard)(i)
  return out


def report(title: str, events: list[dict], lines: dict[str, str], group_of, top: int) -> None:
  """Print the traced ops' wall time by group (a markdown table) and the `top` ops, for `lines`' module."""
  by_group = exclusive_ms(events, lambda e: group_of(e["name"]))
  by_op = exclusive_ms(events, lambda e: e["name"])
  total = sum(by_group.values())
  if not total:
    sys.exit(f"{title}: no traced op belongs to the dumped module; was the step compiled inside the trace?")
  print(f"{title}: {total / 1e3:.2f} s in traced ops")
  print("| group | ms | share |\n|---|---:|---:|")
  small = 0.0
  for name, ms in sorted(by_group.items(), key=lambda kv: -kv[1]):
    if ms < total / 200:
      small += ms
    else:
      print(f"| {name} | {ms:.0f} | {100 * ms / total:.1f}% |")
  print(f"| everything under 0.5% each | {small:.0f} | {100 * small / total:.1f}% |")
  print(f"\nTop {top} ops:")
  for name, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{ms:9.1f} ms  {lines[name][:160]}")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--text-tokens", type=int, default=24)
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  try:
    from xprof.convert import raw_to_tool_data
  except ImportError:
    sys.exit("bench/profile_prefill.py needs xprof to read the trace: pip install xprof")
  import jax

  import dvl_jax
  from dvl_jax.convert import convert_checkpoint
  from generate import build_hf, inputs

  with tempfile.TemporaryDirectory() as tmp:
    build_hf("130m").save_pretrained(os.path.join(tmp, "hf"))
    convert_checkpoint(os.path.join(tmp, "hf"), os.path.join(tmp, "dvl"), log=lambda *_: None)
    model = dvl_jax.load(os.path.join(tmp, "dvl"))
    ids, mask, pixels = inputs(args.batch, args.text_tokens)
    run = lambda: model.generate(ids, mask, pixels, max_new_tokens=1, eos_token_id=[])  # noqa: E731
    run()
    run()
    with jax.profiler.trace(os.path.join(tmp, "trace")):
      run()
    data, _ = raw_to_tool_data.xspace_to_tool_data(
        glob.glob(os.path.join(tmp, "trace", "**", "*.xplane.pb"), recursive=True), "trace_viewer", {})
  [dump] = glob.glob(os.path.join(DUMP, "*jit_prefill.cpu_after_optimizations.txt"))
  lines = hlo_lines(dump)
  events = [e for e in json.loads(data)["traceEvents"] if e.get("ph") == "X" and e["name"] in lines]
  rows = {args.batch * 576, args.batch * dvl_jax.generate.bucket_length(576 + args.text_tokens)}
  report(f"prefill, batch {args.batch}, {576 + args.text_tokens}-token prompts", events, lines,
         lambda name: group(name, lines[name], rows), args.top)


if __name__ == "__main__":
  main()
