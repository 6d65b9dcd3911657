"""The shapes captioner's held-out score: exact-match captions and answers, per question kind.

  python configs/shapes/evaluate.py --ckpt runs/shapes/stage2/export --data data/shapes/test.jsonl \
      --out runs/shapes/score.json

Each image of --data (a split written by `python -m dvl_jax.data.shapes`) is asked, in its own single-turn
chat, to be described ("Describe this image.") and each of its questions; greedy answers are generated with
infer.py's loop (dvl_jax.captioning.Captioner) into --answers (default: beside --out; an interrupted run
resumes) and compared, stripped, with the generator's. --out gets the score as JSON; the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import dvl_jax
from dvl_jax.captioning.results import ResultFile
from dvl_jax.captioning.runner import Captioner
from dvl_jax.captioning.sources import Item
from dvl_jax.data import shapes


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--ckpt", default=None, help="an inference checkpoint (default: the one shipped in the package)")
  p.add_argument("--data", required=True, help="a split's JSONL, e.g. data/shapes/test.jsonl")
  p.add_argument("--out", required=True, help="the score, as JSON")
  p.add_argument("--answers", default=None, help="the generated answers' JSONL (default: OUT's name + .answers.jsonl)")
  p.add_argument("--limit", type=int, default=None, help="score the first N images only")
  p.add_argument("--batch-size", type=int, default=32)
  args = p.parse_args(argv)

  if not os.path.isfile(args.data):
    p.error(f"--data {args.data!r}: no such file; give a split's JSONL written by `python -m dvl_jax.data.shapes`")
  records = shapes.read_split(args.data)[:args.limit]
  items = [Item(image, prompt) for image, prompt, _, _ in shapes.expected_answers(records)]
  answers_path = args.answers or os.path.splitext(args.out)[0] + ".answers.jsonl"
  try:
    ckpt = args.ckpt or dvl_jax.default_checkpoint()
    model, processor = dvl_jax.load(ckpt), dvl_jax.Processor.from_pretrained(ckpt)
  except (FileNotFoundError, ValueError) as e:
    p.error(f"--ckpt: {e}")
  captioner = Captioner(model, processor, batch_size=args.batch_size, max_new_tokens=shapes.MAX_ANSWER_TOKENS)
  results = ResultFile(answers_path)
  try:
    summary = captioner.run(items, results, progress=sys.stderr.isatty())
  finally:
    results.close()
  if summary.interrupted:
    return 130
  with open(answers_path, encoding="utf-8") as f:
    generated = {(r["image"], r["prompt"]): r["caption"] for r in map(json.loads, f) if r.get("error") is None}
  score = shapes.score(records, generated)
  score.update(checkpoint=os.path.abspath(ckpt), data=os.path.abspath(args.data))
  with open(args.out + ".partial", "w", encoding="utf-8") as f:
    json.dump(score, f, indent=2)
  os.replace(args.out + ".partial", args.out)
  print(shapes.format_score(score))
  return 0


if __name__ == "__main__":
  sys.exit(main())
