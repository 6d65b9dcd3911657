"""Training: DeepSeek-VL's three stages, or fine-tuning on your own data, from a YAML experiment.

  python train.py --config configs/deepseek-vl-1.3b/stage3_sft.yaml data.sources.0.path=my.jsonl train.steps=2000
  python train.py export RUN_DIR OUT_DIR [--step N]   # any checkpoint of a run as an inference checkpoint

KEY=VALUE overrides any key of the config (list items by index: data.sources.0.path). A rerun of the same
command resumes from the newest complete checkpoint in train.run_dir. SIGTERM (a preempted VM, SLURM) or Ctrl-C
saves a checkpoint of the current step and exits (0 after SIGTERM, 130 after Ctrl-C; Ctrl-C twice: at once).
The run directory gets config.yaml (the resolved config), checkpoints/, metrics.jsonl, tensorboard/,
skipped.jsonl (records the data pipeline skipped) and, at the end, export/ (open it with dvl_jax.load or
infer.py --ckpt).

Exit status: 0 done (or stopped by SIGTERM, resumable), 1 failed while training, 2 a bad config, argument or
path (nothing computed), 130 interrupted.
Several processes: run the same command in each, with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set (or under SLURM / a TPU pod, which JAX detects).
"""

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="a YAML experiment (configs/)")
  p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.steps=100 data.batch_size=32")
  p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  p.add_argument("--compilation-cache", default=None, help="a directory to keep compiled programs across runs")
  p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
  return p


def _export_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="train.py export",
                              description="A run's checkpoint as an inference checkpoint (params/, dvl_config.json, "
                                          "tokenizer and processor files).")
  p.add_argument("run_dir", help="the run directory (train.run_dir)")
  p.add_argument("out", help="the new checkpoint directory")
  p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest)")
  p.add_argument("--overwrite", action="store_true", help="replace OUT, once the new checkpoint is complete")
  return p


def _export(argv: list[str]) -> int:
  args = _export_parser().parse_args(argv)
  from dvl_jax.training.trainer import export_run

  try:
    export_run(args.run_dir, args.out, step=args.step, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:  # the paths, the step, the saved config
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Exported {args.run_dir} to {args.out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["export"]:
    return _export(argv[1:])
  args = _parser().parse_args(argv)
  import dvl_jax.distributed

  dvl_jax.distributed.initialize()  # before anything touches jax's devices (several processes)
  from dvl_jax.data.report import DataError
  from dvl_jax.generate import enable_compilation_cache
  from dvl_jax.training.experiment import experiment_to_dict, load_experiment
  from dvl_jax.training.trainer import train
  from dvl_jax.typed_config import ConfigError

  try:
    experiment = load_experiment(args.config, args.overrides)
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    import yaml

    print(yaml.safe_dump(experiment_to_dict(experiment), sort_keys=False), end="")
    return 0
  if args.compilation_cache:
    enable_compilation_cache(args.compilation_cache)
  try:
    result = train(experiment, progress=False if args.no_progress else None)
  except (ConfigError, FileNotFoundError) as e:  # raised by the checks, before any compute
    print(f"error: {e}", file=sys.stderr)
    return 2
  except DataError as e:  # the data cannot go on; the newest checkpoint is kept
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # the second Ctrl-C
    print("Interrupted; the newest complete checkpoint is where a rerun goes on from.", file=sys.stderr)
    return 130
  dvl_jax.distributed.shutdown()  # in step with the other processes (nothing with one)
  return result.exit_code


if __name__ == "__main__":
  sys.exit(main())
