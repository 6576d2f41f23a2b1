"""Shared config pieces and validation.

Every `configs/<method>.py` starts from `base_config()` and adds its method's keys, so the
keys of the shared loop (data, optimizer, schedule, checkpoints, logging) are spelled the same
everywhere. Configs are locked: `--config.some_typo=1` is an error, not a silent no-op.
"""

from __future__ import annotations

import ml_collections

from mae_jax.errors import UserError

# ImageNet statistics, as in the official MAE/timm pipelines.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# config.masking values: mae_jax.masking.draw_mask implements each.
MASKINGS = ("random", "block")


def dataset_config(name: str = "mae_jax_digits") -> ml_collections.ConfigDict:
  """Where images come from and how they are augmented for pretraining."""
  d = ml_collections.ConfigDict()
  # A tensorflow-datasets name (e.g. 'imagenet2012'), 'mae_jax_digits' (the embedded
  # default, prepared from scikit-learn's bundled digits), or 'folder' (see `folder`).
  d.name = name
  d.data_dir = ""  # tfds data_dir; '' = tfds default. gs:// works.
  d.folder = ""  # with name='folder': a folder of images, flat or one sub-folder per class.
  d.val_fraction = 0.1  # folder without train/ and val/ sub-folders: every k-th file held out.
  d.train_split = "train"
  d.eval_split = "validation"
  d.shuffle_buffer = 10_000
  d.crop_min_scale = 0.2  # RandomResizedCrop(scale=(crop_min_scale, 1)), bicubic.
  d.hflip = True
  d.mean = IMAGENET_MEAN
  d.std = IMAGENET_STD
  d.prefetch = 2  # host batches prepared ahead of the train step.
  return d


def base_config() -> ml_collections.ConfigDict:
  """Keys shared by every pretraining method."""
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.method = ""  # module name under mae_jax/methods.
  c.seed = 0
  c.image_size = 224
  c.dataset = dataset_config()
  # Which patches a masking method hides: 'random' (MAE's uniform argsort of noise) or 'block'
  # (BEiT's block-wise masking, exact count). Methods without a patch mask ignore it.
  c.masking = "random"

  # Batch and schedule. batch_size is the GLOBAL batch of one optimizer update;
  # grad_accum_steps splits it into that many micro-batches inside the jitted step.
  c.batch_size = 4096
  c.grad_accum_steps = 1
  c.num_epochs = 800.0
  c.total_steps = 0  # > 0 overrides num_epochs (handy for smoke tests and benchmarks).
  c.warmup_epochs = 40.0

  # AdamW with lr = base_lr * batch_size / 256, as in the official MAE.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.base_lr = 1.5e-4
  c.optimizer.min_lr = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip_norm = 0.0  # 0 = no clipping (official MAE pretraining clips nothing).

  # Checkpoints (Orbax, async) under WORKDIR/checkpoints.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3

  # Logging: progress line + TensorBoard + WORKDIR/metrics.jsonl.
  c.log_every_steps = 50

  # Evaluators run during training (mae_jax.evaluators): config.evals.<name> = dict(type=...,
  # every_steps=...); results logged as '<name>/<metric>'. Pretraining configs carry a k-NN
  # and a held-out-loss evaluator, off until every_steps > 0.
  c.evals = pretraining_evals()
  # '<eval>/<metric>' whose highest value keeps WORKDIR/best ('' = no best checkpoint).
  c.best_metric = ""
  c.compute = compute_config()
  return c


# config.compute.dtype values.
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_config() -> ml_collections.ConfigDict:
  """Memory and speed options; none changes the result beyond float rounding.

  dtype   activations and matmuls in this dtype; parameters, optimizer state and the loss stay
          float32 (a bfloat16 copy of the parameters is made inside the step).
  remat   recompute each transformer block's activations in the backward pass (less memory).
  scan    run the transformer blocks as one lax.scan: compile time flat in depth. The training
          state then holds the blocks stacked (one 'blocks' subtree with a leading depth axis);
          readers of checkpoints (mae_jax.workdir) give back the per-block layout.
  fsdp    shard parameters and optimizer state over the data axis (each array on its largest
          axis divisible by the device count; arrays under 2**16 elements stay replicated).
  """
  m = ml_collections.ConfigDict()
  m.dtype = "float32"
  m.remat = False
  m.scan = False
  m.fsdp = False
  return m


