"""Top-1 / top-5 accuracy and cross-entropy of a classifier on the eval split.

  config.evals.classification = dict(type="classification", every_epochs=1.0, batch_size=256)

Every example of config.dataset.eval_split once (padding rows masked out), through the eval
transform (resize to image_size / 0.875, centre crop: 256 -> 224 at 224 px, as the official MAE
fine-tuning's), batches sharded over the mesh. The trainable must be a
`mae_jax.trainable.Classifier` (fine-tuning, linear probing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mae_jax import configlib
from mae_jax.errors import UserError
from mae_jax.evaluators.base import Context, Periodic
from mae_jax.trainable import Classifier

DEFAULTS = {"every_epochs": 1.0, "batch_size": 256}
CHECKS = {"batch_size": configlib.integer("[1, inf)")}


class Evaluator(Periodic):
  """{'top1', 'top5', 'loss'} over the eval split."""

  def __init__(self, cfg, ctx: Context):
    super().__init__(cfg.every_steps, ctx.total_steps)
    classifier = ctx.trainable
    if not isinstance(classifier, Classifier):
      raise UserError("a classification evaluator needs a classifier (config.task finetune or "
                      f"linprobe); config.task={ctx.config.task!r} trains "
                      f"{type(classifier).__name__}")
    configlib.check(cfg, CHECKS, where="config.evals.classification")  # outside `build`.
    n_dev = ctx.mesh.devices.size
    if cfg.batch_size % n_dev:
      raise UserError(f"config.evals classification: batch_size={cfg.batch_size} must be "
                      f"divisible by the {n_dev} devices")
    ctx.source.check_split(ctx.config.dataset.eval_split)
    self.ctx, self.batch_size = ctx, cfg.batch_size
    top_k = min(5, classifier.num_classes)

    def sums(params, model_state, batch):
      logits = classifier.logits(params, model_state, batch["image"]).astype(jnp.float32)
      labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
      top = jax.lax.top_k(logits, top_k)[1]
      hit5 = jnp.any(top == labels[:, None], axis=-1)
      hit1 = top[:, 0] == labels
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.stack([jnp.sum(hit1 * mask), jnp.sum(hit5 * mask), jnp.sum(ce * mask),
                        jnp.sum(mask)])

    self._sums = jax.jit(sums, out_shardings=NamedSharding(ctx.mesh, P()))

  def run(self, state) -> dict[str, float]:
    total = np.zeros(4, np.float64)
    for local in self.ctx.eval_batches(batch_size=self.batch_size):
      batch = self.ctx.to_global(local)
      total += np.asarray(self._sums(state.params, state.model_state, batch), np.float64)
    n = max(total[3], 1.0)
    return {"top1": total[0] / n, "top5": total[1] / n, "loss": total[2] / n}
