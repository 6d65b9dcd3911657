"""One process of the two-process data pipeline test (tests/data_pipeline/test_multihost.py): joins the run, reads
its share of the data with DataIterator (process_index / process_count from jax), takes a few steps, and for each
saves its HostBatch arrays and the global batch that place_batch assembles over a 4-device mesh (gathered
back with process_allgather). The test sets the devices through XLA_FLAGS and writes the data files and the processor.

  python tests/data_pipeline/multihost_worker.py DATA_DIR PROCESSOR_DIR OUT_DIR PORT PROCESS_ID STEPS
"""

import json
import os
import sys

import numpy as np

FIELDS = ("input_ids", "attention_mask", "positions", "loss_mask", "pixel_values", "image_labels")


def data_config(data_dir: str, batch_size: int = 8):
  """The config both the workers and the one-process run read: one text and one captions source, grouped by
  modality, padding mode with small buckets (so rows of different lengths land in different buckets)."""
  from dvl_jax.data import DataConfig, SourceConfig  # pylint: disable=import-outside-toplevel

  with open(os.path.join(data_dir, "settings.json")) as f:
    settings = json.load(f)
  return DataConfig((SourceConfig(os.path.join(data_dir, "text.jsonl"), "text"),
                     SourceConfig(os.path.join(data_dir, "captions.jsonl"), "captions")),
                    batch_size=batch_size, seq_len=256, buckets=tuple(settings["buckets"]), packing=False,
                    group_by_modality=True, seed=settings["seed"], workers=0)


def main(data_dir: str, processor_dir: str, out_dir: str, port: str, process_id: str, steps: str) -> None:
  from dvl_jax import distributed  # pylint: disable=import-outside-toplevel

  assert distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  from dvl_jax.data import DataIterator  # pylint: disable=import-outside-toplevel
  from dvl_jax.processing import Processor  # pylint: disable=import-outside-toplevel
  from dvl_jax.sharding import ShardingPlan  # pylint: disable=import-outside-toplevel
  from dvl_jax.training.batch import place_batch  # pylint: disable=import-outside-toplevel

  assert jax.process_count() == 2 and len(jax.devices()) == 4, (jax.process_count(), jax.devices())
  p = jax.process_index()
  plan = ShardingPlan("data=4")
  processor = Processor.from_pretrained(processor_dir)
  run_dir = os.path.join(out_dir, f"run{p}")
  os.makedirs(run_dir, exist_ok=True)
  with DataIterator(data_config(data_dir), processor, run_dir=run_dir) as data:  # process_* from jax
    for step in range(int(steps)):
      host = next(data)
      out = {f"local_{k}": v for k, v in host.arrays.items()}
      out["modality"] = np.asarray(host.modality)
      out["samples"] = np.asarray(host.samples)
      # place_batch agrees the rows, the row length and the image slots over the processes (padding mode buckets
      # each process's rows on its own), then assembles the global batch.
      batch = place_batch(plan, host.to_batch())
      for k in FIELDS:
        value = getattr(batch, k)
        if value is not None:
          assert value.shape[0] == 2 * host.arrays[k].shape[0], (k, value.shape)
          out[f"global_{k}"] = np.asarray(multihost_utils.process_allgather(value, tiled=True))
      np.savez(os.path.join(out_dir, f"p{p}_step{step}.npz"), **out)
  distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
