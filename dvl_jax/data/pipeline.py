"""The data pipeline, files to batches, on Grain:

  data = DataIterator(config, processor, run_dir="runs/s2")  # this process's share (jax.process_index())
  for host_batch in data:
    batch = place_batch(plan, host_batch.to_batch(), microbatches=4)  # the global batch over the mesh
  state = data.get_state()  # JSON: save it with the checkpoint; data.set_state(state) resumes exactly

Per stream (text, multimodal; or one stream of all sources without modality grouping):

  each source: records (random access) -> shuffle (anew each epoch; Parquet by row groups: shuffle.py) -> repeat
  -> mix by weight (grain.MapDataset.mix)           deterministic: sample i of the mixture is fixed by the seed
  -> this process's share: samples p, p + P, ...    the union over processes is the one-process stream
  -> parse, tokenise, fit, load and preprocess images   (the costly part: in `workers` processes)
  -> rows (one sample a row, or packed)             stateful: in this process, after the workers, so that the
  -> batches of batch_size / P rows                  rows do not depend on the number of workers
then the modality of each step (mixture.py). Bad records become `Skipped` elements that travel with the batches
to the SkipReport (report.py) in this process, which counts them, writes them down and, in strict mode, stops.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import grain

from dvl_jax.data.batches import BatchIterDataset, BatchShape, HostBatch
from dvl_jax.data.config import DataConfig, SourceConfig
from dvl_jax.data.examples import Example, Overlong, make_example
from dvl_jax.data.formats import BadRecord, Conversation, parse
from dvl_jax.data.mixture import ModalityIterDataset
from dvl_jax.data.records import GROUPS_PER_WINDOW, ParquetRows, Record, open_records
from dvl_jax.data.report import SkipReport
from dvl_jax.data.rows import RowsIterDataset, Skipped
from dvl_jax.data.shuffle import GroupShuffleMapDataset
from dvl_jax.processing.processor import Processor

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Tag:
  """record -> (source index, record)."""

  index: int

  def __call__(self, record: Record) -> tuple[int, Record]:
    return self.index, record


@dataclasses.dataclass(frozen=True)
class ToExample:
  """(source index, Record) -> Example, or Skipped with the reason. Runs in the worker processes."""

  sources: tuple[SourceConfig, ...]
  processor: Processor
  seq_len: int
  max_images: int
  overlong: str

  def __call__(self, tagged: tuple[int, Record]) -> Example | Skipped:
    index, record = tagged
    source = self.sources[index]
    if record.error is not None:
      return Skipped(record.where, source.name, record.error)
    try:
      sample = parse(record.value, source)
      if source.is_text and isinstance(sample, Conversation) and sample.images:
        raise BadRecord(f"{len(sample.images)} image(s) in a text source (modality text); give the source "
                        "modality='multimodal' to train on its images")
      return make_example(sample, self.processor, seq_len=self.seq_len, max_images=self.max_images,
                          overlong=self.overlong, where=record.where, source=source.name)
    except Overlong as e:
      return Skipped(record.where, source.name, f"too long: {e}", kind="overlong")
    except BadRecord as e:
      return Skipped(record.where, source.name, str(e))
    except Exception as e:  # pylint: disable=broad-except  # one odd record must not end a run: reported as such
      return Skipped(record.where, source.name, f"unexpected {type(e).__name__}: {e}")


def stream(config: DataConfig, processor: Processor, indices: list[int], *, modality: str, process_index: int,
           process_count: int) -> grain.IterDataset:
  """One stream of HostBatches from the sources config.sources[i] for i in `indices`, this process's share."""
  datasets = []
  for i in indices:
    source = config.sources[i]
    records = open_records(source.path)
    ds = grain.MapDataset.source(records)
    if len(ds) == 0:
      raise ValueError(f"Data file {source.path!r} holds no records.")
    seed = (config.seed * 1_000_003 + i) % 2**32
    if config.shuffle and isinstance(records, ParquetRows):  # read a row group at a time: shuffle by groups
      ds = GroupShuffleMapDataset(ds, ends=records.ends, seed=seed, window=GROUPS_PER_WINDOW)
    elif config.shuffle:
      ds = ds.shuffle(seed=seed)
    datasets.append(ds.repeat().map(_Tag(i)))
  weights = [config.sources[i].weight for i in indices]
  mixed = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  mixed = mixed[process_index::process_count]
  examples = mixed.map(ToExample(config.sources, processor, config.seq_len, config.max_images, config.overlong))
  # Grain's defaults (16 threads, 500 examples read ahead) would hold ~1 GB of float32 images per stream and
  # worker; a few batches' worth is what keeps the step fed.
  rows_per_batch = config.batch_size // process_count
  examples = examples.to_iter_dataset(grain.ReadOptions(num_threads=config.threads,
                                                        prefetch_buffer_size=min(256, max(16, 4 * rows_per_batch))))
  if config.workers:
    _absl_flags_parsed()
    examples = examples.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=config.workers))
  rows = RowsIterDataset(examples, seq_len=config.seq_len, max_images=config.max_images, packing=config.packing,
                         bins=config.pack_bins)
  cfg = processor.image_config
  images = None if modality == "text" else (config.max_images, cfg.size, cfg.high_res_size)
  shape = BatchShape(rows_per_batch, (config.seq_len,) if config.packing else config.buckets,
                     images, processor.tokenizer.pad_token_id)
  return BatchIterDataset(rows, shape, modality)


