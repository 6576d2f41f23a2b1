"""Every value of every shipped config is checked before anything runs.

For each config file (every variant): a table of (key, bad value, message fragment) checked
through `tasks.check_config`, the validation `tasks.run` starts with (no data, no model, no
file). Every key of every shipped config has a row, or a reason in UNCHECKED. Plus: the shipped
configs pass, a NaN or inf float is refused anywhere, and the CLI answers one line, exit 2,
without touching the workdir.
"""

import importlib
import math
import re

import pytest

from conftest import SMALL, run_cli, snapshot
from mae_jax import configlib, tasks
from mae_jax.errors import UserError
from mae_jax.evaluators import knn
from mae_jax.methods import get_method

VARIANTS = {
    "mae": ["tiny", *importlib.import_module("configs.mae").VARIANTS],
    "convmae": list(importlib.import_module("configs.convmae").VARIANTS),
    "simmim": list(importlib.import_module("configs.simmim").VARIANTS),
    "droppos": list(importlib.import_module("configs.droppos").VARIANTS),
    "splitmask": list(importlib.import_module("configs.splitmask").VARIANTS),
    "tinymim": ["tiny", *importlib.import_module("configs.tinymim").VARIANTS],
    "finetune": ["digits", *importlib.import_module("configs.finetune").RECIPES],
    "linprobe": ["digits", "imagenet"],
    "knn": ["digits", "imagenet"],
}
DOWNSTREAM = ("finetune", "linprobe", "knn")


def _patch(c):  # the patch size of a ViT variant ('B/16' -> 16).
  return int(c.model.variant.split("/")[1])


# Keys of every config (base_config()).
COMMON = [
    ("task", "nope", "unknown config.task 'nope'"),
    ("seed", 2**63, "config.seed must be in [-2**63, 2**63), got 9223372036854775808"),
    ("seed", 1.5, "config.seed must be an integer, got 1.5"),
    ("image_size", -16, "config.image_size must be >= "),
    ("image_size", 32.0, "config.image_size must be an integer"),
    ("batch_size", 0, "config.batch_size must be >= 1, got 0"),
    ("grad_accum_steps", 0, "config.grad_accum_steps must be >= 1, got 0"),
    ("grad_accum_steps", 3, "is not divisible by config.grad_accum_steps=3"),
    ("num_epochs", -1.0, "config.num_epochs must be >= 0, got -1.0"),
    ("num_epochs", 0.0, "config.num_epochs or config.total_steps must be positive"),
    ("total_steps", -5, "config.total_steps must be >= 0, got -5"),
    ("warmup_epochs", -0.5, "config.warmup_epochs must be >= 0, got -0.5"),
    ("masking", "grid", "config.masking must be one of ('random', 'block'), got 'grid'"),
    ("optimizer.base_lr", 0.0, "config.optimizer.base_lr must be positive, got 0.0"),
    ("optimizer.base_lr", "1e-3", "config.optimizer.base_lr must be a finite number, got '1e-3'"),
    ("optimizer.min_lr", -1e-6, "config.optimizer.min_lr must be >= 0"),
    ("optimizer.min_lr", 1e3, "config.optimizer.min_lr=1000.0 is above the peak lr"),
    ("optimizer.b1", 1.0, "config.optimizer.b1 must be in [0, 1), got 1.0"),
    ("optimizer.b2", -0.1, "config.optimizer.b2 must be in [0, 1), got -0.1"),
    ("optimizer.weight_decay", -0.05, "config.optimizer.weight_decay must be >= 0"),
    ("optimizer.grad_clip_norm", -1.0, "config.optimizer.grad_clip_norm must be >= 0"),
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps must be >= 1"),
    ("keep_checkpoints", 0, "config.keep_checkpoints must be >= 1"),
    ("log_every_steps", -1, "config.log_every_steps must be >= 1"),
    ("best_metric", "nope", "config.best_metric='nope' must be '<eval>/<metric>'"),
    ("compute.dtype", "float16", "config.compute.dtype must be one of ('float32', 'bfloat16')"),
    ("compute.remat", 1, "config.compute.remat must be True or False, got 1"),
    ("compute.scan", "yes", "config.compute.scan must be True or False, got 'yes'"),
    ("compute.fsdp", None, "config.compute.fsdp must be True or False, got None"),
    ("compute.attention", "flash",
     "config.compute.attention must be one of ('auto', 'xla', 'cudnn', 'blocked')"),
    ("dataset.name", "", "config.dataset.name must be a non-empty string, got ''"),
    ("dataset.name", "folder", "config.dataset.name='folder' needs config.dataset.folder=PATH"),
    ("dataset.train_split", "", "config.dataset.train_split must be a non-empty string"),
    ("dataset.eval_split", "", "config.dataset.eval_split must be a non-empty string"),
    ("dataset.val_fraction", 1.0, "config.dataset.val_fraction must be in [0, 1), got 1.0"),
    ("dataset.shuffle_buffer", 0, "config.dataset.shuffle_buffer must be >= 1, got 0"),
    ("dataset.crop_min_scale", 0.0, "config.dataset.crop_min_scale must be in (0, 1], got 0.0"),
    ("dataset.crop_min_scale", 1.5, "config.dataset.crop_min_scale must be in (0, 1]"),
    ("dataset.hflip", "no", "config.dataset.hflip must be True or False, got 'no'"),
    ("dataset.mean", (0.5, 0.5), "config.dataset.mean must be 3 numbers (R, G, B)"),
    ("dataset.std", (0.2, 0.0, 0.2), "config.dataset.std must be 3 positive numbers (R, G, B)"),
    ("dataset.prefetch", -1, "config.dataset.prefetch must be >= 0, got -1"),
    ("dataset.verify_images", 1, "config.dataset.verify_images must be True or False, got 1"),
    ("dataset.skip_bad_images", "no", "config.dataset.skip_bad_images must be True or False"),
    ("nan_policy", "ignore", "config.nan_policy must be one of ('stop', 'skip'), got 'ignore'"),
    ("wandb.enabled", "yes", "config.wandb.enabled must be True or False"),
    ("wandb.project", "a/b", "config.wandb.project must not contain /"),
    ("wandb.entity", 3, "config.wandb.entity must be a string"),
    ("wandb.name", None, "config.wandb.name must be a string"),
    ("wandb.mode", "sync", "config.wandb.mode must be one of ('online', 'offline', 'disabled')"),
    ("wandb.tags", "a,,b", "config.wandb.tags must be comma-separated tags of 1 to 64"),
]

