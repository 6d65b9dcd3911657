"""Training checkpoints: a train state saved over 8 devices (FSDP) restores bit for bit into the shards of 4,
while the next step donates its buffers during the write; only complete checkpoints are listed; the newest K
are kept; the config comes back. (A restored state trains as the uninterrupted one: the step's equality across
meshes is test_sharded_step.py's.)"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dvl_jax
from dvl_jax.sharding import ShardingPlan, make_mesh
from dvl_jax.training import OptimizerConfig, abstract_train_state, init_train_state
from dvl_jax.training.checkpoints import RunCheckpoints

CONFIG = dvl_jax.tiny()
OPTIMIZER = OptimizerConfig(learning_rate=1e-2, total_steps=10, stage="S3")


@jax.jit
def _fill(state):
  """Every leaf (moments, step) set to distinct nonzero values: a restore of zeros would prove little."""
  return jax.tree.map(lambda x: (x + jnp.arange(1, x.size + 1, dtype=x.dtype).reshape(x.shape) % 97), state)


def test_saved_over_8_devices_restores_over_4_exactly(tmp_path):
  eight = ShardingPlan("fsdp=8")
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(x.dtype), dvl_jax.abstract_params(CONFIG))
  params = dvl_jax.Model(CONFIG, params, plan=eight).params
  state = _fill(init_train_state(params, OPTIMIZER, abstract_train_state(CONFIG, eight, OPTIMIZER)))
  saved = jax.tree.map(np.asarray, state)
  checkpoints = RunCheckpoints(tmp_path / "ckpt", keep=2)
  checkpoints.save(1, state, config={"train": {"steps": 10}})
  # The next step runs at once and donates the state's buffers while the checkpoint is being written.
  jax.jit(lambda s: jax.tree.map(lambda x: x * 0, s), donate_argnums=0)(state)
  checkpoints.wait()

  four = ShardingPlan(make_mesh("fsdp=4", jax.devices()[:4]))
  like = abstract_train_state(CONFIG, four, OPTIMIZER)
  again = RunCheckpoints(tmp_path / "ckpt", keep=2)
  assert again.latest_step() == 1 and again.config() == {"train": {"steps": 10}}
  restored = again.restore(like)
  assert jax.tree.structure(restored) == jax.tree.structure(like)
  for a, b, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(like)):
    np.testing.assert_array_equal(np.asarray(a), b)
    assert a.sharding.is_equivalent_to(want.sharding, a.ndim) and len(a.sharding.device_set) == 4
  assert int(restored.step) == int(saved.step) != 0
  # Only complete checkpoints count, and the newest `keep` stay.
  os.makedirs(tmp_path / "ckpt" / "7.orbax-checkpoint-tmp-1")
  assert again.latest_step() == 1
  for step in (2, 3):
    again.save(step, saved)
  again.close()
  assert RunCheckpoints(tmp_path / "ckpt").all_steps() == [2, 3]
  with pytest.raises(FileNotFoundError, match="No complete checkpoint in"):
    RunCheckpoints(tmp_path / "empty").restore(like)
