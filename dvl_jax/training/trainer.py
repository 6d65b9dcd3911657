"""The training run behind train.py: an Experiment in, checkpoints, metrics and an inference checkpoint out.

  result = train(load_experiment("configs/tiny.yaml", ["train.steps=20"]))

What happens, in order:
  1. Checks, before any compute: the data files exist; the model's config agrees with `init_from`'s; the global
     batch divides over the data-parallel devices and microbatches; a run directory that holds an earlier run
     holds the same experiment (else the keys that differ are named). The resolved config is saved in the run
     directory (config.yaml) and with every checkpoint.
  2. The state: restored from the newest complete checkpoint in run_dir/checkpoints (params, optimizer state,
     step, the data iterator's position), into this run's mesh, whatever mesh saved it; else built from
     `init_from` or a random init.
  3. Steps: a host batch from the data pipeline, placed over the mesh, one jitted train step (the state donated).
     Every `log_every` steps the metrics of the steps since come off the device into metrics.jsonl, TensorBoard
     and the progress bar; every `eval_every` steps an evaluation; every `checkpoint_every` steps (and at the
     end) an asynchronous checkpoint.
  4. SIGTERM or Ctrl-C: a checkpoint of the step just taken, then exit (0 after SIGTERM, 130 after Ctrl-C). A
     rerun of the same command goes on from there, exactly: the train step is deterministic (DeepSeek-VL has no
     dropout, so there is no RNG to carry) and the data resumes at its saved position.
  5. At the end an inference checkpoint in run_dir/export (train.export).

Several processes (`dvl_jax.distributed.initialize()` first): each reads its share of every batch, all write
their shards of each checkpoint, process 0 alone writes the config, the metrics and the log.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import yaml
from jax.sharding import NamedSharding, PartitionSpec

from dvl_jax import checkpoint
from dvl_jax.config import ModelConfig, preset
from dvl_jax.data.pipeline import DataIterator
from dvl_jax.data.report import DataError
from dvl_jax.generate import GenerationConfig
from dvl_jax.model import Model, abstract_params, init_params
from dvl_jax.processing.processor import Processor
from dvl_jax.sharding import ShardingPlan, make_mesh
from dvl_jax.training.batch import Batch, batch_sharding, place_batch
from dvl_jax.training.checkpoints import RunCheckpoints
from dvl_jax.training.experiment import Experiment, ModelSpec, experiment_from_dict, experiment_to_dict
from dvl_jax.training.export import export_params
from dvl_jax.training.flops import TrainedParts, device_peak_flops, train_step_flops
from dvl_jax.training.metrics import MetricsLog
from dvl_jax.training.preemption import StopRequest
from dvl_jax.training.state import TrainState, abstract_train_state, init_train_state, shardings_of
from dvl_jax.training.step import jit_train_step, objective_loss
from dvl_jax.typed_config import ConfigError

_log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
EXPORT = "export"
SAMPLES = "samples.jsonl"
# Keys a rerun in the same run directory may change: where the run lies and how it logs, not what it computes.
RESUMABLE = ("train.mesh", "train.strategy", "train.vision_strategy", "train.microbatches", "train.log_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every", "train.eval_steps",
             "train.samples", "train.sample_tokens", "train.export", "model.attention", "model.remat",
             "data.threads", "data.report_every", "data.strict", "eval_data")
# Fields of a model config that are choices of a run, not of the architecture.
_RUN_FIELDS = ("dtype", "param_dtype", "attention")


@dataclasses.dataclass
class RunResult:
  """What a run did. step: the step the state reached; stopped_by: "SIGTERM" / "SIGINT" or None; exit_code:
  what train.py exits with; export: the inference checkpoint written, or None."""

  step: int
  stopped_by: str | None = None
  exit_code: int = 0
  export: str | None = None


# ----- checks before compute -----
def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """A nested dict/list -> {"a.b.0.c": leaf}."""
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, list):
    items = enumerate(tree)
  else:
    return {prefix: tree}
  out: dict[str, Any] = {}
  for k, v in items:
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out or {prefix: tree}


def config_differences(saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
  """The dotted keys whose values differ between two resolved configs, as "key: saved X, now Y" lines; keys
  under any prefix in `ignore` are left out."""
  a, b = _flat(saved), _flat(now)
  out = []
  for key in sorted(set(a) | set(b)):
    if any(key == p or key.startswith(p + ".") for p in ignore):
      continue
    if a.get(key, "(absent)") != b.get(key, "(absent)"):
      out.append(f"{key}: saved {a.get(key, '(absent)')!r}, now {b.get(key, '(absent)')!r}")
  return out


def check_run_dir(run_dir: str, resolved: dict[str, Any]) -> None:
  """Refuses a run directory that holds another experiment (its config.yaml differs in a key that changes
  what the run computes)."""
  path = os.path.join(run_dir, RUN_CONFIG)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    saved = yaml.safe_load(f)
  diff = config_differences(saved, resolved, RESUMABLE)
  if diff:
    raise ConfigError(f"The run directory {run_dir!r} holds another experiment: its {RUN_CONFIG} differs in\n  " +
                      "\n  ".join(diff[:20]) + "\nA rerun resumes the run in its directory and must compute the same "
                      "thing. Give a new train.run_dir for a new experiment, or the saved values to resume this one.")


class RunLock:
  """An exclusive lock on a run directory (run_dir/.lock, flock), held by process 0 while it trains, so that a
  second train.py on the same directory is refused instead of writing the same checkpoints. The kernel drops it
  when the process ends, however it ends (SIGKILL included)."""

  def __init__(self, run_dir: str):
    import fcntl  # pylint: disable=import-outside-toplevel

    os.makedirs(run_dir, exist_ok=True)
    self._file = open(os.path.join(run_dir, ".lock"), "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      raise ConfigError(f"The run directory {run_dir!r} is in use by another train.py ({holder}). Wait for it, stop "
                        "it, or give another train.run_dir.") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"pid {os.getpid()}")
    self._file.flush()

  def release(self) -> None:
    self._file.close()  # closing the file drops the lock


def save_run_config(run_dir: str, resolved: dict[str, Any]) -> None:
  """config.yaml in the run directory, replaced atomically."""
  os.makedirs(run_dir, exist_ok=True)
  tmp = os.path.join(run_dir, RUN_CONFIG + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    yaml.safe_dump(resolved, f, sort_keys=False)
  os.replace(tmp, os.path.join(run_dir, RUN_CONFIG))


def check_paths(experiment: Experiment) -> None:
  """Every file and directory the experiment reads exists (the model's, the data files, the image directories,
  the samples' images); else one error naming all that do not."""
  missing = []
  for key in ("init_from", "processor"):
    path = getattr(experiment.model, key)
    if path is not None and not os.path.isdir(path):
      missing.append(f"model.{key}: no directory {path!r}")
  for section, data in (("data", experiment.data), ("eval_data", experiment.eval_data)):
    for i, source in enumerate(data.sources if data is not None else ()):
      if not os.path.isfile(source.path):
        missing.append(f"{section}.sources.{i}.path: no file {source.path!r}")
      if source.images is not None and not os.path.isdir(source.images):
        missing.append(f"{section}.sources.{i}.images: no directory {source.images!r}")
  for i, sample in enumerate(experiment.train.samples):
    if sample.image is not None and not os.path.isfile(sample.image):
      missing.append(f"train.samples.{i}.image: no file {sample.image!r}")
  if missing:
    raise FileNotFoundError("Missing inputs (paths are relative to the working directory, "
                            f"{os.getcwd()}):\n  " + "\n  ".join(missing))


def check_batch(experiment: Experiment, plan: ShardingPlan) -> None:
  """The global batch divides over the data-parallel shards and the microbatches, and over the processes."""
  data, m = experiment.data, experiment.train.microbatches
  for name, cfg in (("data", data), ("eval_data", experiment.eval_data)):
    if cfg is None:
      continue
    need = plan.batch_shards * (m if name == "data" else 1)
    if cfg.batch_size % need or cfg.batch_size % jax.process_count():
      mesh = ", ".join(f"{a}={n}" for a, n in plan.mesh.shape.items())
      raise ConfigError(f"{name}.batch_size={cfg.batch_size} does not divide over the {plan.batch_shards} data-parallel "
                        f"shards of the mesh ({mesh}, strategy {plan.strategy!r})" +
                        (f" times train.microbatches={m}" if name == "data" else "") +
                        f" and {jax.process_count()} process(es): give a multiple of "
                        f"{int(np.lcm(need, jax.process_count()))}, or change the mesh.")


def model_config(spec: ModelSpec) -> ModelConfig:
  """The ModelConfig of the run: the preset's and/or `init_from`'s (which must agree), with the run's dtype and
  attention. The params and optimizer state are float32; `dtype` is the compute dtype."""
  config = preset(spec.preset) if spec.preset is not None else None
  if spec.init_from is not None:
    saved = checkpoint.read_config(spec.init_from)
    if config is not None:
      diff = config_differences(_architecture(config), _architecture(saved))
      if diff:
        raise ConfigError(f"model.init_from={spec.init_from!r} is not a {spec.preset!r} model: its config differs "
                          f"in\n  " + "\n  ".join(d.replace("saved", "preset").replace("now", "checkpoint")
                                                  for d in diff[:20]) +
                          "\nGive the preset of that checkpoint, or leave model.preset out (the checkpoint's config "
                          "is then used).")
    config = saved
  return config.replace(dtype=spec.dtype, param_dtype="float32").with_attention(spec.attention)


def _architecture(config: ModelConfig) -> dict[str, Any]:
  d = config.with_attention("auto").to_dict()
  for name in _RUN_FIELDS:
    d.pop(name, None)
  return d


def check_processor(processor: Processor, config: ModelConfig, where: str) -> None:
  """Raises ConfigError unless the processor's tokens are the model's: image tokens per image, the image token's
  id, a vocabulary that fits the embedding, the image size."""
  tok, problems = processor.tokenizer, []
  if processor.image_config is not None and config.tokens_per_image != processor.num_image_tokens:
    problems.append(f"it gives {processor.num_image_tokens} tokens an image; the model takes {config.tokens_per_image}")
  if tok.image_token_id != config.image_token_id:
    problems.append(f"its {tok.image_token} is id {tok.image_token_id}; the model's image_token_id is "
                    f"{config.image_token_id}")
  if tok.vocab_size > config.text.vocab_size:
    problems.append(f"its vocabulary has {tok.vocab_size} tokens; the model embeds {config.text.vocab_size}")
  if processor.image_config is not None and processor.image_config.size != config.vision.image_size:
    problems.append(f"it makes images of {processor.image_config.size} px; the model's tower takes "
                    f"{config.vision.image_size}")
  if problems:
    raise ConfigError(f"The processor in {where!r} is not the model's: " + "; ".join(problems) +
                      ". model.processor (or init_from's tokenizer files) must be the model's own.")


def make_plan(experiment: Experiment, devices: Sequence[jax.Device] | None = None) -> ShardingPlan:
  """The run's ShardingPlan: train.mesh over `devices` (default every device of every process)."""
  t = experiment.train
  try:
    return ShardingPlan(make_mesh(t.mesh, devices), t.strategy, t.vision_strategy)
  except ValueError as e:
    raise ConfigError(f"train.mesh={t.mesh!r}, train.strategy={t.strategy!r}: {e}") from None


# ----- the state -----
def initial_params(experiment: Experiment, config: ModelConfig, plan: ShardingPlan) -> Any:
  """`init_from`'s params (cast to float32) or a random init, in their shards under `plan`."""
  if experiment.model.init_from is not None:
    return checkpoint.restore_params(experiment.model.init_from, abstract_params(config, plan))
  return init_params(config, experiment.train.seed, plan)


# ----- evaluation -----
def sample_generation_config(processor_dir: str, processor: Processor) -> GenerationConfig:
  """What the samples stop at: the processor directory's generation_config.json (which the export copies), else
  the tokenizer's EOS."""
  config = GenerationConfig.read(processor_dir)
  if config.eos_token_id is None and processor.tokenizer.eos_token_id is not None:
    config = config.override(eos_token_id=processor.tokenizer.eos_token_id)
  return config


class Evaluator:
  """Loss on eval_data's first `eval_steps` batches (the same ones each time) and greedy samples."""

  def __init__(self, experiment: Experiment, model: Model, processor: Processor, plan: ShardingPlan,
               like: TrainState):
    self.experiment, self.model, self.processor, self.plan = experiment, model, processor, plan
    replicated = NamedSharding(plan.mesh, PartitionSpec())

    loss_of = objective_loss(experiment.train.objective)

    def summed(params, batch):
      out = loss_of(params, batch, model.module)
      return out.sum, out.count

    self._loss = plan.jit(summed, in_shardings=(shardings_of(like.params), batch_sharding(plan)),
                          out_shardings=replicated)

  def loss(self, params: Any) -> dict[str, float]:
    total, count = 0.0, 0
    with DataIterator(self.experiment.eval_data, self.processor, log=_log.info) as data:
      for _ in range(self.experiment.train.eval_steps):
        try:
          host = next(data)
        except StopIteration:
          break
        s, c = self._loss(params, place_batch(self.plan, host.to_batch()))
        total, count = total + float(s), count + int(c)
    return {"eval/loss": total / max(count, 1), "eval/tokens": count}

  def samples(self, params: Any) -> list[dict[str, Any]]:
    self.model.params = params  # the model's jitted functions take the params as an argument
    out = []
    for sample in self.experiment.train.samples:
      content = ([{"type": "image", "path": sample.image}] if sample.image is not None else []) + [
          {"type": "text", "text": sample.prompt}]
      inputs = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                                  return_dict=True, return_tensors="np")
      gen = self.model.generate(**inputs, max_new_tokens=self.experiment.train.sample_tokens)
      text = self.processor.decode(gen.tokens[0][:gen.lengths[0]])
      out.append({"image": sample.image, "prompt": sample.prompt, "text": text})
    return out