# Keys of every pretraining config: config.method and config.evals (configlib.pretraining_evals).
PRETRAINING = [
    ("method", "nope", "unknown method 'nope'"),
    ("evals.knn.type", "nope", "config.evals.knn: unknown type 'nope'"),
    ("evals.knn.every_steps", -1, "config.evals.knn.every_steps must be >= 0, got -1"),
    ("evals.knn.every_steps", 2.5, "config.evals.knn.every_steps must be an integer, got 2.5"),
    ("evals.knn.k", 0, "config.evals.knn.k must be >= 1, got 0"),
    ("evals.knn.temperature", 0.0, "config.evals.knn.temperature must be positive, got 0.0"),
    ("evals.knn.pool", "max", "config.evals.knn.pool must be one of ('', 'cls', 'avg')"),
    ("evals.knn.batch_size", -1, "config.evals.knn.batch_size must be >= 0"),
    ("evals.heldout.type", "", "config.evals.heldout needs type=NAME"),
    ("evals.heldout.every_steps", -10, "config.evals.heldout.every_steps must be >= 0"),
    ("evals.heldout.batches", -1, "config.evals.heldout.batches must be >= 0, got -1"),
    ("evals.heldout.num_images", -8, "config.evals.heldout.num_images must be >= 0, got -8"),
]
# Keys of configs/finetune.py and configs/linprobe.py both.
CLASSIFIER = [
    ("init_step", -1, "config.init_step must be >= 0, got -1"),
    ("random_init", "yes", "config.random_init must be True or False, got 'yes'"),
    ("classifier.pool", "max", "config.classifier.pool must be one of ('', 'avg', 'cls')"),
    ("classifier.head_init_std", -0.01, "config.classifier.head_init_std must be >= 0"),
    ("evals.classification.type", "classify", "no mae_jax/evaluators/classify.py"),
    ("evals.classification.every_steps", -1, "config.evals.classification.every_steps must be"),
    ("evals.classification.every_epochs", -1.0, "config.evals.classification.every_epochs must"),
    ("evals.classification.batch_size", 0, "config.evals.classification.batch_size must be >= 1"),
]
MAE_MODEL = [  # MAE's encoder and decoder keys, shared by ConvMAE.
    ("mask_ratio", 1.5, "config.mask_ratio must be in (0, 1), got 1.5"),
    ("mask_ratio", 0.0, "config.mask_ratio must be in (0, 1), got 0.0"),
    ("mask_ratio", 0.9999, "at least one must be kept and one masked"),  # keeps int(L * 1e-4) = 0
    ("norm_pix_loss", 1, "config.norm_pix_loss must be True or False, got 1"),
    ("model.drop_path_rate", 1.0, "config.model.drop_path_rate must be in [0, 1), got 1.0"),
    ("model.decoder_width", 0, "config.model.decoder_width must be >= 1, got 0"),
    ("model.decoder_width", 66, "config.model.decoder_width=66 must be divisible by 4"),
    ("model.decoder_depth", -1, "config.model.decoder_depth must be >= 0, got -1"),
    ("model.decoder_heads", 0, "config.model.decoder_heads must be >= 1, got 0"),
    ("model.decoder_heads", 3, "must be divisible by 4 and by config.model.decoder_heads=3"),
]

