"""Faults injected for real: diverging steps, damaged Orbax checkpoints, two runs on one workdir,
changed configs, an unwritable checkpoint folder, a full disk, torn metrics and kill -9 at random
moments. Each checks the one-line message, the exit code, that nothing good was lost, and that
the next run finishes (bitwise equal to an uninterrupted run where it trains the same steps).

MAE_JAX_FAULT_KILLS sets how many kill -9 restarts the random-kill test makes (default 3)."""

import functools
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import pytest

from mae_jax import tasks
from mae_jax import workdir as workdirs
from mae_jax.errors import UserError
from mae_jax.workdir import DamagedCheckpoint
from conftest import REPO, SMALL, flat, small_config, snapshot

ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **ONE_DEVICE)
  env.pop("PYTHONPATH", None)
  return env


def _cli(workdir, data_dir, *extra) -> list[str]:
  return [sys.executable, "-u", "-m", "mae_jax.main", f"--config={REPO}/configs/mae.py",
          f"--workdir={workdir}", *SMALL, f"--config.dataset.data_dir={data_dir}", *extra]


def _run(args, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=kw.pop("timeout", 600), **kw)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.strip()]


class Watched:
  """A CLI run in the background whose stdout lines are collected as they come."""

  def __init__(self, args, **kw):
    self.proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, **kw)
    self.lines: list[str] = []
    self._thread = threading.Thread(target=self._read, daemon=True)
    self._thread.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  def wait_for(self, text: str, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
      if any(text in line for line in self.lines):
        return
      if self.proc.poll() is not None:
        break
      time.sleep(0.05)
    self.proc.kill()
    raise AssertionError(f"{text!r} not seen in:\n" + "".join(self.lines)[-3000:])

  def finish(self, timeout: float = 300) -> tuple[int, str, str]:
    err = self.proc.stderr.read()
    self.proc.wait(timeout=timeout)
    self._thread.join(timeout=10)
    return self.proc.returncode, "".join(self.lines), err


def _final_params(workdir) -> dict:
  return flat(workdirs.load_params(str(workdir))[0])


def _assert_same(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    assert np.array_equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- non-finite steps


def test_a_diverging_run_stops_at_the_step_and_saves_nothing_non_finite(tmp_path,
                                                                       digits_data_dir):
  """lr 1e9 diverges at step 3; checkpoints every 2 steps, logs every 10: the run stops at the
  step itself and no checkpoint after the last finite one exists."""
  wd = str(tmp_path / "wd")
  cfg = dict(total_steps=8, checkpoint_every_steps=2, log_every_steps=10)
  diverging = small_config(digits_data_dir, **cfg, **{"optimizer.base_lr": 1e9})
  with pytest.raises(UserError) as e:
    tasks.pretrain(diverging, wd, devices=jax.devices()[:1])
  message = str(e.value)
  assert "\n" not in message
  bad = e.value.step
  assert message.startswith(f"loss or gradients are not finite at step {bad}:")
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert steps and steps[-1] < bad and f"last good checkpoint is step {steps[-1]}" in message
  for step in steps:
    params = flat(workdirs.load_params(wd, step)[0])
    assert all(np.isfinite(v).all() for v in params.values())
  # Resumed from the last good checkpoint with nan_policy 'skip' (a reporting key: no flag
  # needed), the run finishes and every state it saved is finite.
  out = tasks.pretrain(small_config(digits_data_dir, **cfg, nan_policy="skip",
                                    **{"optimizer.base_lr": 1e9}), wd,
                       devices=jax.devices()[:1])
  assert int(out["state"].step) == 8
  assert all(np.isfinite(v).all() for v in _final_params(wd).values())


def test_nan_policy_skip_skips_and_counts(tmp_path, digits_data_dir):
  wd = str(tmp_path / "wd")
  c = small_config(digits_data_dir, total_steps=6, checkpoint_every_steps=2, log_every_steps=3,
                   nan_policy="skip", **{"optimizer.base_lr": 1e9})
  out = tasks.pretrain(c, wd, devices=jax.devices()[:1])
  logged = [h for h in out["history"] if "skipped_steps" in h]
  assert [h["step"] for h in logged] == [3, 6]
  assert sum(h["skipped_steps"] for h in logged) >= 3  # lr 1e9: most steps are not finite.
  assert all(np.isfinite(v).all() for v in _final_params(wd).values())


def test_the_cli_reports_a_divergence_in_one_line(tmp_path, digits_data_dir):
  wd = tmp_path / "wd"
  r = _run(_cli(wd, digits_data_dir, "--config.optimizer.base_lr=1e9",
                "--config.log_every_steps=10", "--config.checkpoint_every_steps=5",
                "--config.total_steps=20"))
  assert r.returncode == 2
  lines = _error_lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: loss or gradients are not finite "
                                                 "at step "), r.stderr[-2000:]


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, digits_data_dir):
  """A finished 6-step run with checkpoints at 2, 4 and 6, and its final params."""
  wd = str(tmp_path_factory.mktemp("clean") / "wd")
  config = small_config(digits_data_dir, total_steps=6, checkpoint_every_steps=2)
  tasks.pretrain(config, wd, devices=jax.devices()[:1])
  return wd, config, _final_params(wd)


