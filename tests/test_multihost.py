"""Multi-process runs (two local CPU processes, gloo collectives) and preemption by SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mae_jax import data, distributed, train
from mae_jax.errors import UserError
from mae_jax.methods import get_method
from conftest import REPO, SMALL, small_config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("PYTHONPATH", None)
  return env


def test_when_processes_join():
  init = distributed.should_initialize
  assert not init("auto", None, None, None, environ={})
  assert init("auto", "localhost:1234", 2, 1, environ={})
  assert init("auto", None, None, None, environ={"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"})
  assert not init("auto", None, None, None, environ={"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
  assert not init("auto", None, None, None, environ={"SLURM_NTASKS": "4"})  # sbatch, not srun.
  assert init("on", None, None, None, environ={})
  assert not init("off", None, None, None, environ={"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"})
  with pytest.raises(UserError, match="go together"):
    init("auto", "localhost:1234", None, 0, environ={})
  with pytest.raises(UserError, match="process_id"):
    init("auto", "localhost:1234", 2, 2, environ={})


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
  """Two processes with 2 CPU devices each (the real CLI, jax.distributed over gloo) against one
  process with 4 devices fed the same global batches: the same losses and final parameters.
  The data_dir is fresh: the two processes find the digits unprepared, and only one prepares."""
  steps = 3
  data_dir = str(tmp_path / "tfds")
  flags = [f"--config={REPO}/configs/mae.py", f"--workdir={tmp_path / 'two'}", *SMALL,
           f"--config.total_steps={steps}", "--config.log_every_steps=1",
           f"--config.dataset.data_dir={data_dir}"]
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mae_jax.main", *flags, f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}"], cwd=REPO, env=_env(2),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "process 1 of 2: 2 local devices, 4 in all" in outs[1]
  assert "preparing mae_jax_digits" in outs[0] and "preparing" not in outs[1]
  with open(tmp_path / "two" / "metrics.jsonl") as f:
    logged = [r for r in map(json.loads, f) if "loss" in r]
  assert [r["step"] for r in logged] == list(range(1, steps + 1))

  # The same run in this process: 4 devices, each step's global batch = process 0's rows then
  # process 1's, as make_array_from_process_local_data lays them out.
  config = small_config(data_dir, total_steps=steps, log_every_steps=1)
  source = data.get_source(config.dataset)
  mesh = train.make_mesh(jax.devices()[:4])
  spe = data.steps_per_epoch(source, config.dataset.train_split, config.batch_size, 2)
  plan = train.make_plan(config, spe)
  update = train.build_update(config, mesh, plan, get_method(config, plan.total_steps))
  state = jax.jit(update.init_state, out_shardings=update.shardings)(
      jax.random.PRNGKey(config.seed))
  streams = [data.train_batches(source, config.dataset, split=config.dataset.train_split,
                                image_size=config.image_size, global_batch_size=config.batch_size,
                                seed=config.seed, process_index=i, process_count=2)
             for i in range(2)]
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  losses = []
  for _ in range(steps):
    parts = [next(s) for s in streams]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = update.step(state, train.to_global(batch, sharding))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose([r["loss"] for r in logged], losses, rtol=1e-5)


def _read_until(proc, pattern: str, timeout: float) -> str:
  seen, end = [], time.time() + timeout
  while time.time() < end:
    line = proc.stdout.readline()
    if not line:
      break
    seen.append(line)
    if pattern in line:
      return "".join(seen)
  proc.kill()
  raise AssertionError(f"{pattern!r} not seen in:\n" + "".join(seen)[-3000:])


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, digits_data_dir):
  workdir = tmp_path / "run"
  flags = [f"--config={REPO}/configs/mae.py", f"--workdir={workdir}", *SMALL,
           "--config.log_every_steps=1", "--config.checkpoint_every_steps=100000",
           f"--config.dataset.data_dir={digits_data_dir}"]
  proc = subprocess.Popen([sys.executable, "-u", "-m", "mae_jax.main", *flags,
                           "--config.total_steps=100000"], cwd=REPO, env=_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _read_until(proc, "step 2/", timeout=300)  # compiled and training.
  proc.send_signal(signal.SIGTERM)
  rest = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, rest[-3000:]
  stopped = [line for line in rest.splitlines() if line.startswith("stopping at step")]
  assert stopped and "(SIGTERM)" in stopped[0], rest[-3000:]
  step = int(stopped[0].split()[3].rstrip(";"))
  assert step >= 2 and sorted(os.listdir(workdir / "checkpoints")) == [str(step)]

  # The same command (here with a nearby end so the test is short: a deliberate change of the
  # schedule) resumes from that step.
  r = subprocess.run([sys.executable, "-m", "mae_jax.main", *flags, "--allow_config_change",
                      f"--config.total_steps={step + 1}"], cwd=REPO, env=_env(1),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"at step {step}" in r.stdout and f"step {step + 1}/{step + 1}" in r.stdout
