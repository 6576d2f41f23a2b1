"""Shared config pieces and validation.

Every `configs/<method>.py` starts from `base_config()` and adds its method's keys, so the
keys of the shared loop (data, optimizer, schedule, checkpoints, logging) are spelled the same
everywhere. Configs are locked: `--config.some_typo=1` is an error, not a silent no-op.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

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
  # Folder sources: decode every train and validation file when the source is opened (in
  # parallel, on every process) and stop with the count and the first few unreadable files.
  # Without it only file headers are checked up front, and a file that fails to decode stops
  # the stream later, named. tfds sources ignore it: their examples were encoded and checked
  # when the dataset was prepared.
  d.verify_images = False
  # Folder sources: leave unreadable files out instead of stopping, and print how many. Implies
  # the up-front decode pass of verify_images, so the file list (and the stream, a function of
  # seed and position) is fixed before training and exactly resumable. tfds sources ignore it.
  d.skip_bad_images = False
  d.train_split = "train"
  d.eval_split = "validation"
  d.shuffle_buffer = 10_000
  d.crop_min_scale = 0.2  # RandomResizedCrop(scale=(crop_min_scale, 1)), bicubic.
  d.hflip = True
  d.mean = IMAGENET_MEAN
  d.std = IMAGENET_STD
  d.prefetch = 2  # host batches prepared ahead of the train step.
  return d


def image_size_field(size) -> ml_collections.FieldReference:
  """A config.image_size field that takes an int S (S x S) or (H, W): its type is `object`, so
  a locked config accepts either, and `--config.image_size="(64,96)"` is parsed as a Python
  literal (config_flags locks a plain int field to int)."""
  return ml_collections.FieldReference(size, field_type=object)


def image_hw(size) -> tuple[int, int]:
  """config.image_size -> (H, W): an int S is (S, S); (H, W) may be a tuple or a list (a run's
  config.json holds a list). UserError for anything else."""
  if _is_int(size):
    return int(size), int(size)
  if isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(v) for v in size):
    return int(size[0]), int(size[1])
  raise UserError(f"config.image_size must be an integer or (height, width), got {size!r}")


def image_size_value(size):
  """config.image_size as a hashable value: an int S stays S, (H, W) (a tuple or a list read
  from config.json) becomes a tuple of ints. UserError for anything else."""
  h, w = image_hw(size)
  return h if _is_int(size) else (h, w)


def image_size_text(size) -> str:
  """'224' for an int S, '224x320' for (H, W): an image size in messages."""
  h, w = image_hw(size)
  return str(h) if _is_int(size) else f"{h}x{w}"


def image_grid(size, divisor: int) -> Optional[tuple[int, int]]:
  """(H / divisor, W / divisor) of config.image_size, or None unless both sides are multiples of
  `divisor`."""
  h, w = image_hw(size)
  if h % divisor or w % divisor:
    return None
  return h // divisor, w // divisor


def set_image_size(config, size) -> None:
  """config.image_size = size on any ConfigDict (one read back from config.json has a plain
  field of the stored type): afterwards the field takes an int or (H, W), as base_config's."""
  with config.unlocked(), config.ignore_type():
    config.image_size = image_size_field(size)


def wandb_config() -> ml_collections.ConfigDict:
  """Optional Weights & Biases logging (the `wandb` extra): the scalars of metrics.jsonl and the
  images of TensorBoard, from process 0, into one W&B run per workdir (its id is kept in
  WORKDIR/wandb_run_id, so a resumed run continues it); wandb's files go under WORKDIR/wandb."""
  w = ml_collections.ConfigDict()
  w.enabled = False
  w.project = "mae_jax"
  w.entity = ""  # '' = the default entity of the logged-in account.
  w.name = ""  # '' = the workdir's basename.
  w.mode = "online"  # one of WANDB_MODES; 'offline' syncs later with `wandb sync`.
  w.tags = ""  # comma-separated, e.g. 'mae,vit-b'.
  return w


