"""Fine-tuning (and partial fine-tuning) of a pretrained encoder: a `Classifier` trainable.

As the official MAE `main_finetune.py`: the encoder as a classifier (ViT: timm's layout, mean of
the patch tokens + fc_norm by default, or the cls token after `norm`; ConvViT: mean + fc_norm), a
trainable position embedding initialized from the pretraining one (bicubic resampling when the
grid changes), a head initialized normal(2e-5), drop path, AdamW with layer-wise lr decay and no
weight decay on 1-D params, cls_token and pos_embed, mixup / cutmix with label smoothing in the
step, RandAugment and random erasing in the input pipeline. `classifier.train_blocks = k` trains
only the last k blocks (and the final norm and head): partial fine-tuning; the other parameters
are carried as frozen model state, so no gradient is computed for them.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import configlib, workdir as workdirs
from mae_jax.errors import UserError
from mae_jax.evaluate import layer_decay
from mae_jax.evaluate.classifier import (PRETRAIN_CONFIG, Pretrained, check_task_keys,
                                         load_encoder_into)
from mae_jax.evaluate.mixup import mixup_cutmix, smoothed_one_hot, soft_cross_entropy
from mae_jax.methods import get_method
from mae_jax.models.convvit import ConvMAEEncoder, ConvViT
from mae_jax.models.vit import ViT
from mae_jax.trainable import Classifier


def classifier_for(encoder: nn.Module, *, pool: str, num_classes: int, drop_path_rate: float,
                   head_init_std: float) -> nn.Module:
  """The classification model sharing `encoder`'s parameter names (ViT or ConvViT)."""
  if isinstance(encoder, ViT):
    if pool not in ("avg", "cls"):
      raise UserError(f"config.classifier.pool must be 'avg' or 'cls' for a ViT, got {pool!r}")
    return encoder.clone(parent=None, global_pool="token" if pool == "cls" else "avg",
                         num_classes=num_classes, drop_path_rate=drop_path_rate,
                         head_init_std=head_init_std, learnable_pos_embed=True)
  if isinstance(encoder, ConvMAEEncoder):
    if pool != "avg":
      raise UserError(f"config.classifier.pool must be 'avg' for ConvMAE (no cls token), got "
                      f"{pool!r}")
    return ConvViT(widths=encoder.widths, depths=encoder.depths, num_heads=encoder.num_heads,
                   mlp_ratio=encoder.mlp_ratio, drop_path_rate=drop_path_rate,
                   dwconv_impl=encoder.dwconv_impl, learnable_pos_embed=True,
                   num_classes=num_classes, global_pool=True, head_init_std=head_init_std,
                   compute=encoder.compute)
  raise UserError(f"fine-tuning does not know the encoder {type(encoder).__name__}")


def _blocks(model: nn.Module) -> tuple[str, int]:
  """(name prefix, count) of the classifier's transformer blocks (ConvViT: stage 3's)."""
  return ("blocks3_", model.depths[2]) if isinstance(model, ConvViT) else ("blocks_", model.depth)


def is_trainable(name: str, model: nn.Module, train_blocks: int) -> bool:
  """Partial fine-tuning: the last `train_blocks` blocks, the final norms and the head train."""
  if train_blocks < 0 or name in ("head", "fc_norm", "norm"):
    return True
  prefix, depth = _blocks(model)
  return name.startswith(prefix) and int(name[len(prefix):]) >= depth - train_blocks


def layer_id_fn(model: nn.Module):
  if isinstance(model, ConvViT):
    depths = model.depths
    return (lambda path: layer_decay.convvit_layer_id(path, depths)), depths[2] + 1
  depth = model.depth
  return (lambda path: layer_decay.vit_layer_id(path, depth)), depth + 1


def finetune_decay_mask(params):
  """Weight decay on tensors of rank >= 2 except cls_token and pos_embed (timm's
  `no_weight_decay`, which the official fine-tuning excludes)."""
  def decay(path, x):
    return x.ndim >= 2 and path[0].key not in ("cls_token", "pos_embed")
  return jax.tree_util.tree_map_with_path(decay, params)


def split_trainable(params: dict, keep) -> tuple[dict, dict]:
  """(params whose top-level name `keep` accepts, the others)."""
  return ({k: v for k, v in params.items() if keep(k)},
          {k: v for k, v in params.items() if not keep(k)})


CHECKS = {
    "classifier.drop_path_rate": configlib.number("[0, 1)"),  # DropPath divides by 1 - rate.
    # -1 = all; the encoder's depth bounds it once the model is built.
    "classifier.train_blocks": configlib.integer("[-1, inf)"),
    "mixup.mixup_alpha": configlib.number("[0, inf)"),  # Beta(alpha, alpha); 0 = off.
    "mixup.cutmix_alpha": configlib.number("[0, inf)"),
    "mixup.switch_prob": configlib.number("[0, 1]"),
    "mixup.label_smoothing": configlib.number("[0, 1)"),
    "optimizer.layer_decay": configlib.number("(0, 1]"),
}