CASES = {
    "mae": MAE_MODEL + PRETRAINING + [
        ("model.variant", "B/0", "config.model.variant='B/0': the patch size must be >= 1"),
        ("model.variant", "Q/16", "config.model.variant: unknown ViT variant 'Q/16'"),
        ("image_size", 30, "config.image_size=30 is not divisible by the patch size"),
        ("image_size", 0, "config.image_size must be >= 1, got 0"),
    ],
    "convmae": MAE_MODEL + PRETRAINING + [
        ("model.variant", "huge", "unknown ConvViT size 'huge'"),
        ("model.dwconv_impl", "fft", "config.model.dwconv_impl='fft' is not one of"),
        ("image_size", 72, "config.image_size=72 is not a multiple of 16"),
    ],
    "simmim": PRETRAINING + [
        ("method", "", "config.method='' is not a method name"),
        ("mask_ratio", 1.0, "config.mask_ratio must be in (0, 1), got 1.0"),
        ("mask_ratio", 0.9999, "mask at least one, keep at least one"),  # ceil rounds up to all
        ("mask_patch_size", 0, "config.mask_patch_size must be >= 1, got 0"),
        ("mask_patch_size", 6, "config.mask_patch_size=6 must be a positive multiple"),
        ("image_size", 36, "config.image_size=36 is not divisible by"),
        ("model.drop_path_rate", -0.1, "config.model.drop_path_rate must be in [0, 1)"),
        ("model.variant", "B16", "config.model.variant: unknown ViT variant"),
    ],
    "droppos": PRETRAINING + [
        ("mask_ratio", -0.5, "config.mask_ratio must be in (0, 1), got -0.5"),
        ("mask_ratio", 0.9999, "at least one must be kept and one masked"),
        ("pos_mask_ratio", 0.0, "config.pos_mask_ratio must be in (0, 1], got 0.0"),
        ("pos_mask_ratio", 1.5, "config.pos_mask_ratio must be in (0, 1], got 1.5"),
        ("pos_mask_ratio", 1e-17, "at least one must be dropped"),  # 1 - 1e-17 rounds to 1
        ("sigma", -1.0, "config.sigma must be >= 0, got -1.0"),
        ("attentive_tau", -0.1, "config.attentive_tau must be >= 0, got -0.1"),
        ("model.drop_path_rate", 1.0, "config.model.drop_path_rate must be in [0, 1)"),
        ("model.decoder_width", -64, "config.model.decoder_width must be >= 1"),
        ("model.decoder_depth", -2, "config.model.decoder_depth must be >= 0"),
        ("model.decoder_heads", 3, "must be divisible by config.model.decoder_heads=3"),
        ("model.variant", "B/0", "the patch size must be >= 1"),
    ],
    "splitmask": PRETRAINING + [
        ("norm_pix_loss", "true", "config.norm_pix_loss must be True or False"),
        ("nce_temperature", 0.0, "config.nce_temperature must be positive, got 0.0"),
        ("nce_weight", -1.0, "config.nce_weight must be >= 0, got -1.0"),
        ("image_size", _patch, "SplitMask needs at least 2 patches"),
        ("model.drop_path_rate", 1.0, "config.model.drop_path_rate must be in [0, 1)"),
        ("model.decoder_width", 30, "config.model.decoder_width=30 must be divisible by 4"),
        ("model.decoder_depth", -1, "config.model.decoder_depth must be >= 0"),
        ("model.decoder_heads", 0, "config.model.decoder_heads must be >= 1"),
        ("model.variant", "Z/4", "unknown ViT variant 'Z/4'"),
    ],
    "tinymim": PRETRAINING + [
        ("teacher.workdir", "", "config.teacher.workdir=TEACHER_WORKDIR is required"),
        ("teacher.step", -1, "config.teacher.step must be >= 0, got -1"),
        ("teacher.layer", -1, "config.teacher.layer must be >= 0, got -1"),
        ("teacher.dtype", "float16", "config.teacher.dtype must be one of ('float32', 'bfloat16')"),
        ("targets", "relation,pixels", "config.targets='relation,pixels'"),
        ("color_jitter", -0.1, "config.color_jitter must be >= 0, got -0.1"),
        ("compute.scan", True, "TinyMIM reads q, k, v"),
        ("model.drop_path_rate", 1.5, "config.model.drop_path_rate must be in [0, 1)"),
        ("model.variant", "B/0", "the patch size must be >= 1"),
    ],
    "finetune": CLASSIFIER + [
        ("image_size", -1, "config.image_size must be >= 0, got -1"),
        ("classifier.drop_path_rate", 1.0, "config.classifier.drop_path_rate must be in [0, 1)"),
        ("classifier.train_blocks", -2, "config.classifier.train_blocks must be >= -1, got -2"),
        ("mixup.mixup_alpha", -0.8, "config.mixup.mixup_alpha must be >= 0"),
        ("mixup.cutmix_alpha", -1.0, "config.mixup.cutmix_alpha must be >= 0"),
        ("mixup.switch_prob", 1.5, "config.mixup.switch_prob must be in [0, 1], got 1.5"),
        ("mixup.label_smoothing", 1.0, "config.mixup.label_smoothing must be in [0, 1), got 1.0"),
        ("optimizer.layer_decay", 0.0, "config.optimizer.layer_decay must be in (0, 1], got 0.0"),
        ("optimizer.layer_decay", 1.5, "config.optimizer.layer_decay must be in (0, 1]"),
        ("dataset.randaugment", "rand-m9-x", "bad RandAugment spec 'rand-m9-x'"),
        ("dataset.reprob", 1.5, "config.dataset.reprob must be in [0, 1], got 1.5"),
    ],
    "linprobe": CLASSIFIER + [
        ("optimizer.momentum", 1.0, "config.optimizer.momentum must be in [0, 1), got 1.0"),
        ("optimizer.trust_coefficient", 0.0,
         "config.optimizer.trust_coefficient must be positive, got 0.0"),
    ],
    "knn": [
        ("init_step", -3, "config.init_step must be >= 0, got -3"),
        ("random_init", 0, "config.random_init must be True or False, got 0"),
        ("knn.k", 0, "config.knn.k must be >= 1, got 0"),
        ("knn.temperature", -0.07, "config.knn.temperature must be positive, got -0.07"),
        ("knn.pool", "max", "config.knn.pool must be one of ('', 'cls', 'avg'), got 'max'"),
    ],
}