def base_config() -> ml_collections.ConfigDict:
  """Keys shared by every pretraining method."""
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.method = ""  # module name under mae_jax/methods.
  c.seed = 0
  # Pixels: an int S (S x S images) or (H, W) (--config.image_size="(224,320)"); every side a
  # multiple of the model's patch size.
  c.image_size = image_size_field(224)
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
  # A step whose loss or gradients are not finite is never applied (the state stays the last
  # finite one) and never saved. 'stop': the run ends there, naming the step and the last good
  # checkpoint; 'skip': training goes on, and each log reports skipped_steps.
  c.nan_policy = "stop"

  # Logging: progress line + TensorBoard + WORKDIR/metrics.jsonl (+ W&B with wandb.enabled).
  c.log_every_steps = 50
  c.wandb = wandb_config()

  # Evaluators run during training (mae_jax.evaluators): config.evals.<name> = dict(type=...,
  # every_steps=...); results logged as '<name>/<metric>'. Pretraining configs carry a k-NN
  # and a held-out-loss evaluator, off until every_steps > 0.
  c.evals = pretraining_evals()
  # '<eval>/<metric>' whose highest value keeps WORKDIR/best ('' = no best checkpoint).
  c.best_metric = ""
  c.compute = compute_config()
  return c


def imagenet_recipe(c: ml_collections.ConfigDict) -> None:
  """What every accelerator recipe (`:vit_*`, `:base`, ...) shares: tfds imagenet2012 and
  bfloat16 activations (parameters, optimizer state and the loss stay float32). The CPU demos
  keep float32: XLA:CPU runs bfloat16 matmuls slower than float32 ones."""
  c.dataset.name = "imagenet2012"
  c.compute.dtype = "bfloat16"