def _absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags, which raise when a program that does not use absl never parsed
  them: take their defaults (a program that parses its own absl flags has done so already)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(config: DataConfig, processor: Processor, *, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """The IterDataset of this process's HostBatches (see the module doc)."""
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} does not split over {process_count} processes: each reads "
                     "an equal share of every batch. Give a multiple of the process count.")
  kw = dict(process_index=process_index, process_count=process_count)
  text = [i for i, s in enumerate(config.sources) if s.is_text]
  multimodal = [i for i, s in enumerate(config.sources) if not s.is_text]
  if not config.group_by_modality or not text or not multimodal:
    return stream(config, processor, list(range(len(config.sources))), modality="text" if not multimodal else
                  "multimodal" if not text else "mixed", **kw)
  return ModalityIterDataset(stream(config, processor, text, modality="text", **kw),
                             stream(config, processor, multimodal, modality="multimodal", **kw),
                             target=config.text_share, warmup_steps=config.text_warmup_steps, seed=config.seed)


class DataIterator(grain.DatasetIterator):
  """This process's batches, step after step, with the ledger of skipped records. Iterate it; save
  `get_state()` (JSON-able) with a checkpoint, `set_state` to resume; `close()` (or `with`) ends the workers.
  A grain DatasetIterator, so Orbax saves it with grain's handler, a file per process:
  `ocp.args.Composite(data=grain.checkpoint.CheckpointSave(data), ...)`.

  Args:
    config: the DataConfig.
    processor: the model's Processor (tokenizer, image preprocessing, image tokens).
    process_index, process_count: this process among those that share each batch; None: jax's.
    run_dir: where skipped.jsonl goes; None: no file, counts and the log only.
    log: where summaries go (every `config.report_every` steps and at close).
  """

  def __init__(self, config: DataConfig, processor: Processor, *, process_index: int | None = None,
               process_count: int | None = None, run_dir: str | None = None,
               log: Callable[[str], None] = _log.warning):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=import-outside-toplevel

      process_index, process_count = jax.process_index(), jax.process_count()
    self._it = iter(make_dataset(config, processor, process_index=process_index, process_count=process_count))
    super().__init__(self._it)
    self.config = config
    self._log = log
    self.report = SkipReport(None if run_dir is None else f"{run_dir}/skipped.jsonl", strict=config.strict, log=log)
    self.step = 0
    # What a saved position depends on: each process's share, each worker's slice of it.
    self._layout = {"processes": process_count, "workers": config.workers}

  def __next__(self) -> HostBatch:
    batch = next(self._it)
    self.step += 1
    self.report.add(batch, self.step)
    if self.step % self.config.report_every == 0 and self.report.skipped:
      self._log(self.report.summary())
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "pipeline": self._it.get_state(), "report": self.report.state(),
            "layout": self._layout}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state.get("layout", self._layout)
    if saved != self._layout:
      raise ValueError(f"This data state was saved by {saved['processes']} process(es) with workers="
                       f"{saved['workers']} each; this run has {self._layout['processes']} with workers="
                       f"{self._layout['workers']}. The position in the data is kept per process and per worker: "
                       "resume with the same process count and data.workers.")
    self._it.set_state(state["pipeline"])
    self.step = int(state["step"])
    self.report.restore(state["report"], self.step)

  def close(self) -> None:
    if getattr(self, "_closed", True):  # closed, or __init__ failed before the pipeline existed
      return
    if self.report.skipped:
      self._log(self.report.summary())
    super().close()  # closes the pipeline: its worker processes end

  def __enter__(self) -> DataIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