# Keys with no row, and why.
UNCHECKED = {
    "dataset.data_dir": "any tfds data_dir ('' = the default); opening the dataset reports one "
                        "it cannot read",
    "dataset.folder": "a path, needed with dataset.name='folder' (that row); opening it reports "
                      "a missing or empty one",
    "init_from": "a workdir path, required; reading it (first thing the task does) reports "
                 "what is wrong",
}
UNCHECKED_DOWNSTREAM = {
    "method": "unused: a downstream task builds the method of init_from's config.json",
}


def _config(name, variant):
  c = importlib.import_module(f"configs.{name}").get_config(variant)
  if name == "tinymim":  # required, and only read when the teacher is loaded.
    c.teacher.workdir = "/teacher"
  return c


def _set(c, key, value):
  """Sets a dotted key to any value (a user's own config file has no type checks)."""
  *path, leaf = key.split(".")
  node = c
  for part in path:
    node = node[part]
  with node.ignore_type():
    node[leaf] = value(c) if callable(value) else value


def _leaves(node, prefix=""):
  for k, v in node.items():
    if hasattr(v, "items"):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


ALL = [(name, variant) for name, variants in VARIANTS.items() for variant in variants]
ROWS = [(name, key, bad, msg) for name in VARIANTS
        for key, bad, msg in COMMON + CASES[name]]


@pytest.mark.parametrize("name,variant", ALL, ids=[f"{n}:{v}" for n, v in ALL])
def test_every_shipped_config_passes(name, variant):
  tasks.check_config(_config(name, variant))