def pretraining_evals(knn_every: int = 0, heldout_every: int = 0) -> ml_collections.ConfigDict:
  """config.evals of a pretraining run.

  knn      k-NN top-1 (cosine, temperature-weighted vote over the train split's features,
           scored on dataset.eval_split); pool '' = the method's default; batch_size 0 =
           config.batch_size.
  heldout  the method's loss without training noise on the first `batches` batches (0 = every
           full batch) of dataset.eval_split with the same masks every time, and `num_images`
           validation images with their reconstructions in TensorBoard (methods that predict
           pixels).
  """
  return ml_collections.ConfigDict({
      "knn": dict(type="knn", every_steps=knn_every, k=20, temperature=0.07, pool="",
                  batch_size=0),
      "heldout": dict(type="heldout", every_steps=heldout_every, batches=0, num_images=8),
  })


def classification_evals(batch_size: int = 256) -> ml_collections.ConfigDict:
  """config.evals of fine-tuning and linear probing: top-1 / top-5 on dataset.eval_split every
  epoch and at the end (set every_steps to evaluate every N steps instead)."""
  return ml_collections.ConfigDict({
      "classification": dict(type="classification", every_steps=0, every_epochs=1.0,
                             batch_size=batch_size)})


# Keys that moved to config.evals: old name -> where it is now.
MOVED_KEYS = {
    "knn.every_steps": "config.evals.knn.every_steps (with k, temperature, pool, batch_size)",
    "monitor": "config.evals.heldout (every_steps, batches, num_images)",
    "eval_every_steps": "config.evals.classification.every_steps (or every_epochs)",
    "classifier.eval_batch_size": "config.evals.classification.batch_size",
}


def moved_key_message(key: str) -> str | None:
  """The one-line error for a key of MOVED_KEYS (or below one), None for other keys."""
  for old, new in MOVED_KEYS.items():
    if key == old or key.startswith(old + "."):
      return f"config.{key} has moved to {new}"
  return None


def check_legacy_keys(c: ml_collections.ConfigDict) -> None:
  """UserError naming the new key when a config (e.g. a user's own file) still sets one that
  moved to config.evals."""
  for old in MOVED_KEYS:
    node, parts = c, old.split(".")
    for part in parts:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        break
      node = node[part]
    else:
      raise UserError(moved_key_message(old))


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.lock()
  return config


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise UserError(msg)


def validate_common(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks the shared keys; raises UserError with one line naming the problem."""
  _check(c.image_size > 0, f"config.image_size must be positive, got {c.image_size}")
  _check(c.batch_size > 0, f"config.batch_size must be positive, got {c.batch_size}")
  _check(c.grad_accum_steps >= 1,
         f"config.grad_accum_steps must be >= 1, got {c.grad_accum_steps}")
  _check(c.batch_size % c.grad_accum_steps == 0,
         f"config.batch_size={c.batch_size} is not divisible by "
         f"config.grad_accum_steps={c.grad_accum_steps}")
  if num_devices is not None:
    micro = c.batch_size // c.grad_accum_steps
    _check(micro % num_devices == 0,
           f"global batch per micro-step ({micro} = config.batch_size / "
           f"config.grad_accum_steps) is not divisible by the {num_devices} devices")
  if "compute" in c:
    _check(c.compute.dtype in COMPUTE_DTYPES,
           f"config.compute.dtype must be one of {COMPUTE_DTYPES}, got {c.compute.dtype!r}")
  _check(c.get("masking", "random") in MASKINGS,
         f"config.masking must be one of {MASKINGS}, got {c.get('masking')!r}")
  _check(c.num_epochs > 0 or c.total_steps > 0,
         "config.num_epochs or config.total_steps must be positive")
  _check(c.warmup_epochs >= 0, f"config.warmup_epochs must be >= 0, got {c.warmup_epochs}")
  _check(c.optimizer.base_lr > 0, f"config.optimizer.base_lr must be positive, got "
         f"{c.optimizer.base_lr}")
  _check(0 <= c.optimizer.b1 < 1 and 0 <= c.optimizer.b2 < 1,
         "config.optimizer.b1 and b2 must be in [0, 1)")
  _check(c.optimizer.weight_decay >= 0, "config.optimizer.weight_decay must be >= 0")
  _check(c.checkpoint_every_steps > 0, "config.checkpoint_every_steps must be positive")
  _check(c.keep_checkpoints > 0, "config.keep_checkpoints must be positive")
  _check(c.log_every_steps > 0, "config.log_every_steps must be positive")
  d = c.dataset
  _check(0 < d.crop_min_scale <= 1,
         f"config.dataset.crop_min_scale must be in (0, 1], got {d.crop_min_scale}")
  _check(len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
         "config.dataset.mean and std must have 3 entries, std positive")
  _check(0 <= d.val_fraction < 1,
         f"config.dataset.val_fraction must be in [0, 1), got {d.val_fraction}")
  if d.name == "folder":
    _check(bool(d.folder), "config.dataset.name='folder' needs config.dataset.folder=PATH")
