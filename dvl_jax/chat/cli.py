"""What chat.py and demo.py share on the command line: the model's flags, loading it, Ctrl-C while loading."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable


def add_model_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", default=None, help="a checkpoint directory, converted by convert/torch_to_orbax.py "
                      "or exported by train.py (default: the shapes captioner shipped in the package)")
  parser.add_argument("--max-context-tokens", type=int, default=None,
                      help="the longest prompt to send; older turns are left out (default: what the model takes, "
                           "less the answer's room)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="params and compute dtype (default: the checkpoint's)")
  parser.add_argument("--seed", type=int, default=None, help="fixes the samples (default: new ones each run)")


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Refuses, before anything loads, what could only fail later (exit 2)."""
  if args.max_context_tokens is not None and args.max_context_tokens < 1:
    parser.error(f"--max-context-tokens must be >= 1, got {args.max_context_tokens}.")
  if args.ckpt is not None and not os.path.isdir(args.ckpt):
    parser.error(f"--ckpt {args.ckpt!r} is not a directory; give a checkpoint directory written by "
                 "convert/torch_to_orbax.py or train.py, or omit --ckpt for the shipped shapes captioner.")


def load_chatbot(prog: str, args: argparse.Namespace) -> Any:
  """The Chatbot of the flags, or None after saying why the checkpoint cannot be loaded."""
  from dvl_jax.chat.chatbot import Chatbot  # pylint: disable=import-outside-toplevel

  print("Loading the model...", file=sys.stderr, flush=True)
  try:
    return Chatbot.load(args.ckpt, dtype=args.dtype, max_context_tokens=args.max_context_tokens, seed=args.seed)
  except (OSError, ValueError) as e:
    print(f"{prog}: cannot load the checkpoint: {e}", file=sys.stderr)
    return None


def run(main: Callable[[], int]) -> None:
  """sys.exit(main()); Ctrl-C before the front end takes over (loading, compiling) exits 130 without a traceback."""
  try:
    sys.exit(main())
  except KeyboardInterrupt:
    print("\nInterrupted.", file=sys.stderr)
    sys.exit(130)
