"""train.py over two processes on localhost (jax.distributed, gloo collectives on CPU, 1 device each) trains as
one process with 2 devices (this one): the same loss and gradient norm step for step, process 0 alone writes the metrics,
both processes exit 0 and the run is exported."""

import os
import socket
import subprocess
import sys

import jax
import pytest

from training.runs import experiment_yaml
from dvl_jax.training.experiment import load_experiment
from dvl_jax.training.metrics import METRICS_FILE, read_metrics
from dvl_jax.training.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: train.py
STEPS = 4
TIMEOUT = 300  # seconds a run may take (2 CPU cores: ~1 min each)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  """This environment without any JAX_ cluster settings, `devices` CPU devices, and `extra`."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
  return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def _launch(config: str, env: dict[str, str], cwd: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--config", config, "--no-progress",
                           f"train.steps={STEPS}", "train.mesh=data=-1"],
                          cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], what: str) -> None:
  """Waits for `procs`; asserts each exited 0, else shows its output."""
  try:
    logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"{what}, process {i}: exit {p.returncode}\n{log[-4000:]}"


@pytest.mark.slow
def test_two_processes_train_as_one(run_files, tmp_path):
  one_dir, two_dir = tmp_path / "one", tmp_path / "two"
  configs = {name: experiment_yaml(run_files, tmp_path / f"{name}.yaml", tmp_path / name) for name in ("one", "two")}
  # Each process runs in its own working directory, so that a file written relative to it would show.
  cwds = [tmp_path / f"cwd{i}" for i in range(2)]
  for d in cwds:
    d.mkdir()
  port = _free_port()
  _finish([_launch(configs["two"], _env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                         JAX_PROCESS_ID=str(i)), str(cwds[i])) for i in range(2)], "2 processes")
  # The same experiment in this process over 2 of its devices.
  one_run = load_experiment(configs["one"], [f"train.steps={STEPS}", "train.mesh=data=-1"])
  assert train(one_run, progress=False, log=lambda _: None, devices=jax.devices()[:2]).step == STEPS

  one, two = read_metrics(str(one_dir)), read_metrics(str(two_dir))
  assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, STEPS + 1)), (one, two)
  report = "\n".join(f"step {a['step']}: loss {a['loss']:.7f} / {b['loss']:.7f}, grad_norm {a['grad_norm']:.7f} / "
                     f"{b['grad_norm']:.7f}" for a, b in zip(one, two))
  print("\n(1 process / 2 processes)\n" + report)
  assert len({m["loss"] for m in one}) == STEPS, report  # steps that differ: the comparison can fail
  for key in ("loss", "grad_norm"):
    errs = [abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(one, two)]
    print(f"{key}: largest relative difference {max(errs):.2e}")
    assert max(errs) < 1e-5, f"{key}: relative differences {errs}\n{report}"
  for a, b in zip(one, two):  # the same global batches: the same supervised tokens and lr
    assert (a["tokens"], a["learning_rate"]) == (b["tokens"], b["learning_rate"]), report

  # Process 0 alone wrote the metrics: one file, each step once (above), none in a working directory.
  written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob(METRICS_FILE))
  assert written == [f"one/{METRICS_FILE}", f"two/{METRICS_FILE}"], written
  for run_dir in (one_dir, two_dir):
    export = run_dir / "export"
    assert (export / "dvl_config.json").is_file() and (export / "params").is_dir(), sorted(os.listdir(run_dir))
  assert not [p for p in two_dir.iterdir() if p.name.startswith("export") and p.name != "export"], \
      sorted(os.listdir(two_dir))  # the processes' shared temporary export was swapped in