def _largest_array_file(step_dir: str) -> str:
  """The largest data file of the checkpoint's state (OCDBT keeps them in .../d/)."""
  files = [os.path.join(root, f) for root, _, fs in os.walk(os.path.join(step_dir, "state"))
           if os.path.basename(root) == "d" for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 3)


def _delete_array_file(step_dir):
  os.remove(_largest_array_file(step_dir))


def _flip_a_bit(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))


def _delete_meta(step_dir):
  shutil.rmtree(os.path.join(step_dir, "meta"))


def _delete_state_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


DAMAGE = [_truncate, _delete_array_file, _flip_a_bit, _delete_meta, _delete_state_metadata]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes(
    damage, clean_run, tmp_path, capsys):
  clean, config, final = clean_run
  wd = str(tmp_path / "wd")
  shutil.copytree(clean, wd)
  damage(os.path.join(wd, "checkpoints", "6"))
  # Readers (analysis, export, init_from, TinyMIM's teacher) report it in one line, or, where
  # the damage is in arrays they do not read (OCDBT files mix arrays; the optimizer state's may
  # be hit), return the params exactly as saved.
  try:
    params = flat(workdirs.load_params(wd)[0])
  except DamagedCheckpoint as e:
    assert "\n" not in str(e) and "step 6 is damaged" in str(e)
  else:
    _assert_same(params, final)
  # Training moves it aside, resumes from step 4 and ends where the clean run ended.
  tasks.pretrain(config, wd, devices=jax.devices()[:1])
  out = capsys.readouterr().out
  warning = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
  assert len(warning) == 1 and "step 6 is damaged" in warning[0], out
  assert "resumed from" in out and "at step 4" in out
  assert os.listdir(os.path.join(wd, "checkpoints.damaged")) == ["6"]
  _assert_same(_final_params(wd), final)


def test_every_checkpoint_damaged_is_one_line_and_nothing_is_deleted(clean_run, tmp_path):
  clean, config, _ = clean_run
  wd = str(tmp_path / "wd")
  shutil.copytree(clean, wd)
  for step in ("2", "4", "6"):
    _flip_a_bit(os.path.join(wd, "checkpoints", step))
  with pytest.raises(UserError, match="every checkpoint in .* is damaged"):
    tasks.pretrain(config, wd, devices=jax.devices()[:1])
  assert sorted(os.listdir(os.path.join(wd, "checkpoints.damaged"))) == ["2", "4", "6"]


def test_export_of_a_damaged_checkpoint_is_one_line(clean_run, tmp_path):
  clean, _, _ = clean_run
  wd = str(tmp_path / "wd")
  shutil.copytree(clean, wd)
  state = os.path.join(wd, "checkpoints", "6", "state")
  for root, _, files in os.walk(state):  # every data file: the params' among them.
    for f in files if os.path.basename(root) == "d" else []:
      os.truncate(os.path.join(root, f), 100)
  before = snapshot(wd)
  r = _run([sys.executable, "-m", "mae_jax.convert", "export", f"--workdir={wd}",
            f"--out={tmp_path / 'out.safetensors'}"])
  assert r.returncode == 2
  lines = _error_lines(r.stderr)
  assert len(lines) == 1 and "step 6 is damaged" in lines[0] and "steps [2, 4]" in lines[0]
  assert snapshot(wd) == before and not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------- the run record


def test_a_changed_config_is_refused_and_config_json_is_kept(clean_run, tmp_path, capsys):
  clean, config, _ = clean_run
  wd = str(tmp_path / "wd")
  shutil.copytree(clean, wd)
  before = snapshot(wd)
  changed = small_config(config.dataset.data_dir, total_steps=6, checkpoint_every_steps=2,
                         mask_ratio=0.5, seed=7)
  with pytest.raises(UserError) as e:
    tasks.pretrain(changed, wd, devices=jax.devices()[:1])
  assert "(mask_ratio: 0.75 -> 0.5; seed: 0 -> 7)" in str(e.value)
  # The same config: nothing to do, nothing rewritten; reporting keys may change.
  again = small_config(config.dataset.data_dir, total_steps=6, checkpoint_every_steps=2,
                       log_every_steps=3)
  tasks.pretrain(again, wd, devices=jax.devices()[:1])
  assert "nothing to do" in capsys.readouterr().out
  assert snapshot(wd) == before
  # A longer schedule is a deliberate change: with the flag the run continues and records it.
  longer = small_config(config.dataset.data_dir, total_steps=8, checkpoint_every_steps=2)
  out = tasks.pretrain(longer, wd, devices=jax.devices()[:1], allow_config_change=True)
  assert int(out["state"].step) == 8
  assert json.load(open(os.path.join(wd, "config.json")))["total_steps"] == 8


