r"""Train-step benchmark on synthetic images: speed, compile time, FLOP/s against a measured peak.

  python -m mae_jax.bench --config=configs/mae.py:vit_s16 [--batch_size=N] [--steps=N]

The step is exactly the training step of `mae_jax.train` (masking, model, loss, gradients, AdamW
update) jitted over all local devices. FLOPs per step come from XLA's cost analysis of the
compiled step; the peak is a large matmul of the same dtype timed in the same process, so the
ratio says how well the step uses what this machine can actually do. Prints a table and, last,
one JSON line with the figures.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mae_jax.cli import config_value, fail, parse_flags  # noqa: E402
from mae_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mae.py:vit_s16",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = the config's.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_MATMUL = flags.DEFINE_integer("matmul_size", 4096, "n of the n x n x n peak matmul.")


def measure_matmul_peak(n: int, dtype, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` n x n @ n x n matmuls on the default devices (one each)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ("d",))
  # One independent matmul per device, so the peak covers every device the step uses.
  a = jax.device_put(jnp.ones((len(devices), n, n), dtype) / n, NamedSharding(mesh, P("d")))
  f = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 * len(devices) / best


def cost_flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation.
    analysis = analysis[0] if analysis else {}
  return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def peak_memory() -> tuple[float, str]:
  """(bytes, what): peak device memory where the backend reports it (GPU/TPU), else the
  process's peak resident set (CPU; includes the Python, JAX and TensorFlow libraries)."""
  import jax
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return float(stats["peak_bytes_in_use"]), "device peak"
  import resource
  return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def run_bench(config, steps: int, warmup: int, matmul_size: int) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mae_jax import configlib, train

  mesh = train.make_mesh(jax.devices())
  configlib.validate_common(config, mesh.devices.size)
  plan = train.Plan(steps_per_epoch=1000, total_steps=100_000, warmup_steps=1000,
                    peak_lr=1e-4)
  method, init_state, step_fn = train.build_update(config, mesh, plan)
  state = jax.jit(init_state, out_shardings=NamedSharding(mesh, P()))(jax.random.PRNGKey(0))
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  images = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32),
                          NamedSharding(mesh, P("data")))
  batch = {"image": images}

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = cost_flops(compiled)

  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / steps

  memory = peak_memory()  # before the peak matmul, whose buffers are not the step's.
  param_dtype = jax.tree.leaves(state.params)[0].dtype
  peak = measure_matmul_peak(matmul_size, param_dtype)
  achieved = flops / step_s
  device = jax.devices()[0]
  return {
      "config": config.model.variant if "model" in config else config.method,
      "method": config.method,
      "device": f"{len(jax.devices())}x {device.device_kind} ({device.platform})",
      "batch_size": config.batch_size,
      "image_size": config.image_size,
      "img_per_s": config.batch_size / step_s,
      "step_s": step_s,
      "compile_s": compile_s,
      "flops_per_step": flops,
      "achieved_flops_per_s": achieved,
      "peak_flops_per_s": peak,
      "peak_ratio": achieved / peak,
      "peak_memory_bytes": memory[0],
      "peak_memory_kind": memory[1],
      "dtype": str(param_dtype),
      "loss": float(metrics["loss"]),
  }


def format_table(r: dict) -> str:
  rows = [
      ("method / model", f"{r['method']} {r['config']}"),
      ("device", r["device"]),
      ("batch x image", f"{r['batch_size']} x {r['image_size']}px"),
      ("images/s", f"{r['img_per_s']:.1f}"),
      ("step time", f"{r['step_s'] * 1e3:.1f} ms"),
      ("compile time", f"{r['compile_s']:.1f} s"),
      ("FLOPs/step (XLA)", f"{r['flops_per_step'] / 1e9:.1f} GFLOP"),
      ("achieved", f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s"),
      ("matmul peak", f"{r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({r['dtype']})"),
      ("achieved / peak", f"{r['peak_ratio']:.2f}"),
      ("peak memory", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})"),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = config_value(_CONFIG, "configs/mae.py:vit_s16")
  if _BATCH.value:
    with config.unlocked():
      config.batch_size = _BATCH.value
  try:
    result = run_bench(config, _STEPS.value, _WARMUP.value, _MATMUL.value)
  except UserError as e:
    fail(str(e))
  print(format_table(result))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
