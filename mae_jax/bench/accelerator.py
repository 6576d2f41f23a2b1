"""The accelerator report: what one accelerator does with the MAE recipes, as a markdown block.

  python -m mae_jax.bench --report=accelerator          # launch/gpu_check.sh runs this
  python -m mae_jax.bench --report=accelerator --dry    # the same sequence on a tiny model (CPU)

Measured on the first local device, with each recipe's own config (`configs/mae.py:vit_b16`,
`:vit_l16`: bfloat16 activations, float32 parameters and optimizer state):
  1. the bfloat16 matmul peak (best of 5 n x n x n products);
  2. for ViT-B/16 and ViT-L/16, img/s, step time and MFU (XLA's FLOPs of the step / step time /
     the peak) at each batch size of the plan; a batch that does not fit is a row saying so;
  3. compile time of the ViT-L/16 step unrolled and with `compute.scan` (compile only);
  4. XLA's memory plan of the ViT-L/16 step at the largest batch with and without
     `compute.remat` (compile only).
The plan (batch sizes) is sized for about 6 minutes on one H100 or H200; `--dry` swaps in the
4-block demo model at 32 px and a batch of 8 for both models (the second compile of the same
step is a persistent-cache hit where JAX has one), on whatever device JAX has.
"""

from __future__ import annotations

import time

# (config, batch sizes for img/s and MFU); the last batch of ViT-L/16 is the memory comparison's.
PLAN = (("mae:vit_b16", (128, 256, 512)), ("mae:vit_l16", (64, 128, 256)))
DRY_PLAN = (("mae:tiny", (8,)), ("mae:tiny", (8,)))


def _config(name: str, dry: bool, batch_size: int = 0, **compute):
  from mae_jax import config_files
  config = config_files.load(name)
  with config.unlocked():
    if dry:  # the demo model, in the recipes' dtype, on a few images.
      config.compute.dtype = "bfloat16"
      config.model.decoder_depth = 1
    config.compute.update(compute)
    config.batch_size = batch_size or config.batch_size
  return config


def run_report(dry: bool = False, steps: int = 10, warmup: int = 2,
               matmul_size: int = 8192) -> str:
  import jax
  import jax.numpy as jnp

  from mae_jax.bench import step

  t_start = time.perf_counter()
  plan = DRY_PLAN if dry else PLAN
  if dry:
    steps, warmup, matmul_size = min(steps, 2), min(warmup, 1), 256
  device = jax.devices()[0]
  device_name = f"{device.device_kind} ({device.platform}, {len(jax.devices())} device(s))"
  peak = step.measure_matmul_peak(matmul_size, jnp.bfloat16)
  rows = []
  for name, batches in plan:
    for r in step.sweep(_config(name, dry), list(batches), steps, warmup, matmul_size):
      r["mfu"] = (r["achieved_flops_per_s"] / peak) if "step_s" in r else None
      rows.append(r)
  # ViT-L/16 unrolled at its first batch and without remat at its last were compiled by the
  # sweep; only scan and remat compile again.
  big_name, big_batches = plan[-1]
  big_rows = rows[-len(big_batches):]
  compile_rows = [big_rows[0], step.run_bench(_config(big_name, dry, big_batches[0], scan=True),
                                              1, 0, matmul_size, compile_only=True)]
  memory_rows = [big_rows[-1]]
  try:
    memory_rows.append(step.run_bench(_config(big_name, dry, big_batches[-1], remat=True), 1, 0,
                                      matmul_size, compile_only=True))
  except Exception as e:  # pylint: disable=broad-except
    if not step.out_of_memory(e):
      raise
    memory_rows.append({"compute": "bfloat16 remat", "error": "does not compile: out of memory"})
  return format_report(device_name, peak, rows, compile_rows, memory_rows,
                       time.perf_counter() - t_start, dry)


def format_report(device_name: str, peak: float, rows, compile_rows, memory_rows,
                  seconds: float, dry: bool) -> str:
  command = "python -m mae_jax.bench --report=accelerator" + (" --dry" if dry else "")
  out = [f"#### {device_name}{' (dry run: tiny model)' if dry else ''}", "",
         f"Command: `{command}` (launch/gpu_check.sh); {seconds / 60:.1f} min in all. "
         f"Measured bfloat16 matmul peak: {peak / 1e12:.1f} TFLOP/s.", "",
         "| model | compute | batch | img/s | step | MFU | compile | XLA memory plan |",
         "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['config']} | {r['compute']} | {r['batch_size']} | {r['error']} "
                 "| | | | |")
      continue
    out.append(f"| {r['config']} | {r['compute']} | {r['batch_size']} | {r['img_per_s']:.1f} "
               f"| {r['step_s'] * 1e3:.1f} ms | {r['mfu']:.1%} | {r['compile_s']:.1f} s "
               f"| {r['xla_memory_bytes'] / 2**30:.2f} GiB |")
  out += ["", "| compile only | compute | batch | compile (trace + XLA) | XLA memory plan |",
          "|---|---|---|---|---|"]
  for r in compile_rows + memory_rows:
    if "error" in r:
      out.append(f"| | {r['compute']} | | {r['error']} | |")
      continue
    out.append(f"| {r['config']} | {r['compute']} | {r['batch_size']} | {r['compile_s']:.1f} s "
               f"({r['trace_s']:.1f} + {r['xla_compile_s']:.1f}) | "
               f"{r['xla_memory_bytes'] / 2**30:.2f} GiB |")
  return "\n".join(out)
