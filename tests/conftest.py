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
