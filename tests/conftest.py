"""Test setup: 8 emulated CPU devices for the whole session, quiet TensorFlow.

Set before JAX is imported anywhere, so `jax.devices()` has 8 CPU devices; single-device runs use a
mesh over `jax.devices()[:1]`.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """One prepared copy of the embedded digits dataset for the whole session."""
  return str(tmp_path_factory.mktemp("tfds"))