# ----------------------------------------------------------------------------- concurrent runs


def test_a_second_run_on_a_busy_workdir_is_refused_and_a_dead_ones_lock_taken_over(
    tmp_path, digits_data_dir):
  wd = tmp_path / "wd"
  first = Watched(_cli(wd, digits_data_dir, "--config.total_steps=100000",
                       "--config.checkpoint_every_steps=4"))
  first.wait_for("step 4/")
  second = _run(_cli(wd, digits_data_dir, "--config.total_steps=100000", "--config.seed=7"))
  assert second.returncode == 2
  lines = _error_lines(second.stderr)
  assert len(lines) == 1 and "is in use by another run (pid " in lines[0], second.stderr
  assert f"pid {first.proc.pid} " in lines[0]
  assert json.load(open(wd / "config.json"))["seed"] == 0
  first.proc.send_signal(signal.SIGKILL)
  first.finish()
  third = _run(_cli(wd, digits_data_dir, "--config.total_steps=100000", "--allow_config_change",
                    "--config.total_steps=6"))
  assert third.returncode == 0, third.stderr[-2000:]
  assert "notice: taking over the lock of an earlier run" in third.stdout
  assert "resumed from" in third.stdout


def test_two_fresh_runs_started_together_one_trains_one_refuses(tmp_path, digits_data_dir):
  wd = tmp_path / "wd"
  runs = [Watched(_cli(wd, digits_data_dir, "--config.total_steps=100000",
                       f"--config.seed={seed}")) for seed in (0, 1)]
  # The loser exits by itself; then the winner is stopped.
  deadline = time.time() + 300
  while all(r.proc.poll() is None for r in runs) and time.time() < deadline:
    time.sleep(0.1)
  loser = next(r for r in runs if r.proc.poll() is not None)
  winner = runs[1 - runs.index(loser)]
  code, _, err = loser.finish()
  assert code == 2 and len(_error_lines(err)) == 1 and "in use by another run" in err, err
  winner.wait_for("step 2/")
  winner.proc.send_signal(signal.SIGTERM)
  code, out, err = winner.finish()
  assert code == 0, err[-2000:]
  seed = json.load(open(wd / "config.json"))["seed"]
  assert seed == runs.index(winner)


# ----------------------------------------------------------------------------- full or unwritable disks


@functools.cache
def _can_mount() -> bool:
  """Whether this process may mount a tmpfs (root in most containers, not in all). Probed in a
  folder of its own: parallel test workers probe at the same time."""
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  probe = tempfile.mkdtemp(prefix="mae_jax_mount_probe_")
  try:
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", probe],
                      capture_output=True).returncode != 0:
      return False
    if subprocess.run(["umount", probe], capture_output=True).returncode != 0:
      subprocess.run(["umount", "-l", probe], capture_output=True)
    return True
  finally:
    shutil.rmtree(probe, ignore_errors=True)


def _unmount(path: str) -> None:
  # A lazy unmount when a just-ended process's files still hold the mount ("target is busy").
  if subprocess.run(["umount", path], capture_output=True).returncode != 0:
    subprocess.run(["umount", "-l", path], check=True)


