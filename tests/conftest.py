"""Test setup: 8 emulated CPU devices for the whole session, quiet TensorFlow.

Set before JAX is imported anywhere, so `jax.devices()` has 8 CPU devices; single-device runs use a
mesh over `jax.devices()[:1]`.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session (and the CLI subprocesses the tests start):
# many tests compile the same small steps, and compiling is most of their time on CPU.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                   f"mae_jax_test_jax_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# With the torch extra installed: timm (torchvision -> torch._dynamo -> triton) must be imported
# before TensorFlow; importing it after TensorFlow segfaults (seen here with torch 2.14.1, TF 2.21).
import importlib  # noqa: E402

try:
  importlib.import_module("timm")
except ImportError:
  pass

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# Sets TensorFlow's environment (quiet logging, oneDNN off) before any test module imports
# TensorFlow; the CLI subprocesses the tests start inherit it.
importlib.import_module("mae_jax")


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """One prepared copy of the embedded digits dataset for the whole session."""
  return str(tmp_path_factory.mktemp("tfds"))


# ----------------------------------------------------------------------------- shared helpers
# Imported by test modules (`from conftest import small_config`): the tests directory is on
# sys.path under pytest's default import mode.

# A model small enough for seconds per run: 16 px images, 4 px patches, 16 patches.
SMALL = ["--config.image_size=16", "--config.batch_size=32", "--config.model.decoder_width=32",
         "--config.model.decoder_depth=1", "--config.log_every_steps=2"]


def override(c, overrides: dict):
  """Sets dotted keys ('model.decoder_width') of config `c`; returns it."""
  for k, v in overrides.items():
    target = c
    *path, leaf = k.split(".")
    for p in path:
      target = target[p]
    target[leaf] = v
  return c


def small_config(data_dir, **overrides):
  """configs/mae.py's demo at 16 px, batch 32, 4 steps, logs and checkpoints every 2."""
  from configs import mae as mae_config
  c = mae_config.get_config("tiny")
  c.image_size = 16
  c.batch_size = 32
  c.total_steps = 4
  c.warmup_epochs = 0.1
  c.model.decoder_width = 32
  c.model.decoder_depth = 1
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.dataset.data_dir = data_dir
  return override(c, overrides)


def task_config(kind, init_from, data_dir, **overrides):
  """configs/finetune.py or configs/linprobe.py (digits) for 3 steps of 32, evaluated at the end."""
  from configs import finetune as finetune_config
  from configs import linprobe as linprobe_config
  c = (finetune_config if kind == "finetune" else linprobe_config).get_config("digits")
  c.init_from = init_from
  c.dataset.data_dir = data_dir
  c.batch_size = 32
  c.total_steps = 3
  c.warmup_epochs = 0.0
  c.evals.classification.every_steps = 3
  c.evals.classification.batch_size = 64
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  return override(c, overrides)


def flat(tree) -> dict:
  """{'a/b/c': numpy array} of a nested dict of arrays."""
  import numpy as np
  from flax import traverse_util
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def snapshot(directory) -> dict:
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, directory)] = fh.read()
  return out


def run_cli(*args, env_extra=None, cwd=REPO, module="mae_jax.main"):
  """`python -m mae_jax.main ARGS` (or `module`) in a subprocess: CompletedProcess with text."""
  import subprocess
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)
