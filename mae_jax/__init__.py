"""mae_jax: masked image modeling in JAX/Flax."""

import os as _os

# TensorFlow is only the input pipeline. Set before any submodule can import it: keep its C++
# logging quiet (a CLI error stays one line on stderr), and leave oneDNN's custom CPU kernels off,
# so the pipeline's float results do not depend on the CPU's instruction set (TensorFlow turns
# them on, and announces it on stderr, only on some CPUs). A value set by the user wins.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"

# The Python API (mae_jax.load); it imports JAX and TensorFlow only when first used.
from mae_jax.api import Pretrained, load  # noqa: E402