def _make_unwritable(path: str) -> callable:
  """Makes `path` unwritable for the run (root ignores permission bits: a read-only bind mount
  there); returns the undo."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return lambda: os.chmod(path, 0o755)
  subprocess.run(["mount", "--bind", path, path], check=True)
  subprocess.run(["mount", "-o", "remount,ro,bind", path], check=True)
  return lambda: _unmount(path)


def test_an_unwritable_checkpoint_folder_ends_the_run_in_one_line(tmp_path, digits_data_dir):
  if os.geteuid() == 0 and not _can_mount():
    pytest.skip("root without mount: no way to make a folder unwritable")
  wd = tmp_path / "wd"
  run = Watched(_cli(wd, digits_data_dir, "--config.total_steps=100000",
                     "--config.checkpoint_every_steps=2"))
  run.wait_for("step 2/")
  while not (wd / "checkpoints" / "2").is_dir():
    time.sleep(0.05)
  undo = _make_unwritable(str(wd / "checkpoints"))
  try:
    t0 = time.time()
    code, _, err = run.finish(timeout=120)  # a hang would time out here.
    took = time.time() - t0
  finally:
    undo()
  lines = _error_lines(err)
  assert code == 2 and len(lines) == 1, err[-3000:]
  assert lines[0].startswith(f"error: cannot write checkpoints in {wd}/checkpoints: ")
  assert took < 120
  # The checkpoints written before are intact; the next run resumes from one and finishes.
  r = _run(_cli(wd, digits_data_dir, "--config.total_steps=100000", "--allow_config_change",
                "--config.total_steps=8"))
  assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]


def test_a_full_disk_ends_the_run_in_one_line_and_loses_nothing(tmp_path, digits_data_dir):
  """A 12 MB tmpfs where mounting is allowed (ENOSPC); elsewhere a file-size limit (EFBIG),
  the same failure of a write inside Orbax's writer threads."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = _can_mount()
  if mounted:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12M", "tmpfs", str(disk)], check=True)
    limit = None
  else:
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
  try:
    wd = disk / "wd"
    r = _run(_cli(wd, digits_data_dir, "--config.total_steps=40",
                  "--config.checkpoint_every_steps=2"), preexec_fn=limit, timeout=300)
    lines = _error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot write checkpoints in {wd}/checkpoints: [Errno ")
    assert ("No space left on device" if mounted else "File too large") in lines[0]
    saved = tmp_path / "saved"
    shutil.copytree(wd, saved)
  finally:
    if mounted:
      _unmount(str(disk))
  # Moved to a disk with room, the run resumes from its last complete checkpoint and finishes.
  r = _run(_cli(saved, digits_data_dir, "--config.total_steps=40",
                "--config.checkpoint_every_steps=2"))
  assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]


# ----------------------------------------------------------------------------- torn files, kill -9


def test_a_torn_metrics_line_is_dropped_on_resume(clean_run, tmp_path):
  clean, config, _ = clean_run
  wd = str(tmp_path / "wd")
  shutil.copytree(clean, wd)
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "loss": 0.4')  # killed mid-line.
  from mae_jax import train
  assert train.read_metrics(wd)[-1]["step"] == 6  # readers skip it
  longer = small_config(config.dataset.data_dir, total_steps=8, checkpoint_every_steps=2)
  tasks.pretrain(longer, wd, devices=jax.devices()[:1], allow_config_change=True)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]  # every line parses.
  assert [r["step"] for r in records if "loss" in r][-1] == 8


def test_kill_9_at_random_moments_resumes_bitwise(tmp_path, digits_data_dir):
  """Runs killed with SIGKILL at random moments of their training (between and inside steps and
  checkpoint saves, which come every 2 steps); every restart resumes from a complete checkpoint,
  the runs make progress, and the final parameters equal an uninterrupted run's, bitwise."""
  kills = int(os.environ.get("MAE_JAX_FAULT_KILLS", "3"))
  # About 7 steps a second with a save every 2: long enough that every kill lands while the
  # runs train.
  total = 12 * kills + 24
  flags = [f"--config.total_steps={total}", "--config.checkpoint_every_steps=2",
           "--config.log_every_steps=2"]
  reference = tmp_path / "reference"
  r = _run(_cli(reference, digits_data_dir, *flags))
  assert r.returncode == 0, r.stderr[-2000:]
  wd, rng = tmp_path / "killed", random.Random(0)
  resumed, mid_training = [0], 0
  for _ in range(kills):
    run = Watched(_cli(wd, digits_data_dir, *flags))
    run.wait_for("compiled train step")  # training has begun
    time.sleep(rng.uniform(0.2, 2.5))
    mid_training += run.proc.poll() is None
    run.proc.send_signal(signal.SIGKILL)
    _, out, _ = run.finish()
    assert "damaged" not in out, out
    for line in out.splitlines():
      if line.startswith("resumed from"):
        resumed.append(int(line.split()[-1]))
  r = _run(_cli(wd, digits_data_dir, *flags))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "damaged" not in r.stdout, r.stdout
  resumed += [int(line.split()[-1]) for line in r.stdout.splitlines()
              if line.startswith("resumed from")]
  print(f"{kills} kills, {mid_training} while training; restarts resumed at steps {resumed[1:]}")
  # Each restart starts from a complete checkpoint (an even step), never behind the one before.
  assert all(s % 2 == 0 for s in resumed) and resumed == sorted(resumed), resumed
  assert mid_training >= max(1, kills // 2) and 0 < resumed[-1] < total, (mid_training, resumed)
  _assert_same(_final_params(wd), _final_params(reference))