# ----- the run -----
class _Throughput:
  """Tokens, images and FLOPs of the steps since the last log line, for tokens/s, images/s and MFU. Tokens are
  the positions computed (rows x row length, padding included, as MaxText counts them); MFU counts the model's
  FLOPs (flops.py) over the mesh's devices' peak, None where the chip's peak is not known (CPUs)."""

  def __init__(self, config: ModelConfig, experiment: Experiment, plan: ShardingPlan, module_vocab: int | None):
    self.config, self.vocab, self.objective = config, module_vocab, experiment.train.objective
    self.trained = TrainedParts.from_optimizer(config, experiment.optimizer)
    self.peak = device_peak_flops(plan.mesh.devices.flat[0])
    self.devices = plan.mesh.devices.size
    self._flops: dict[tuple[int, int, int], float] = {}  # by (rows, length, image slots)
    self.reset()

  def reset(self) -> None:
    self.start, self.tokens, self.images, self.flops = time.perf_counter(), 0, 0, 0.0

  def add(self, batch: Batch, images: int) -> None:
    """A placed batch (global arrays) and this process's image count."""
    rows, length = batch.input_ids.shape
    slots = 0 if batch.pixel_values is None else batch.pixel_values.shape[1]
    self.tokens += rows * length
    self.images += images * jax.process_count()  # each process counts its own share
    key = (rows, length, slots)
    if key not in self._flops:
      self._flops[key] = train_step_flops(self.config, self.trained, batch=rows, seq_len=length,
                                          images_per_row=slots, padded_vocab_size=self.vocab,
                                          objective=self.objective).total
    self.flops += self._flops[key]

  def metrics(self) -> dict[str, float | None]:
    seconds = max(time.perf_counter() - self.start, 1e-9)
    mfu = None if self.peak is None else self.flops / seconds / (self.peak * self.devices)
    return {"tokens_per_second": self.tokens / seconds, "images_per_second": self.images / seconds, "mfu": mfu}


