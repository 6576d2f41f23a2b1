"""The training loop on real images against the step alone, in one run.

The step alone is `step.run_bench` (a synthetic batch already on the devices). The loop is
`tasks.pretrain` in a temporary workdir reading the images through the training input (decode,
crop, resize, flip, batch), copying them to the devices, logging metrics and writing checkpoints
on the config's schedule (evaluators off). It runs 2 x `steps` steps and logs every `steps`: the
first interval warms the input pipeline up, the second is timed (the loop's own clock, which
starts after compilation). The ratio loop / step is the share of the step's speed the whole loop
keeps.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile

import ml_collections

from mae_jax.errors import UserError


def run_loop_bench(config, spec: str, steps: int, warmup: int, matmul_size: int, photos: int,
                   photos_dir: str) -> dict:
  from mae_jax import tasks
  from mae_jax.bench import input as input_bench
  from mae_jax.bench import step

  if config.get("task", "pretrain") != "pretrain":
    raise UserError("--loop times a pretraining config")
  kind, arg, folder = input_bench.resolve_input(spec, photos, photos_dir, "--loop")
  alone = step.run_bench(config.copy_and_resolve_references(), steps, warmup, matmul_size)
  looped = config.copy_and_resolve_references()
  input_bench.point_dataset(looped.dataset, kind, arg, folder, photos_dir)
  with looped.unlocked():
    looped.total_steps = 2 * steps
    looped.log_every_steps = steps
    looped.evals = ml_collections.ConfigDict()  # evaluators are not the loop's own cost.
    looped.best_metric = ""
  workdir = tempfile.mkdtemp(prefix="mae_jax_loop_bench_")
  try:
    with contextlib.redirect_stdout(io.StringIO()) as printed:
      out = tasks.pretrain(looped, os.path.join(workdir, "run"))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  timed = [h for h in out["history"] if "img_per_s" in h][-1]
  warning = [line for line in printed.getvalue().splitlines() if "input-bound" in line]
  return {
      "config": config.model.variant, "method": config.method,
      "compute": step.compute_label(config), "batch_size": config.batch_size,
      "image_size": config.image_size, "input": spec, "dataset": looped.dataset.name,
      "device": step.device_label(),
      "steps": steps, "step_img_per_s": alone["img_per_s"],
      "loop_img_per_s": timed["img_per_s"], "ratio": timed["img_per_s"] / alone["img_per_s"],
      "input_wait_s": timed["input_wait_s"],
      "input_wait_share": timed["input_wait_s"] * timed["img_per_s"] / config.batch_size,
      "input_bound_warning": bool(warning), "loss": timed["loss"],
  }


def format_loop_table(r: dict) -> str:
  return "\n".join([
      f"loop {r['method']} {r['config']} ({r['compute']}), batch {r['batch_size']} x "
      f"{r['image_size']} px, input {r['input']} ({r['dataset']}), {r['device']}",
      f"  step alone   {r['step_img_per_s']:9.2f} img/s (synthetic batch on the devices)",
      f"  whole loop   {r['loop_img_per_s']:9.2f} img/s ({r['steps']} steps after "
      f"{r['steps']} warm-up steps)",
      f"  ratio        {r['ratio']:9.3f}",
      f"  input wait   {r['input_wait_s']:9.3f} s per step ({r['input_wait_share']:.1%} of the "
      f"loop's time)"])
