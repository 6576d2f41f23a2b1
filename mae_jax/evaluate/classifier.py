"""What fine-tuning and linear probing share: the pretraining run they start from, its encoder's
weights loaded into a classifier tree, and the checks of the task's own keys.

The pretrained model is rebuilt from INIT_FROM/config.json (every pretraining run saves its
resolved config) at the downstream task's image size, dtype and remat (blocks unrolled:
classifiers keep the per-block layout for layer-wise lr decay); its encoder weights come from
INIT_FROM's latest checkpoint (or config.init_step). The decoder and other method-specific parts are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from mae_jax import configlib, workdir as workdirs
from mae_jax.data.randaugment import parse_randaugment
from mae_jax.errors import UserError
from mae_jax.methods import Method, get_method
from mae_jax.models.vit import ViT, resample_pos_embed, sincos_2d

PRETRAIN_CONFIG = "pretrain_config.json"  # the pretraining config, copied into the task's workdir.
# Classifier parameters a pretraining encoder does not have (fresh), and encoder parameters the
# classifier does not use (dropped, as the official strict=False loads).
FRESH = ("head", "fc_norm", "pos_embed")
DROPPED = ("norm", "fc_norm", "head", "stage1_output_decode", "stage2_output_decode")


@dataclasses.dataclass
class Pretrained:
  """The pretraining run a downstream task starts from."""
  workdir: str
  config: ml_collections.ConfigDict  # its config, at the task's image size and compute.
  method: Method  # built from `config` (no run length: it is not trained here).
  grid: tuple[int, int]  # its patch grid at its own image size (its position embedding's).
  task_grid: tuple[int, int]  # the patch grid at the task's image size.

  @property
  def encoder(self):
    return self.method.encoder_module

  @property
  def has_cls(self) -> bool:
    return isinstance(self.encoder, ViT)

  def load_encoder(self, step: int = 0) -> tuple[Any, str]:
    """(encoder params of checkpoint `step` (0 = latest), where they come from)."""
    loaded, meta = workdirs.load_params(self.workdir, step or None)
    where = f"checkpoint of {self.workdir} step {meta.get('step')}"
    return workdirs.subtree(loaded, self.method.encoder_key, where), where


def pretrained_run(config) -> Pretrained:
  """The run config.init_from names; resolves config.image_size 0 to that run's."""
  if not config.init_from:
    raise UserError(f"config.init_from=PRETRAIN_WORKDIR is required for {config.task}")
  pre = workdirs.read_config(config.init_from, "a pretraining workdir (config.init_from)")
  if not config.image_size:
    config.image_size = pre.image_size  # the resolved config (config.json) says which.
  pretrain_size = pre.image_size
  configlib.set_image_size(pre, config.image_size)
  with pre.unlocked():
    if "drop_path_rate" in pre.model:
      pre.model.drop_path_rate = 0.0
    if "compute" in config:  # the downstream task's dtype and remat, not the pretraining run's.
      pre.compute = config.compute.to_dict()
      pre.compute.scan = False
  try:
    method = get_method(pre)
  except UserError as e:
    raise UserError(f"the pretraining config of {config.init_from} at image_size "
                    f"{config.image_size}: {e}") from None
  encoder = method.encoder_module
  return Pretrained(workdir=config.init_from, config=pre, method=method,
                    grid=encoder.grid(configlib.image_hw(pretrain_size)),
                    task_grid=encoder.grid(configlib.image_hw(config.image_size)))


# The keys both tasks share (config.init_step and config.random_init: configlib.COMMON).
TASK_CHECKS = {
    "classifier.pool": configlib.one_of("", "avg", "cls"),  # '' = the task's default.
    "classifier.head_init_std": configlib.number("[0, inf)"),  # 0: a zero-initialized head.
    "dataset.reprob": configlib.number("[0, 1]"),  # random erasing probability.
}


def check_task_keys(config) -> None:
  """The keys both tasks share, augmentation specs included (a bad one fails now, not in the
  input thread)."""
  configlib.check(config, TASK_CHECKS)
  d = config.dataset
  if d.get("randaugment"):
    parse_randaugment(d.randaugment)


def num_classes_of(source, task: str) -> int:
  if source.num_classes < 2:
    raise UserError(f"{task} needs a labelled dataset; {source.name} has {source.num_classes} "
                    "classes")
  return source.num_classes


def load_encoder_into(fresh: dict, encoder: dict, pre: Pretrained, where: str) -> dict:
  """The classifier params `fresh` with every parameter the pretrained `encoder` has.

  `pos_embed`: the encoder's own if it has one (imported checkpoints), else the pretraining
  sin-cos constant of the pretraining grid; bicubic-resampled to the task's grid when they
  differ (as the official `interpolate_pos_embed`). UserError listing what does not fit.
  """
  flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
  flat_enc = traverse_util.flatten_dict(encoder, sep="/")
  if "pos_embed" in flat_fresh and "pos_embed" not in flat_enc:
    width = flat_fresh["pos_embed"].shape[-1]
    flat_enc["pos_embed"] = sincos_2d(width, *pre.grid, cls_token=pre.has_cls)[None]
  out, have, want = {}, {}, {}
  for name, value in flat_fresh.items():
    top = name.split("/")[0]
    if top in ("head", "fc_norm") or name not in flat_enc:
      if top not in FRESH:
        want[name] = value.shape  # a parameter the checkpoint should have had.
      out[name] = value
      continue
    got = np.asarray(flat_enc[name])
    if name == "pos_embed" and got.shape != value.shape and got.ndim == 3:
      extra = 1 if pre.has_cls else 0
      n = got.shape[1] - extra
      side = int(round(np.sqrt(n)))
      old = pre.grid if pre.grid[0] * pre.grid[1] == n else (side, side)
      try:
        got = resample_pos_embed(got, old, pre.task_grid, extra)
      except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    have[name], want[name] = got.shape, value.shape
    if got.shape == value.shape:
      out[name] = jnp.asarray(got, value.dtype)
  for name in flat_enc:
    if name not in flat_fresh and name.split("/")[0] not in DROPPED:
      have[name] = flat_enc[name].shape  # a checkpoint parameter the classifier has no use for.
  problem = workdirs.describe_mismatch(want, have)
  if problem:
    raise UserError(f"{where} does not fit the classifier: {problem}")
  return traverse_util.unflatten_dict(out, sep="/")
