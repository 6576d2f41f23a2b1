r"""`python -m mae_jax.bench`: speed figures, each against a measured reference in the same run.

  # The train step on synthetic images (img/s, compile, FLOP/s against the matmul peak, memory):
  python -m mae_jax.bench --config=mae:vit_s16 [--batch_size=N] [--steps=N]
  python -m mae_jax.bench --config=mae:vit_b16 --batch_sizes=8,16,32,64      # a sweep
  python -m mae_jax.bench --config=mae:vit_l16 --compile_only --config.compute.scan=True
  # ... and the same step of the PyTorch MAE model, in a subprocess of the same run:
  python -m mae_jax.bench --config=mae:vit_s16 --batch_size=32 --config.compute.dtype=float32 \
      --peer=official:/path/to/facebookresearch/mae      # or --peer=hf (transformers' ViTMAE)
  # The training input alone, against torchvision's (the official MAE input) on the same files:
  python -m mae_jax.bench --config=mae:vit_b16 --input=photos --batch_size=128
  python -m mae_jax.bench --input=folder:DIR | --input=tfds:NAME | --input=photos_tfds
  # The training loop on real images against the step alone:
  python -m mae_jax.bench --config=mae:vit_s16 --batch_size=32 --config.compute.dtype=float32 \
      --loop=photos
  # Where one step's time goes, by kernel and model part (CPU; a jax.profiler trace in DIR);
  # --profile_by=op: by operation, forward and backward:
  python -m mae_jax.bench --config=mae:vit_s16 --batch_size=32 --config.compute.dtype=float32 \
      --profile=DIR [--profile_by=op]
  # The accelerator report (launch/gpu_check.sh), or its CPU rehearsal on a tiny model:
  python -m mae_jax.bench --report=accelerator [--dry]

Memory and speed options are config keys (`--config.compute.dtype=bfloat16`, `.remat`, `.scan`,
`.fsdp`, `.attention`); every row names the ones it ran with. Each mode prints a table and, last,
JSON lines with the figures. Bad flags or values: one line `error: ...`, exit code 2.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from mae_jax.cli import config_value, fail, parse_flags
from mae_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Config file, e.g. configs/mae.py:vit_s16",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = the config's (128 for --input).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (batches with --input) after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_MATMUL = flags.DEFINE_integer("matmul_size", 4096, "n of the n x n x n peak matmul.")
_SWEEP = flags.DEFINE_list("batch_sizes", [], "Global batches to sweep (one row each); a batch "
                           "that does not fit in memory is reported as such and the sweep goes on.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile the step and report compile "
                                  "time, FLOPs and XLA's memory plan; run nothing.")
_PEER = flags.DEFINE_string(
    "peer", "", "The PyTorch reference timed in the same run. Step: hf (transformers' "
    "ViTMAEForPreTraining) or official:DIR (models_mae.py of a facebookresearch/mae checkout). "
    "--input: torchvision (the default) or none.")
_INPUT = flags.DEFINE_string("input", "", "Time the training input alone: photos | photos_tfds | "
                             "folder:DIR | tfds:NAME.")
_LOOP = flags.DEFINE_string("loop", "", "Time the training loop on photos | folder:DIR | "
                            "tfds:NAME against the step alone.")
_PHOTOS = flags.DEFINE_integer("photos", 2000, "How many photos --input/--loop=photos generates.")
_PHOTOS_DIR = flags.DEFINE_string("photos_dir", "/tmp/mae_jax_photos",
                                  "Where the generated photos go (reused when present).")
_WORKERS = flags.DEFINE_integer("workers", 0, "With --input: the host cores both inputs run on "
                                "(the DataLoader's workers; the process is pinned to them); "
                                "0 = all of this host's cores.")
_PROFILE = flags.DEFINE_string("profile", "", "Profile one step (CPU): write a jax.profiler "
                               "trace to this folder and print where the step's time goes.")
_PROFILE_BY = flags.DEFINE_enum("profile_by", "part", ["part", "op"], "With --profile: rows by "
                                 "model part (decoder blocks attn) or by operation, forward and "
                                 "backward (backward decoder/blocks/attn/qkv/dot_general).")
_REPORT = flags.DEFINE_enum("report", "", ["", "accelerator"], "A fixed set of measurements: "
                            "accelerator = MAE ViT-B/16 and ViT-L/16 in bfloat16.")
_DRY = flags.DEFINE_bool("dry", False, "With --report: a tiny model, for a CPU rehearsal.")


def _print(rows: list[dict], table) -> None:
  for r in rows:
    print(table(r), flush=True)
  for r in rows:
    print(json.dumps(r), flush=True)


def _run(config) -> None:
  if _REPORT.value:
    from mae_jax.bench import accelerator
    print(accelerator.run_report(dry=_DRY.value, steps=_STEPS.value, warmup=_WARMUP.value,
                                 matmul_size=_MATMUL.value), flush=True)
    return
  if _INPUT.value:
    from mae_jax.bench import input as input_bench
    peer = _PEER.value or "torchvision"
    if peer not in ("torchvision", "none"):
      raise UserError(f"--peer={peer}: with --input, torchvision or none")
    r = input_bench.run_input_bench(config, _INPUT.value, _BATCH.value or 128, _STEPS.value,
                                    _WARMUP.value, _PHOTOS.value, _PHOTOS_DIR.value,
                                    peer == "torchvision", _WORKERS.value or None)
    _print([r], input_bench.format_input_table)
    return
  from mae_jax.bench import step
  if _PROFILE.value:
    from mae_jax.bench import profile
    with config.unlocked():
      config.batch_size = _BATCH.value or config.batch_size
    r = profile.profile_step(config, _PROFILE.value, _MATMUL.value, _PROFILE_BY.value)
    _print([r], profile.format_profile)
    return
  try:
    batches = [int(b) for b in _SWEEP.value] or [_BATCH.value or config.batch_size]
  except ValueError:
    raise UserError(f"--batch_sizes must be integers, got {','.join(_SWEEP.value)}") from None
  if _LOOP.value:
    from mae_jax.bench import loop
    with config.unlocked():
      config.batch_size = batches[0]
    r = loop.run_loop_bench(config, _LOOP.value, _STEPS.value, _WARMUP.value, _MATMUL.value,
                            _PHOTOS.value, _PHOTOS_DIR.value)
    _print([r], loop.format_loop_table)
    return
  peer = None
  if _PEER.value:
    from mae_jax.bench import torch_peer
    peer = torch_peer.parse_peer(_PEER.value)
  results = step.sweep(config, batches, _STEPS.value, _WARMUP.value, _MATMUL.value,
                       _COMPILE_ONLY.value)
  if peer is not None:
    for r in results:
      if "step_s" in r:
        torch_peer.add_peer(r, config, peer, _STEPS.value, _WARMUP.value)
  _print(results, step.format_table)
  print("\n".join(step.markdown_row(r) for r in results))


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = config_value(_CONFIG, "configs/mae.py:vit_s16") if not _REPORT.value else None
  modes = [m for m in (_INPUT.value, _LOOP.value, _REPORT.value, _PROFILE.value) if m]
  if len(modes) > 1:
    fail("--input, --loop, --report and --profile are separate benchmarks: give one")
  if _PROFILE.value:  # XLA:CPU's per-kernel trace events, switched on before JAX starts.
    from mae_jax.bench.profile import TRACEME_FLAG
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TRACEME_FLAG}".strip()
  for name, flag in (("steps", _STEPS), ("batch_size", _BATCH), ("matmul_size", _MATMUL)):
    if flag.value < (1 if name == "steps" else 0):
      fail(f"--{name} must be >= {1 if name == 'steps' else 0}, got {flag.value}")
  if _WARMUP.value < 0:
    fail(f"--warmup must be >= 0, got {_WARMUP.value}")
  try:
    _run(config)
  except UserError as e:
    fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
