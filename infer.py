"""Batch captioning: one JSON line per image, resumable.

  python infer.py [--ckpt CKPT_DIR] --images PATH [PATH ...] --out captions.jsonl [--prompt "Describe this image."]

--ckpt: a checkpoint converted by convert/torch_to_orbax.py or exported by train.py; without it, the shapes
captioner that ships in the package (dvl_jax/assets: it knows coloured circles, squares and triangles only).

PATH: an image file, a directory (searched recursively for image files), a glob ("photos/**/*.jpg") or a manifest
(.txt: one image per line; .jsonl: {"image": ..., "prompt": ...} per line). Each output line has image, prompt,
caption, num_tokens (generated, EOS included), finish_reason ("stop" at EOS, "length" at --max-new-tokens) and
error (null on success), and warning when decoding the image warned (e.g. a very large image). Rerunning with
the same --out skips the images already captioned and retries those whose line is an error (a new line is
appended: the last line of an image and prompt is the one that counts; --no-retry-errors skips them too).
Ctrl-C stops after the current batch (twice: at once); nothing is half-written. Exit status: 0 every image has
a caption, 1 some image's last line is still an error, 2 bad arguments (nothing is loaded or written),
130 interrupted.
"""

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  from dvl_jax.captioning import DEFAULT_PROMPT

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", default=None, help="a checkpoint converted by convert/torch_to_orbax.py or exported "
                 "by train.py (default: the shapes captioner shipped in the package)")
  p.add_argument("--images", required=True, nargs="+", metavar="PATH")
  p.add_argument("--out", required=True, help="the JSONL to append to (and resume from)")
  p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user's text, after the image (default: %(default)r)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--repetition-penalty", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                 help="params and compute dtype (default: the checkpoint's)")
  p.add_argument("--mesh", default=None, help='a device mesh, e.g. "data=-1" (default: the first device)')
  p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding threads")
  p.add_argument("--compilation-cache", default=None, help="a directory to keep compiled programs across runs")
  p.add_argument("--no-retry-errors", action="store_true",
                 help="skip images whose line in --out is an error (default: try them again)")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  check_args(p, args)
  return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Refuses values that could only fail later, after the model has loaded (exit 2, nothing written)."""
  from dvl_jax.sampling import SamplingConfig

  for name in ("batch_size", "max_new_tokens", "workers"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
  try:
    SamplingConfig(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty)
  except ValueError as e:  # its message names the value; give it the flag's name
    message = str(e).replace("use do_sample=False for greedy", "omit --do-sample for greedy decoding")
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
      message = message.replace(name, "--" + name.replace("_", "-"))
    parser.error(message)


def main(argv=None) -> int:
  args = parse_args(argv)
  import dvl_jax
  from dvl_jax.captioning import Captioner, ResultFile, collect

  # Everything that can be wrong with the arguments fails here, before the model loads.
  existed, results = os.path.exists(args.out), None
  try:
    sources = collect(args.images)
    if not sources.items:
      raise ValueError(f"No images found in {args.images} ({len(sources.skipped)} file(s) without an image "
                       "extension skipped).")
    out = os.path.realpath(args.out)
    if out in {os.path.realpath(p) for p in args.images} or any(item.image == out for item in sources.items):
      raise ValueError(f"--out {args.out!r} is one of the inputs; choose a new file for the results.")
    results = ResultFile(args.out)
    if args.compilation_cache:
      dvl_jax.enable_compilation_cache(args.compilation_cache)
    ckpt = args.ckpt if args.ckpt is not None else dvl_jax.default_checkpoint()
    model = dvl_jax.load(ckpt, dtype=args.dtype, mesh=args.mesh)
    processor = dvl_jax.Processor.from_pretrained(ckpt)
    captioner = Captioner(model, processor, prompt=args.prompt, batch_size=args.batch_size, workers=args.workers,
                          max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)
  except (OSError, ValueError) as e:
    if results is not None:
      results.close()
      if not existed and os.path.getsize(args.out) == 0:
        os.remove(args.out)  # a run that never started leaves no output file behind
    print(f"infer.py: {e}", file=sys.stderr)
    return 2
  if sources.skipped:
    print(f"Skipping {len(sources.skipped)} file(s) without an image extension, e.g. {sources.skipped[0]}",
          file=sys.stderr)
  try:
    summary = captioner.run(sources.items, results, progress=not args.no_progress,
                            retry_errors=not args.no_retry_errors)
  finally:
    results.close()
  print(f"{summary}. Results in {args.out}.", file=sys.stderr)
  if summary.failures:
    print(f"{len(summary.failures)} image(s) without a caption:\n{summary.failure_report(args.out)}", file=sys.stderr)
  if summary.interrupted:
    return 130
  return 1 if summary.failures else 0


if __name__ == "__main__":
  sys.exit(main())
