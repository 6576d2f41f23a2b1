"""Linear probing of a frozen pretrained encoder: a `Classifier` trainable.

As the official MAE `main_linprobe.py`: the frozen encoder's features (`method.features`: the cls
token for ViTs, the token mean for ConvMAE), BatchNorm without affine (eps 1e-6) and a linear
head (normal(0.01)), LARS (optax.lars: trust ratio and weight decay on the kernel only), plain
cross-entropy. The encoder is model state, never differentiated. BatchNorm statistics are those
of the whole global batch (the official code uses per-GPU statistics).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mae_jax import configlib
from mae_jax.evaluate.classifier import Pretrained, check_task_keys, load_encoder_into
from mae_jax.trainable import Classifier

# LARS: heavy-ball momentum, and the trust ratio's scale (0 would freeze the kernel).
CHECKS = {"optimizer.momentum": configlib.number("[0, 1)"),
          "optimizer.trust_coefficient": configlib.number("(0, inf)")}


class ProbeHead(nn.Module):
  """BatchNorm1d(affine=False, eps=1e-6) + Linear, as the official linear probe's head."""
  num_classes: int
  init_std: float = 0.01

  @nn.compact
  def __call__(self, features, train: bool = False):
    # torch momentum 0.1 == flax momentum 0.9 (weight of the old running average).
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_bias=False,
                     use_scale=False, name="bn")(features)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(self.init_std),
                    name="head")(x)


class LinearProbe(Classifier):
  """`config.task='linprobe'` on the frozen encoder of `pretrained` (config.init_from)."""

  name = "linprobe"

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
    self.method = pretrained.method
    self.pool = config.classifier.pool or None
    self.head = ProbeHead(num_classes, config.classifier.head_init_std)
    # Builds every shape once, abstractly: a bad pool name fails here, before the workdir is
    # touched.
    images = jax.ShapeDtypeStruct((1, *configlib.image_hw(config.image_size), 3), jnp.float32)
    jax.eval_shape(self.init_state, jax.random.PRNGKey(0), images)

  def init_state(self, rng, images):
    pre_params = self.method.init_params(rng, images)
    key = self.method.encoder_key
    frozen = {key: pre_params[key]}
    feats = self.method.features(frozen, images, self.pool)
    variables = self.head.init({"params": rng}, feats)
    return variables["params"], {"frozen": frozen, "batch_stats": variables["batch_stats"]}

  def initial_weights(self, params, model_state):
    if self.config.random_init:
      print("linprobe: random initialization (config.random_init), no pretrained weights",
            flush=True)
      return None
    encoder, where = self.pretrained.load_encoder(self.config.init_step)
    print(f"linprobe: encoder from {where}", flush=True)
    key = self.method.encoder_key
    merged = load_encoder_into(model_state["frozen"][key], encoder, self.pretrained, where)
    return params, {**model_state, "frozen": {key: merged}}

  def _features(self, model_state, images):
    return jax.lax.stop_gradient(self.method.features(model_state["frozen"], images, self.pool))

  def logits(self, params, model_state, images):
    variables = {"params": params, "batch_stats": model_state["batch_stats"]}
    return self.head.apply(variables, self._features(model_state, images))

  def train_loss(self, params, model_state, batch, rng, step):
    del rng, step
    variables = {"params": params, "batch_stats": model_state["batch_stats"]}
    logits, updates = self.head.apply(variables, self._features(model_state, batch["image"]),
                                      train=True, mutable=["batch_stats"])
    model_state = {**model_state, "batch_stats": updates["batch_stats"]}
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()
    top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, ({"loss": loss, "train_top1": top1}, model_state)

  def optimizer(self, schedule, params):
    o = self.config.optimizer
    kernels = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    return optax.lars(schedule, weight_decay=o.weight_decay, weight_decay_mask=kernels,
                      trust_coefficient=o.trust_coefficient, eps=0.0, trust_ratio_mask=kernels,
                      momentum=o.momentum)