def train(experiment: Experiment, *, progress: bool | None = None, log: Callable[[str], None] | None = None,
          stop: StopRequest | None = None, devices: Sequence[jax.Device] | None = None) -> RunResult:
  """Runs (or resumes) `experiment`; see the module doc. Every process calls it.

  Args:
    experiment: the Experiment (load_experiment).
    progress: a progress bar; None: on a terminal.
    log: where messages go; None: above the progress bar, on stderr (process 0).
    stop: the StopRequest that catches SIGTERM and Ctrl-C; None: a new one.
    devices: the devices of the mesh; None: every device of every process.

  Raises before any compute: FileNotFoundError (data, init_from), ConfigError (the config, the run directory);
  while training: DataError (the data pipeline cannot go on: strict mode, every record skipped).
  """
  t = experiment.train
  run_dir = os.path.abspath(t.run_dir)
  writer = jax.process_index() == 0
  resolved = experiment_to_dict(experiment)
  check_paths(experiment)
  plan = make_plan(experiment, devices)
  check_batch(experiment, plan)
  config = model_config(experiment.model)
  processor = Processor.from_pretrained(experiment.model.processor_dir)
  check_processor(processor, config, experiment.model.processor_dir)
  lock = RunLock(run_dir) if writer else None
  checkpoints = data = metrics_log = None
  try:
    checkpoints = RunCheckpoints(os.path.join(run_dir, CHECKPOINTS), keep=t.keep_checkpoints)
    start = checkpoints.latest_step()
    if start is not None:  # a run to resume (one killed before its first checkpoint is not)
      check_run_dir(run_dir, resolved)
    if writer:
      save_run_config(run_dir, resolved)
    like = abstract_train_state(config, plan, experiment.optimizer)
    data = DataIterator(experiment.data, processor, run_dir=run_dir if writer else None, log=log or _log.warning)
    if start is not None:
      state = checkpoints.restore(like, data)
    else:
      model = Model(config, initial_params(experiment, config, plan), plan=plan)
      state = init_train_state(model.params, experiment.optimizer, like)
      del model
    # Nothing else in flight before the steps: XLA:CPU can deadlock when two programs with collectives that do
    # not depend on each other (the state's pieces, made by separate programs) run at once on the same devices.
    state = jax.block_until_ready(state)
    step = int(jax.device_get(state.step))
    metrics_log = MetricsLog(run_dir if writer else None, total_steps=t.steps, start_step=step, enabled=writer,
                             progress=progress)
    say = log or metrics_log.message
    if step >= t.steps:
      say(f"{run_dir} is complete: step {step} of {t.steps}.")
    else:
      say(f"{'Resuming ' + run_dir + ' at step ' + str(step) if start is not None else 'Starting ' + run_dir}: "
          f"{t.steps} steps, {plan}, {jax.process_count()} process(es)")
    # Its module (the vocabulary padded as the plan pads it), and for the samples, the EOS the export will have.
    model = Model(config, state.params, plan=plan,
                  generation_config=sample_generation_config(experiment.model.processor_dir, processor))
    module = model.module.clone(remat_policy=experiment.model.remat)
    step_fn = jit_train_step(module, experiment.optimizer, microbatches=t.microbatches, plan=plan,
                             objective=t.objective)
    evaluator = Evaluator(experiment, model, processor, plan, like) if t.eval_every else None
    throughput = _Throughput(config, experiment, plan, module.padded_vocab_size)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    saved = step if start is not None else None
    start_step = step

    def flush() -> None:
      if not pending:
        return
      values = jax.device_get([m for _, m in pending])
      if t.objective == "region_words" and pending[0][0] == start_step + 1 and not any(v["tokens"] for v in values):
        raise DataError(f"No image token of the first {len(values)} batch(es) lies in a grounding region, so "
                        "region_words has nothing to learn: its sources' records need 'regions' ([{'box': [x0, y0, "
                        "x1, y1], 'text': ...}], dvl_jax/data/regions.py), e.g. the shapes generator's "
                        "*_captions.jsonl; data written by an older generator has none: write it anew.")
      for (s, _), v in zip(pending, values):
        extra = throughput.metrics() if s == pending[-1][0] else {}
        metrics_log.write(s, {**v, **extra, "skipped_records": data.report.skipped})
      pending.clear()
      throughput.reset()

    def save() -> None:
      nonlocal saved
      if saved != step:
        checkpoints.save(step, state, data, config=resolved)
        saved = step

    with stop or StopRequest() as stopper:
      while step < t.steps:
        try:
          host = next(data)
        except StopIteration:
          say(f"The data ran out at step {step}.")
          break
        except ValueError as e:  # the pipeline's own errors (strict mode, nothing left to train on) say what to do
          raise DataError(f"At step {step + 1}: {e}") from e
        batch = place_batch(plan, host.to_batch(), microbatches=t.microbatches)
        state, metrics = step_fn(state, batch)
        step += 1
        throughput.add(batch, host.images)
        pending.append((step, metrics))
        if step % t.log_every == 0 or step == t.steps:
          flush()
        else:
          metrics_log.advance(step)
        if evaluator is not None and step % t.eval_every == 0:
          flush()
          _evaluate(evaluator, state.params, step, metrics_log, run_dir if writer else None, say)
          throughput.reset()
        if step % t.checkpoint_every == 0 or step == t.steps:
          save()
        if stopper.agreed():
          flush()
          save()
          checkpoints.wait()
          name = "SIGTERM" if stopper.exit_code == 0 else "SIGINT"
          say(f"{name}: saved step {step} in {checkpoints.directory}; rerun the same command to go on.")
          return RunResult(step, name, stopper.exit_code or 0)
    flush()
    save()
    checkpoints.wait()
    out, export_dir = None, os.path.join(run_dir, EXPORT)
    trained = start is None or step > start
    if t.export and step >= t.steps and (trained or not os.path.isdir(export_dir)):
      out = export_params(state.params, config, experiment.model.processor_dir, export_dir, overwrite=True, log=say)
      say(f"Exported step {step} to {out} (open it with dvl_jax.load, infer.py --ckpt).")
    return RunResult(step, export=out)
  finally:
    for part in (data, checkpoints, metrics_log):
      if part is not None:
        part.close()
    if lock is not None:
      lock.release()


