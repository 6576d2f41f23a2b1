"""Held-out MIM loss and reconstruction images during pretraining (config.monitor).

The data-scaling study of MIM (Xie et al. 2023, "On Data Scaling in Masked Image Modeling") uses
the pretraining objective on validation images as a proxy for downstream quality and as the sign
of overfitting. Here: the method's own loss (`method.heldout_metrics`: train=False, no update) on
the first `heldout_batches` batches of config.dataset.eval_split, eval transform (resize, centre
crop), masks drawn from one fixed key, so every evaluation of a run scores the same images with
the same masks and the curve moves only with the parameters. Batches are sharded on 'data' like
the train step's. Methods with a `reconstruct` hook also get `num_images` validation images with
their reconstructions (same fixed masks) as one TensorBoard image.
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax import data
from mae_jax.analyze import images as image_panels
from mae_jax.errors import UserError

_KEY_SALT = 0x4D4F4E  # the monitor's masks come from fold_in(PRNGKey(seed), salt): not training's.
IMAGE_TAG = "reconstructions"


class Monitor:
  """`due(step)`, then `__call__(state) -> (scalars, images)` for the loop's MetricWriter."""

  def __init__(self, config, method, source: data.Source, mesh: Mesh, total_steps: int):
    m = config.monitor
    self.every = m.every_steps
    self.total_steps = total_steps
    self.config, self.method, self.source = config, method, source
    self.split = config.dataset.eval_split
    source.check_split(self.split)
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    local = config.batch_size // self.process_count
    full = min(source.num_examples(self.split, i, self.process_count, drop_remainder=False)
               for i in range(self.process_count)) // local
    if full < 1:
      raise UserError(f"config.monitor: dataset {source.name} split {self.split} has fewer "
                      f"images per process than one batch of {local}; lower config.batch_size "
                      "or turn the monitor off (config.monitor.every_steps=0)")
    self.num_batches = min(m.heldout_batches or full, full)
    self.loss_key, self.image_key = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(config.seed), _KEY_SALT))
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    self._batch_sharding = batch
    self._loss = jax.jit(method.heldout_metrics, out_shardings=replicated,
                         in_shardings=(replicated, replicated, batch, replicated, replicated))
    reconstruct = getattr(method, "reconstruct", None)
    self.num_images = m.num_images if reconstruct is not None else 0
    if self.num_images:
      self._reconstruct = jax.jit(reconstruct, out_shardings=replicated)
    self._images: Optional[np.ndarray] = None  # read on first use.

  def due(self, step: int) -> bool:
    """Every `every` steps, and at the last step of a run that lasts at least that long."""
    return bool(self.every) and (step % self.every == 0 or
                                 (step == self.total_steps and step >= self.every))

  def heldout(self, state) -> dict[str, float]:
    """{'heldout_' + metric: mean over the held-out batches} (e.g. heldout_loss)."""
    d = self.config.dataset
    batches = data.eval_batches(self.source, d, split=self.split,
                                image_size=self.config.image_size,
                                global_batch_size=self.config.batch_size,
                                process_index=self.process_index,
                                process_count=self.process_count)
    sums: dict[str, float] = {}
    try:
      for i in range(self.num_batches):
        local = next(batches)
        image = jax.make_array_from_process_local_data(self._batch_sharding, local["image"])
        metrics = jax.device_get(self._loss(state.params, state.model_state, {"image": image},
                                            jax.random.fold_in(self.loss_key, i), state.step))
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + float(v)
    finally:
      batches.close()
    return {f"heldout_{k}": v / self.num_batches for k, v in sums.items()}

  def images(self, state) -> dict[str, np.ndarray]:
    """{IMAGE_TAG: uint8 grid}: rows = image_panels.PANELS, one column per validation image."""
    if not self.num_images:
      return {}
    d = self.config.dataset
    if self._images is None:  # the first images of the split, the same on every process.
      batches = data.eval_batches(self.source, d, split=self.split,
                                  image_size=self.config.image_size,
                                  global_batch_size=self.num_images)
      first = next(batches)
      batches.close()
      self._images = first["image"][first["mask"] > 0]
    recon = jax.device_get(self._reconstruct(state.params, self._images, self.image_key))
    shown = image_panels.panels(self._images, recon, d.mean, d.std)
    scale = max(1, -(-64 // self.config.image_size))  # tiny images: at least 64 px per cell.
    return {IMAGE_TAG: image_panels.tile([shown[p] for p in image_panels.PANELS], scale=scale)}

  def __call__(self, state) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    t0 = time.perf_counter()
    scalars = self.heldout(state)
    images = self.images(state)
    print(f"step {int(state.step)} | held-out loss {scalars['heldout_loss']:.4f} on "
          f"{self.num_batches} {self.split} batch(es) ({time.perf_counter() - t0:.1f}s)",
          flush=True)
    return scalars, images