class Finetune(Classifier):
  """`config.task='finetune'` on the encoder of `pretrained` (config.init_from)."""

  name = "finetune"

  @staticmethod
  def check_config(config) -> None:
    """UserError (one line) for a value of the task's keys that cannot work; builds nothing."""
    check_task_keys(config)
    configlib.check(config, CHECKS)

  def __init__(self, config, total_steps: Optional[int], pretrained: Pretrained,
               num_classes: int):
    super().__init__(config, total_steps)
    self.check_config(config)
    self.pretrained, self.num_classes = pretrained, num_classes
    c = config.classifier
    self.model = classifier_for(pretrained.encoder, pool=c.pool or "avg", num_classes=num_classes,
                                drop_path_rate=c.drop_path_rate, head_init_std=c.head_init_std)
    self.train_blocks = c.train_blocks
    depth = _blocks(self.model)[1]
    if not -1 <= self.train_blocks <= depth:
      raise UserError(f"config.classifier.train_blocks must be -1 (all) or 0..{depth}, got "
                      f"{self.train_blocks}")
    # Builds every shape once, abstractly: a bad model setting fails here, before the workdir
    # is touched.
    images = jax.ShapeDtypeStruct((1, *configlib.image_hw(config.image_size), 3), jnp.float32)
    jax.eval_shape(self.init_state, jax.random.PRNGKey(0), images)

  def _keep(self, name: str) -> bool:
    return is_trainable(name, self.model, self.train_blocks)

  def workdir_files(self) -> dict[str, str]:
    # What `load_classifier` rebuilds the model from, even if init_from is gone later.
    return {PRETRAIN_CONFIG: self.pretrained.config.to_json_best_effort(indent=2,
                                                                        sort_keys=True)}

  def init_state(self, rng, images):
    full = self.model.init({"params": rng}, images)["params"]
    trainable, frozen = split_trainable(full, self._keep)
    return trainable, ({"frozen": frozen} if frozen else {})

  def initial_weights(self, params, model_state):
    if self.config.random_init:
      print("finetune: random initialization (config.random_init), no pretrained weights",
            flush=True)
      return None
    encoder, where = self.pretrained.load_encoder(self.config.init_step)
    print(f"finetune: encoder from {where}", flush=True)
    full = {**params, **model_state.get("frozen", {})}
    merged = load_encoder_into(full, encoder, self.pretrained, where)
    trainable, frozen = split_trainable(merged, self._keep)
    return trainable, ({"frozen": frozen} if frozen else {})

  def _apply(self, params, model_state, images, rng=None, train: bool = False):
    full = {**params, **model_state.get("frozen", {})}
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": full}, images, train=train, rngs=rngs)

  def logits(self, params, model_state, images):
    return self._apply(params, model_state, images)

  def train_loss(self, params, model_state, batch, rng, step):
    del step
    images, labels = batch["image"], batch["label"]
    mix_rng, drop_rng = jax.random.split(rng)
    m = self.config.mixup
    if m.mixup_alpha > 0 or m.cutmix_alpha > 0:
      images, targets = mixup_cutmix(mix_rng, images, labels, self.num_classes, m.mixup_alpha,
                                     m.cutmix_alpha, m.switch_prob, m.label_smoothing)
    else:
      targets = smoothed_one_hot(labels, self.num_classes, m.label_smoothing)
    logits = self._apply(params, model_state, images, drop_rng, train=True)
    loss = soft_cross_entropy(logits, targets)
    return loss, ({"loss": loss}, model_state)

  def optimizer(self, schedule, params):
    o = self.config.optimizer
    layer_id, num_layers = layer_id_fn(self.model)
    return layer_decay.adamw_layer_decay(schedule, o, params, layer_id, o.layer_decay, num_layers,
                                         mask=finetune_decay_mask)


def load_classifier(workdir: str, step: Optional[int] = None, best: bool = False
                    ) -> tuple[nn.Module, Any, dict]:
  """(model, params, info) of a fine-tuning workdir: the classifier module (no drop path) and its
  full params (trainable and frozen merged, numpy) at `step` (default the latest; with
  `best=True` the best one, in WORKDIR/best)."""
  cfg = workdirs.read_config(workdir, "a fine-tuning workdir")
  if cfg.get("task") != "finetune":
    raise UserError(f"{workdir} is not a fine-tuning workdir (its task is {cfg.get('task')!r})")
  # The pretraining config the run copied when it started (init_from may be gone since).
  pre = workdirs.read_config(workdir, "a fine-tuning workdir (a run writes it when it starts)",
                             PRETRAIN_CONFIG)
  configlib.set_image_size(pre, cfg.image_size)
  items, meta = workdirs.restore_items(f"{workdir}/best" if best else workdir,
                                       ("params", "model_state"), step)
  params = {**items["params"], **items.get("model_state", {}).get("frozen", {})}
  num_classes = int(np.asarray(params["head"]["bias"]).shape[0])
  pool = cfg.classifier.pool or "avg"
  model = classifier_for(get_method(pre).encoder_module, pool=pool, num_classes=num_classes,
                         drop_path_rate=0.0, head_init_std=cfg.classifier.head_init_std)
  info = {"step": meta.get("step"), "num_classes": num_classes, "image_size": cfg.image_size,
          "pool": pool, "pretrain_method": pre.method, "variant": pre.model.variant,
          "meta": meta}
  return model, jax.tree.map(np.asarray, params), info