def _evaluate(evaluator: Evaluator, params: Any, step: int, metrics_log: MetricsLog, sample_dir: str | None,
              say: Callable[[str], None]) -> None:
  import json  # pylint: disable=import-outside-toplevel

  values: dict[str, Any] = {}
  if evaluator.experiment.eval_data is not None:
    values = evaluator.loss(params)
    metrics_log.write(step, values)
    say(f"step {step}: eval loss {values['eval/loss']:.4f} over {values['eval/tokens']:,} tokens")
  samples = evaluator.samples(params)
  for s in samples:
    say(f"step {step}: sample {s['image'] or '(text)'}: {s['prompt']!r} -> {s['text']!r}")
  if samples and sample_dir is not None:
    with open(os.path.join(sample_dir, SAMPLES), "a", encoding="utf-8") as f:
      for s in samples:
        f.write(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n")


# ----- a run's checkpoints afterwards -----
def export_run(run_dir: str, out: str, *, step: int | None = None, overwrite: bool = False,
               log: Callable[[str], object] = print) -> str:
  """The inference checkpoint of a run's checkpoint `step` (None: the newest) at `out`. The state is restored
  over every local device (fsdp), its optimizer state with it."""
  run_dir = os.path.abspath(run_dir)
  real_out, real_run = os.path.realpath(out), os.path.realpath(run_dir)
  if real_out == real_run or real_run.startswith(real_out + os.sep) or \
      real_out.startswith(os.path.join(real_run, CHECKPOINTS) + os.sep):
    raise ValueError(f"The export {out!r} would replace the run directory {run_dir!r} or hold it or lie in its "
                     "checkpoints: give a directory of its own (e.g. RUN_DIR/export-STEP).")
  if not os.path.isdir(os.path.join(run_dir, CHECKPOINTS)):
    raise FileNotFoundError(f"{run_dir!r} is not a train.py run directory: it has no {CHECKPOINTS}/.")
  checkpoints = RunCheckpoints(os.path.join(run_dir, CHECKPOINTS), keep=1 << 30)
  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise FileNotFoundError(f"No complete checkpoint in {checkpoints.directory}: is {run_dir!r} a train.py run "
                              "directory (train.run_dir)?")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{run_dir!r} has no checkpoint of step {step}; it has steps {steps}.")
    saved = checkpoints.config(step)
    experiment = experiment_from_dict(saved)
    config = model_config(experiment.model)
    plan = ShardingPlan("fsdp=-1")
    state = checkpoints.restore(abstract_train_state(config, plan, experiment.optimizer), step=step)
  finally:
    checkpoints.close()
  return export_params(state.params, config, experiment.model.processor_dir, out, overwrite=overwrite, log=log)


__all__ = ["RunResult", "check_run_dir", "config_differences", "export_run", "model_config", "train"]
