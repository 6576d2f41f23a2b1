"""Held-out MIM loss and reconstruction images during pretraining.

  config.evals.heldout = dict(type="heldout", every_steps=N, batches=0, num_images=8)

The data-scaling study of MIM (Xie et al. 2023, "On Data Scaling in Masked Image Modeling") uses
the pretraining objective on validation images as a proxy for downstream quality and as the sign
of overfitting. Here: the method's own loss without training noise (`method.eval_metrics`) on the
first `batches` batches (0: every full batch) of config.dataset.eval_split, eval transform
(resize, centre crop), masks drawn from one fixed key, so every evaluation of a run scores the
same images with the same masks and the curve moves only with the parameters. Batches are
sharded on 'data' like the train step's. Methods with `reconstruct` also get `num_images`
validation images with their reconstructions (same fixed masks) as one TensorBoard image.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mae_jax import configlib
from mae_jax.errors import UserError
from mae_jax.evaluators import panels
from mae_jax.evaluators.base import Context, Periodic
from mae_jax.methods.base import Method

DEFAULTS = {"batches": 0, "num_images": 8}
CHECKS = {"batches": configlib.integer("[0, inf)"),  # 0 = every full batch.
          "num_images": configlib.integer("[0, inf)")}
_KEY_SALT = 0x4D4F4E  # the held-out masks come from fold_in(PRNGKey(seed), salt): not training's.
IMAGE_TAG = "reconstructions"


class Evaluator(Periodic):
  """{'loss', ... (every metric of the method's loss), 'reconstructions': uint8 grid}."""

  def __init__(self, cfg, ctx: Context):
    super().__init__(cfg.every_steps, ctx.total_steps)
    method, config, source = ctx.trainable, ctx.config, ctx.source
    if not isinstance(method, Method):
      raise UserError("a heldout evaluator scores a pretraining method's loss; "
                      f"config.task={config.task!r} trains {type(method).__name__}")
    configlib.check(cfg, CHECKS, where="config.evals.heldout")  # when built outside `build`.
    self.ctx, self.method = ctx, method
    self.split = config.dataset.eval_split
    source.check_split(self.split)
    count = jax.process_count()
    local = config.batch_size // count
    full = min(source.num_examples(self.split, i, count, drop_remainder=False)
               for i in range(count)) // local
    if full < 1:
      raise UserError(f"a heldout evaluator: dataset {source.name} split {self.split} has fewer "
                      f"images per process than one batch of {local}; lower config.batch_size "
                      "or turn it off (every_steps=0)")
    self.num_batches = min(cfg.batches or full, full)
    self.loss_key, self.image_key = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(config.seed), _KEY_SALT))
    replicated, batch = NamedSharding(ctx.mesh, P()), NamedSharding(ctx.mesh, P("data"))
    self._loss = jax.jit(method.eval_metrics, out_shardings=replicated,
                         in_shardings=(replicated, replicated, batch, replicated, replicated))
    self.num_images = cfg.num_images if method.reconstruct is not None else 0
    if self.num_images:
      self._reconstruct = jax.jit(method.reconstruct, out_shardings=replicated)
    self._images: Optional[np.ndarray] = None  # read on first use.

  def due(self, step: int) -> bool:
    """Every `every_steps`, and at the last step of a run that lasts at least that long."""
    return step % self.every_steps == 0 or (step == self.total_steps and
                                            step >= self.every_steps)

  def heldout(self, state) -> dict[str, float]:
    """{metric: mean over the held-out batches} (e.g. 'loss')."""
    batches = self.ctx.eval_batches(self.split)
    sums: dict[str, float] = {}
    try:
      for i in range(self.num_batches):
        image = self.ctx.to_global({"image": next(batches)["image"]})
        metrics = jax.device_get(self._loss(state.params, state.model_state, image,
                                            jax.random.fold_in(self.loss_key, i), state.step))
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + float(v)
    finally:
      batches.close()
    return {k: v / self.num_batches for k, v in sums.items()}

  def images(self, state) -> dict[str, np.ndarray]:
    """{IMAGE_TAG: uint8 grid}: rows = panels.PANELS, one column per validation image."""
    if not self.num_images:
      return {}
    if self._images is None:  # the first images of the split, the same on every process.
      batches = self.ctx.eval_batches(self.split, self.num_images, sharded=False)
      first = next(batches)
      batches.close()
      self._images = first["image"][first["mask"] > 0]
    recon = jax.device_get(self._reconstruct(state.params, self._images, self.image_key))
    d, size = self.ctx.config.dataset, min(configlib.image_hw(self.ctx.config.image_size))
    shown = panels.panels(self._images, recon, d.mean, d.std)
    scale = max(1, -(-64 // size))  # tiny images: at least 64 px per cell (the shorter side).
    return {IMAGE_TAG: panels.tile([shown[p] for p in panels.PANELS], scale=scale)}

  def run(self, state) -> dict:
    return {**self.heldout(state), **self.images(state)}
