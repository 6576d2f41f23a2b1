r"""Train-step benchmark: speed, compile time, FLOP/s against a measured peak, memory.

Synthetic images, uint8 pixels as the input pipeline feeds the step (which normalizes them).

The step is exactly the training step of `mae_jax.train` (masking, model, loss, gradients, AdamW
update) jitted over all local devices. FLOPs per step come from XLA's cost analysis of the
step over the global batch (`step_flops`); the peak is a large matmul of the same dtype timed in
the same process, so the ratio says how well the step uses what this machine can actually do. Compile time is timed
after the initial state is ready and split into tracing (Python to StableHLO) and XLA's
compilation. Memory and speed options are config keys (`compute.dtype`, `.remat`, `.scan`,
`.fsdp`, `.attention`); every row names the ones it ran with.
"""

from __future__ import annotations

import time
from typing import Optional


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
  """FLOPs of XLA's cost analysis of a compiled (or lowered) step."""
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


def xla_memory(compiled) -> float:
  """Bytes XLA plans for one step on one device: arguments + outputs (less what is aliased by
  donation) + temporaries. Comparable across backends and options (remat, dtype, FSDP)."""
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
               m.temp_size_in_bytes)


def step_flops(config, mesh, plan, lowered, batch) -> float:
  """FLOPs of one step over the whole global batch, from XLA's cost analysis of the step as
  traced (before it is partitioned over devices, where the count would be per device). XLA's
  analysis counts a loop body once and cannot see inside a custom call, so when the step loops
  (scan over blocks, blocked attention) or calls cuDNN's attention, the count is taken from the
  same step traced with unrolled blocks and XLA's attention: lowered and analysed, not compiled.
  Recomputation that remat adds is counted; blocked attention's own recomputation is not."""
  import jax

  from mae_jax import train
  from mae_jax.methods import get_method

  compute = config.get("compute")
  if compute is None or (not compute.scan and compute.attention == "xla"):
    return cost_flops(lowered)
  counted = config.copy_and_resolve_references()
  with counted.unlocked():
    counted.compute.scan = False
    counted.compute.attention = "xla"
  update = train.build_update(counted, mesh, plan, get_method(counted, plan.total_steps))
  abstract = jax.eval_shape(update.init_state, jax.random.PRNGKey(0))
  return cost_flops(update.step.lower(abstract, batch))


def device_label() -> str:
  """'2x cpu (cpu)': how many devices the step runs on, of which kind and platform."""
  import jax
  device = jax.devices()[0]
  return f"{len(jax.devices())}x {device.device_kind} ({device.platform})"


def compute_label(config) -> str:
  """'bfloat16 remat scan fsdp'-style summary of config.compute ('float32' when all off)."""
  c = config.get("compute")
  if c is None:
    return "float32"
  return " ".join([c.dtype] + [k for k in ("remat", "scan", "fsdp") if c[k]])


