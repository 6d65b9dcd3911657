"""One process of the two-process test (tests/test_distributed.py): joins the run, loads a checkpoint over the
global mesh, runs a forward and generate on this process's rows, and saves what it got. The test sets its
devices through XLA_FLAGS.

  python tests/distributed_worker.py CKPT OUT.npz MESH PORT PROCESS_ID
"""

import sys

import numpy as np

import dvl_jax
from dvl_jax import distributed


def rows(config: dvl_jax.ModelConfig, process_id: int) -> dict[str, np.ndarray]:
  """This process's rows: process 0 has 3 rows of 40 tokens, process 1 has 2 of 27 (padding must agree)."""
  rng = np.random.default_rng(100 + process_id)
  b, t = (3, 40) if process_id == 0 else (2, 27)
  per = config.tokens_per_image
  ids = rng.integers(0, config.image_token_id, (b, t)).astype(np.int32)
  ids[0, 3:3 + per] = config.image_token_id
  mask = np.ones_like(ids)
  mask[-1, :4] = 0
  out = {"input_ids": ids, "attention_mask": mask,
         "pixel_values": rng.normal(size=(b, 1, config.vision.image_size, config.vision.image_size, 3))}
  if config.is_hybrid:
    s = config.high_res.image_size
    out["high_res_pixel_values"] = rng.normal(size=(b, 1, s, s, 3))
  return {k: v.astype(np.float32) if k.endswith("pixel_values") else v for k, v in out.items()}


def main(ckpt: str, out: str, mesh: str, port: str, process_id: str) -> None:
  assert distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
  model = dvl_jax.load(ckpt, mesh=mesh)
  inputs = rows(model.config, int(process_id))
  logits = np.asarray(model(**inputs))
  generated = model.generate(**inputs, max_new_tokens=5)
  q = model.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  np.savez(out, logits=logits, tokens=generated.tokens, lengths=generated.lengths,
           devices=len(model.plan.mesh.devices.flat), q_shard=q.addressable_shards[0].data.shape)
  distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
