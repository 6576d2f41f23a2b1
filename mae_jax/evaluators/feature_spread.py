"""Feature spread: how much L2-normalized encoder features vary across held-out images.

  config.evals.spread = dict(type="feature_spread", every_steps=500, batches=2)

The mean over channels of the per-channel standard deviation; an encoder that collapses (maps
every image to one vector) drives it to 0.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.evaluators.base import Context, Periodic

DEFAULTS = {"batches": 2}


class Evaluator(Periodic):

  def __init__(self, cfg, ctx: Context):
    super().__init__(cfg.every_steps, ctx.total_steps)
    self.ctx, self.batches = ctx, cfg.batches

    def normalized(params, images):  # a pretraining method's features, [B, D], unit length.
      f = ctx.trainable.features(params, images)
      return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

    self.features = jax.jit(normalized)

  def run(self, state) -> dict[str, float]:
    feats, batches = [], self.ctx.eval_batches(sharded=False)
    for _, batch in zip(range(self.batches), batches):
      feats.append(np.asarray(self.features(state.params, batch["image"]))[batch["mask"] > 0])
    batches.close()
    return {"std": float(np.concatenate(feats).std(axis=0).mean())}