def run_bench(config, steps: int, warmup: int, matmul_size: int,
              compile_only: bool = False, keep: Optional[dict] = None) -> dict:
  """The step's figures (see the module docstring); `keep` (a dict) receives the compiled step
  and the state and batch after the timed steps, for a profile of one more."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mae_jax import configlib, train
  from mae_jax.methods import get_method

  mesh = train.make_mesh(jax.devices())
  configlib.validate_common(config, mesh.devices.size)
  plan = train.Plan(steps_per_epoch=1000, total_steps=100_000, warmup_steps=1000,
                    peak_lr=1e-4)
  update = train.build_update(config, mesh, plan, get_method(config, plan.total_steps))
  state = jax.jit(update.init_state, out_shardings=update.shardings)(jax.random.PRNGKey(0))
  # uint8 pixels, as the pretraining input feeds the step (which normalizes them).
  shape = (config.batch_size, *configlib.image_hw(config.image_size), 3)
  images = jax.device_put(jax.random.randint(jax.random.PRNGKey(1), shape, 0, 256, jnp.int32)
                          .astype(jnp.uint8), NamedSharding(mesh, P("data")))
  batch = {"image": images}
  # Dispatch is asynchronous: without this wait the initialization (for ViT-L, seconds of random
  # numbers) would run on the same cores while the step compiles, and count as compile time.
  jax.block_until_ready((state, batch))

  # Compile time in two parts: tracing the step to StableHLO (Python; grows with the number of
  # blocks traced) and XLA's compilation of it (HLO passes and code generation).
  t0 = time.perf_counter()
  lowered = update.step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  flops = step_flops(config, mesh, plan, lowered, batch)
  result = {
      "config": config.model.variant if "model" in config else config.method,
      "method": config.method,
      "compute": compute_label(config),
      "device": device_label(),
      "batch_size": config.batch_size,
      "image_size": config.image_size,
      "compile_s": t2 - t0,
      "trace_s": t1 - t0,
      "xla_compile_s": t2 - t1,
      "flops_per_step": flops,
      "xla_memory_bytes": xla_memory(compiled),
  }
  if compile_only:
    return result

  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / steps

  memory = peak_memory()  # before the peak matmul, whose buffers are not the step's.
  # The peak in the dtype the matmuls run in (bfloat16 compute: a bfloat16 peak).
  c = config.get("compute")
  matmul_dtype = jnp.dtype(c.dtype) if c is not None else jnp.float32
  peak = measure_matmul_peak(matmul_size, matmul_dtype)
  achieved = flops / step_s
  if keep is not None:
    keep.update(compiled=compiled, state=state, batch=batch)
  return {
      **result,
      "img_per_s": config.batch_size / step_s,
      "step_s": step_s,
      "achieved_flops_per_s": achieved,
      "peak_flops_per_s": peak,
      "peak_ratio": achieved / peak,
      "peak_memory_bytes": memory[0],
      "peak_memory_kind": memory[1],
      "dtype": str(matmul_dtype),
      "loss": float(metrics["loss"]),
  }


def format_table(r: dict) -> str:
  if "error" in r:
    return f"{r['method']} {r['config']} {r['compute']} batch {r['batch_size']}: {r['error']}"
  rows = [
      ("method / model", f"{r['method']} {r['config']}"),
      ("device", r["device"]),
      ("compute", r["compute"]),
      ("batch x image", f"{r['batch_size']} x {r['image_size']}px"),
      ("compile time", f"{r['compile_s']:.1f} s (trace {r['trace_s']:.1f} s + XLA "
                       f"{r['xla_compile_s']:.1f} s)"),
      ("FLOPs/step (XLA)", f"{r['flops_per_step'] / 1e9:.1f} GFLOP"),
      ("XLA memory plan", f"{r['xla_memory_bytes'] / 2**30:.2f} GiB per device"),
  ]
  if "step_s" in r:
    rows[4:4] = [("images/s", f"{r['img_per_s']:.1f}"),
                 ("step time", f"{r['step_s'] * 1e3:.1f} ms")]
    rows += [
        ("achieved", f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s"),
        ("matmul peak", f"{r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({r['dtype']})"),
        ("achieved / peak", f"{r['peak_ratio']:.2f}"),
        ("peak memory", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})"),
    ]
  if "peer_img_per_s" in r:
    rows += [
        ("PyTorch peer", f"{r['peer']} on {r['peer_device']}"),
        ("peer images/s", f"{r['peer_img_per_s']:.2f} (its matmul peak "
                          f"{r['peer_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)"),
        ("ours / peer", f"{r['ratio_to_peer']:.3f}"),
    ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def markdown_row(r: dict) -> str:
  """One BENCHMARKS.md row: model | compute | batch | img/s | step | compile | GFLOP/step |
  achieved / peak | XLA memory plan | peak memory."""
  if "error" in r:
    return (f"| {r['method']} {r['config']} | {r['compute']} | {r['batch_size']} | "
            f"{r['error']} | | | | | | |")
  if "step_s" not in r:
    return (f"| {r['method']} {r['config']} | {r['compute']} | {r['batch_size']} | | | "
            f"{r['compile_s']:.1f} s | {r['flops_per_step'] / 1e9:.1f} | | "
            f"{r['xla_memory_bytes'] / 2**30:.2f} GiB | |")
  return (f"| {r['method']} {r['config']} | {r['compute']} | {r['batch_size']} | "
          f"{r['img_per_s']:.1f} | {r['step_s'] * 1e3:.0f} ms | {r['compile_s']:.1f} s | "
          f"{r['flops_per_step'] / 1e9:.1f} | {r['peak_ratio']:.2f} of "
          f"{r['peak_flops_per_s'] / 1e12:.3g} TFLOP/s ({r['dtype']}) | "
          f"{r['xla_memory_bytes'] / 2**30:.2f} GiB | "
          f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']}) |")


def out_of_memory(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def sweep(config, batches: list[int], steps: int, warmup: int, matmul_size: int,
          compile_only: bool = False) -> list[dict]:
  """`run_bench` at each global batch; past the first, a batch that does not fit in memory is
  a row saying so and the sweep goes on."""
  results = []
  for batch in batches:
    with config.unlocked():
      config.batch_size = batch
    try:
      results.append(run_bench(config, steps, warmup, matmul_size, compile_only=compile_only))
    except Exception as e:  # pylint: disable=broad-except
      if len(batches) == 1 or not out_of_memory(e):
        raise
      results.append({"method": config.method, "config": config.model.variant,
                      "compute": compute_label(config), "batch_size": batch,
                      "error": "out of memory"})
  return results