# config.compute.dtype and config.compute.attention values.
COMPUTE_DTYPES = ("float32", "bfloat16")
COMPUTE_ATTENTION = ("auto", "xla", "cudnn", "blocked")


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
  attention  how softmax(q k^T / sqrt(d)) v runs: 'xla' (jax.nn.dot_product_attention),
          'cudnn' (cuDNN's fused flash attention; GPUs, bfloat16 only), 'blocked' (a few
          examples at a time, probabilities recomputed in the backward pass; the fastest on
          CPUs) or 'auto' (cudnn on GPUs in bfloat16, blocked on CPUs, else xla).
  """
  m = ml_collections.ConfigDict()
  m.dtype = "float32"
  m.remat = False
  m.scan = False
  m.fsdp = False
  m.attention = "auto"
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


# config.nan_policy values.
NAN_POLICIES = ("stop", "skip")

# Keys a resumed run may change without --allow_config_change: where things are and how often
# the run reports, never what it trains (prefixes of dotted names).
RESUME_SAFE_KEYS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "evals",
                    "best_metric", "nan_policy", "dataset.data_dir", "dataset.folder",
                    "dataset.prefetch", "dataset.verify_images", "dataset.skip_bad_images",
                    "compute.remat", "compute.attention", "wandb")


def _flatten(tree, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def training_changes(stored: dict, current: dict) -> list[str]:
  """'key: stored -> current' for each key both configs (plain dicts from config.json) have with
  different values, except RESUME_SAFE_KEYS. Keys only one side has (added or removed by a newer
  version of the code) are not changes."""
  old, new = _flatten(stored), _flatten(current)
  safe = lambda k: any(k == p or k.startswith(p + ".") for p in RESUME_SAFE_KEYS)
  return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new))
          if old[k] != new[k] and not safe(k)]


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.lock()
  return config


# --- Value checks. A rule maps a value to what is wrong with it ('must be in (0, 1)') or None;
# a table maps dotted keys to rules, so each check is one line and every message reads
# 'config.KEY PROBLEM, got VALUE'.

Rule = Callable[[Any], Optional[str]]


def _bound(token: str) -> float:
  """'0', '-inf', '2**63' -> a number."""
  sign, token = (-1, token[1:]) if token.startswith("-") else (1, token)
  if "**" in token:
    base, exp = token.split("**")
    return sign * int(base) ** int(exp)
  return sign * float(token)


def _interval(spec: str) -> Callable[[float], bool]:
  """'(0, 1]' -> the membership test of that interval (inf allowed as a bound)."""
  assert spec[0] in "([" and spec[-1] in ")]", spec
  lo, hi = (_bound(t.strip()) for t in spec[1:-1].split(","))
  lo_open, hi_open = spec[0] == "(", spec[-1] == ")"
  return lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


def _describe(spec: str) -> str:
  """'(0, inf)' -> 'positive', '[1, inf)' -> '>= 1', '(0, 1)' -> 'in (0, 1)'."""
  lo, hi = (t.strip() for t in spec[1:-1].split(","))
  if hi == "inf":
    if spec[0] == "(":
      return "positive" if lo == "0" else f"> {lo}"
    return f">= {lo}"
  return f"in {spec}"


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def number(spec: str) -> Rule:
  """A finite real number (int or float) in the interval `spec`, e.g. '(0, 1]', '[0, inf)'."""
  inside, text = _interval(spec), _describe(spec)

  def rule(v):
    if not _is_number(v) or not math.isfinite(v):
      return "must be a finite number"
    return None if inside(v) else f"must be {text}"
  return rule


def integer(spec: str) -> Rule:
  """An int (not a bool, not a float) in the interval `spec`, e.g. '[1, inf)'."""
  inside, text = _interval(spec), _describe(spec)

  def rule(v):
    if not isinstance(v, int) or isinstance(v, bool):
      return "must be an integer"
    return None if inside(v) else f"must be {text}"
  return rule


def one_of(*choices) -> Rule:
  """One of `choices` (compared with their own type: True is not 1)."""
  return lambda v: (None if any(type(v) is type(c) and v == c for c in choices)
                    else f"must be one of {choices}")


def _bool(v) -> Optional[str]:
  return None if isinstance(v, bool) else "must be True or False"


def _nonempty(v) -> Optional[str]:
  return None if isinstance(v, str) and v else "must be a non-empty string"


def _string(v) -> Optional[str]:
  return None if isinstance(v, str) else "must be a string"


BOOL: Rule = _bool
NONEMPTY: Rule = _nonempty  # a name whose meaning is checked where it is used (split, path).
STRING: Rule = _string  # any string, '' included ('' = a default named where the key is).


def image_size(allow_zero: bool = False) -> Rule:
  """config.image_size: an int >= 1 (with `allow_zero` also 0, a downstream task's 'the
  pretraining run's size'), or (H, W), two ints >= 1 (a tuple, or a list from config.json).
  Whether the sides fit a model's patch size is the method's check."""
  single = integer("[0, inf)" if allow_zero else "[1, inf)")

  def rule(v):
    if isinstance(v, (tuple, list)):
      if len(v) != 2 or not all(_is_int(x) for x in v):
        return "must be an integer or (height, width), 2 integers"
      return None if min(v) >= 1 else "must have both sides >= 1"
    if not _is_int(v):
      return "must be an integer or (height, width)"
    return single(v)
  return rule


# config.wandb.mode values (wandb.init's `mode`).
WANDB_MODES = ("online", "offline", "disabled")
# W&B refuses these in a project name, and names over 128 characters (wandb.Settings).
_WANDB_PROJECT_CHARS = "/\\#?%:"
WANDB_MISSING = "config.wandb.enabled needs the wandb package: pip install 'mae-jax[wandb]'"


def wandb_tags(spec: str) -> list[str]:
  """config.wandb.tags 'a, b' -> ['a', 'b'] ('' -> [])."""
  return [t.strip() for t in spec.split(",")] if spec.strip() else []


def _wandb_project(v) -> Optional[str]:
  if not isinstance(v, str) or not v or len(v) > 128:
    return "must be a string of 1 to 128 characters"
  bad = sorted({ch for ch in _WANDB_PROJECT_CHARS if ch in v})
  return f"must not contain {' '.join(bad)}" if bad else None


def _wandb_tags(v) -> Optional[str]:
  # W&B takes tags of 1 to 64 characters.
  if not isinstance(v, str):
    return "must be a string of comma-separated tags"
  if any(not 1 <= len(t) <= 64 for t in wandb_tags(v)):
    return "must be comma-separated tags of 1 to 64 characters each"
  return None


def import_wandb():
  """The wandb module; UserError (WANDB_MISSING) when it is not installed. Imported only for a
  config with wandb.enabled: the package is an optional extra."""
  try:
    import wandb  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(WANDB_MISSING) from None
  return wandb


def rgb(positive: bool) -> Rule:
  """Three finite numbers (R, G, B), all > 0 with `positive`."""
  def rule(v):
    ok = (isinstance(v, (tuple, list)) and len(v) == 3 and
          all(_is_number(x) and math.isfinite(x) and (x > 0 or not positive) for x in v))
    return None if ok else f"must be 3 {'positive ' if positive else ''}numbers (R, G, B)"
  return rule


def check(config, rules: Mapping[str, Rule], where: str = "config") -> None:
  """Applies each rule to its dotted key of `config`; UserError '<where>.<key> <problem>, got
  <value>' for the first that fails. Keys `config` lacks are skipped (a run's config.json may
  predate a key)."""
  for key, rule in rules.items():
    node = config
    for part in key.split("."):
      if part not in node:
        break
      node = node[part]
    else:
      problem = rule(node)
      if problem:
        raise UserError(f"{where}.{key} {problem}, got {node!r}")


def _leaves(node, prefix: str):
  for k, v in node.items():
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def check_finite(config) -> None:
  """UserError for any float value (or float in a tuple) of `config` that is NaN or infinite:
  no key takes one."""
  for key, v in _leaves(config, ""):
    values = v if isinstance(v, (tuple, list)) else (v,)
    if any(isinstance(x, float) and not math.isfinite(x) for x in values):
      raise UserError(f"config.{key} must be finite, got {v!r}")


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise UserError(msg)


# The keys of base_config() (and of the downstream tasks' init_* keys), by rule.
COMMON = {
    "seed": integer("[-2**63, 2**63)"),  # jax.random.PRNGKey takes any int64.
    "batch_size": integer("[1, inf)"),
    "grad_accum_steps": integer("[1, inf)"),
    "num_epochs": number("[0, inf)"),
    "total_steps": integer("[0, inf)"),
    "warmup_epochs": number("[0, inf)"),  # longer than the run: the schedule clamps it.
    "masking": one_of(*MASKINGS),
    "optimizer.base_lr": number("(0, inf)"),
    "optimizer.min_lr": number("[0, inf)"),
    "optimizer.b1": number("[0, 1)"),
    "optimizer.b2": number("[0, 1)"),
    "optimizer.weight_decay": number("[0, inf)"),
    "optimizer.grad_clip_norm": number("[0, inf)"),  # 0 = no clipping.
    "checkpoint_every_steps": integer("[1, inf)"),
    "keep_checkpoints": integer("[1, inf)"),
    "log_every_steps": integer("[1, inf)"),
    "nan_policy": one_of(*NAN_POLICIES),
    "compute.dtype": one_of(*COMPUTE_DTYPES),
    "compute.remat": BOOL,
    "compute.scan": BOOL,
    "compute.fsdp": BOOL,
    "compute.attention": one_of(*COMPUTE_ATTENTION),
    "dataset.name": NONEMPTY,
    "dataset.train_split": NONEMPTY,
    "dataset.eval_split": NONEMPTY,
    "dataset.val_fraction": number("[0, 1)"),
    "dataset.shuffle_buffer": integer("[1, inf)"),
    "dataset.crop_min_scale": number("(0, 1]"),
    "dataset.hflip": BOOL,
    "dataset.mean": rgb(positive=False),
    "dataset.std": rgb(positive=True),
    "dataset.prefetch": integer("[0, inf)"),
    "dataset.verify_images": BOOL,
    "dataset.skip_bad_images": BOOL,
    "init_step": integer("[0, inf)"),  # 0 = the latest checkpoint.
    "random_init": BOOL,
    "wandb.enabled": BOOL,
    "wandb.project": _wandb_project,
    "wandb.entity": STRING,  # '' = the account's default entity.
    "wandb.name": STRING,  # '' = the workdir's basename.
    "wandb.mode": one_of(*WANDB_MODES),
    "wandb.tags": _wandb_tags,
}


def validate_common(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks the shared keys; raises UserError with one line naming the problem."""
  check_finite(c)
  # Downstream tasks take 0: the pretraining run's size (resolved before training).
  check(c, {"image_size": image_size(allow_zero="init_from" in c)})
  check(c, COMMON)
  if "wandb" in c and c.wandb.enabled:
    import_wandb()  # before anything is written: a missing package is one line now.
  _check(c.batch_size % c.grad_accum_steps == 0,
         f"config.batch_size={c.batch_size} is not divisible by "
         f"config.grad_accum_steps={c.grad_accum_steps}")
  if num_devices is not None:
    micro = c.batch_size // c.grad_accum_steps
    _check(micro % num_devices == 0,
           f"global batch per micro-step ({micro} = config.batch_size / "
           f"config.grad_accum_steps) is not divisible by the {num_devices} devices")
  _check(c.num_epochs > 0 or c.total_steps > 0,
         "config.num_epochs or config.total_steps must be positive")
  from mae_jax.optim import scaled_lr  # imports JAX: config files import this module.
  # Above the peak, the cosine would climb from the peak to min_lr.
  peak = scaled_lr(c.optimizer.base_lr, c.batch_size)
  _check(c.optimizer.min_lr <= peak,
         f"config.optimizer.min_lr={c.optimizer.min_lr} is above the peak lr {peak:g} "
         "(config.optimizer.base_lr * config.batch_size / 256)")
  if c.dataset.name == "folder":
    _check(bool(c.dataset.folder), "config.dataset.name='folder' needs config.dataset.folder=PATH")
