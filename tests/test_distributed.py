"""dvl_jax.distributed: two processes on localhost form one 4-device mesh (gloo collectives on CPU) and get the
single-process result; tests/distributed_worker.py is the program each of them runs."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import dvl_jax
from distributed_worker import rows
from dvl_jax import checkpoint, distributed

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
# One case (CI time): fsdp x tensor splits the batch and the params across the processes and the heads within one;
# the hybrid's SAM under a plan is covered in one process by test_sharding.py (it cost 50 s more here).
@pytest.mark.parametrize("preset, mesh", [("tiny", "fsdp=2,tensor=2")])
def test_two_processes_equal_one(tmp_path, preset, mesh):
  config = dvl_jax.preset(preset)
  checkpoint.save(tmp_path / "ckpt", dvl_jax.init_params(config, seed=2), config)
  # Each process has 2 CPU devices: the batch axis (data or fsdp) spans the processes, tensor stays within one.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path / "ckpt"), str(tmp_path / f"out{i}.npz"), mesh,
                             str(port), str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"

  single = dvl_jax.load(tmp_path / "ckpt")
  for i in range(2):
    got = np.load(tmp_path / f"out{i}.npz")
    assert got["devices"] == 4
    assert tuple(got["q_shard"]) == (2, 16, 64 // (2 if mesh.startswith("fsdp") else 1))  # heads split over tensor
    inputs = rows(config, i)  # process 0: 3 rows of 40 tokens, process 1: 2 rows of 27
    logits = np.asarray(single(**inputs))
    real = inputs["attention_mask"].astype(bool)
    assert got["logits"].shape == logits.shape
    np.testing.assert_allclose(got["logits"][real], logits[real], rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    generated = single.generate(**inputs, max_new_tokens=5)
    np.testing.assert_array_equal(got["tokens"], generated.tokens)
    np.testing.assert_array_equal(got["lengths"], generated.lengths)


def test_initialize_without_a_cluster_is_a_single_process(monkeypatch):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
  # A fresh process: JAX refuses to start its distributed runtime once a backend is up, as it is in pytest's.
  code = "from dvl_jax import distributed; import jax; print(distributed.initialize(), jax.process_count())"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.stdout.split() == ["False", "1"], out.stderr[-2000:]
  assert distributed.initialize(num_processes=1) is False
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' must be an integer"):
    distributed.initialize()