@pytest.mark.parametrize("name,key,bad,msg", ROWS,
                         ids=[f"{n}-{k}={getattr(b, '__name__', None) or repr(b)}"[:80]
                              for n, k, b, _ in ROWS])
def test_a_bad_value_is_one_line_naming_it(name, key, bad, msg):
  for variant in VARIANTS[name]:
    c = _config(name, variant)
    _set(c, key, bad)
    with pytest.raises(UserError) as e:
      tasks.check_config(c)
    assert msg in str(e.value) and "\n" not in str(e.value), (variant, str(e.value))


@pytest.mark.parametrize("name,variant", ALL, ids=[f"{n}:{v}" for n, v in ALL])
def test_every_key_has_a_row_or_a_reason(name, variant):
  known = {key for key, _, _ in COMMON + CASES[name]} | set(UNCHECKED)
  if name in DOWNSTREAM:
    known |= set(UNCHECKED_DOWNSTREAM)
  missing = [k for k, _ in _leaves(_config(name, variant)) if k not in known]
  assert not missing, missing


@pytest.mark.parametrize("name,variant", ALL, ids=[f"{n}:{v}" for n, v in ALL])
def test_a_nan_or_inf_float_is_refused_anywhere(name, variant):
  floats = [k for k, v in _leaves(_config(name, variant)) if isinstance(v, float)]
  assert floats
  for key in floats:
    for bad in (math.nan, -math.inf):
      c = _config(name, variant)
      _set(c, key, bad)
      with pytest.raises(UserError, match=rf"^config\.{re.escape(key)} must be finite, got "):
        tasks.check_config(c)
  c = _config(name, variant)
  _set(c, "dataset.std", (0.2, math.nan, 0.2))
  with pytest.raises(UserError, match=r"config.dataset.std must be finite"):
    tasks.check_config(c)


def test_rules_read_as_intervals():
  assert configlib.number("(0, 1)")(0.5) is None
  assert configlib.number("(0, 1)")(1) == "must be in (0, 1)"
  assert configlib.number("[0, inf)")(math.inf) == "must be a finite number"
  assert configlib.number("(0, inf)")(True) == "must be a finite number"
  assert configlib.integer("[-1, inf)")(-1) is None
  assert configlib.integer("[1, inf)")(2.0) == "must be an integer"
  assert configlib.integer("[-2**63, 2**63)")(-2**63) is None
  assert configlib.one_of("a", "b")("c") == "must be one of ('a', 'b')"
  assert configlib.one_of(False)(0) == "must be one of (False,)"


def test_a_knn_pool_must_suit_the_method():
  # Needs the method's features (traced abstractly), so the evaluator and the task check it
  # once the method is built, still before the workdir.
  convmae = get_method(_config("convmae", "tiny"))
  knn.check_pool(convmae, 64, "", "config.knn.pool")
  with pytest.raises(UserError, match=r"^config.knn.pool='cls': ConvMAE features pool must be "):
    knn.check_pool(convmae, 64, "cls", "config.knn.pool")
  knn.check_pool(get_method(_config("mae", "tiny")), 32, "cls", "config.knn.pool")


CLI = [  # (config and overrides, the one stderr line): a pretraining method, a downstream task,
    # k-NN; the first into a new workdir, the others into an existing one.
    (["--config=configs/mae.py", *SMALL, "--config.mask_ratio=1.5"],
     "error: config.mask_ratio must be in (0, 1), got 1.5"),
    (["--config=configs/finetune.py", "--config.init_from=/nonexistent",
      "--config.mixup.label_smoothing=1.0"],
     "error: config.mixup.label_smoothing must be in [0, 1), got 1.0"),
    (["--config=configs/knn.py", "--config.knn.k=0"], "error: config.knn.k must be >= 1, got 0"),
]


@pytest.mark.parametrize("args,line", CLI, ids=["mae", "finetune", "knn"])
def test_cli_refuses_before_touching_anything(tmp_path, args, line):
  wd = tmp_path / "wd"
  if "knn" in args[0] or "finetune" in args[0]:
    wd.mkdir()
    (wd / "notes.txt").write_text("keep me")
  before = snapshot(str(wd)) if wd.exists() else None
  r = run_cli(*args, f"--workdir={wd}", f"--config.dataset.data_dir={tmp_path / 'tfds'}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [line]
  assert (snapshot(str(wd)) if wd.exists() else None) == before
  assert not (tmp_path / "tfds").exists()  # refused before the dataset was opened.
