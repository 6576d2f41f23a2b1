"""What every pretraining method is: model + masking rule + loss, as a `Trainable`.

A method implements four members (`model`, `init_params`, `loss`, `features`); the base turns
them into the loop's protocol (`init_state`, `train_loss`). Beside training, a method keeps its
research API for evaluators, analysis and notebooks: `loss(train=False)`, `features` (one vector
per image), `eval_metrics` (held-out MIM loss) and, for methods that predict pixels,
`reconstruct`.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Optional

import flax.linen as nn
import jax

from mae_jax.trainable import Metrics, Params, Trainable


class Method(Trainable):
  """Model + masking + loss for one pretraining method (module `mae_jax/methods/<name>.py`)."""

  # Where the encoder's parameters live in the params tree; fine-tuning and export read it.
  encoder_key: str = "encoder"
  # Methods that predict pixels define `reconstruct(params, images, rng) -> {'pred_pixels'
  # [B, H, W, 3], 'mask' [B, H, W, 1]}` (held-out image panels, analysis); None: they do not.
  reconstruct: Optional[Callable] = None

  @staticmethod
  @abc.abstractmethod
  def check_config(config) -> None:
    """UserError (one line) for a value of the method's keys that cannot work. Builds nothing
    and reads no file: the run calls it before the data, the model or the workdir is touched;
    the constructor calls it too."""

  @property
  @abc.abstractmethod
  def model(self) -> nn.Module:
    """The Linen module whose parameters are trained."""

  @abc.abstractmethod
  def init_params(self, rng: jax.Array, images: jax.Array) -> Params:
    """Initial parameters for images of the shape of `images` ([B, H, W, 3])."""

  @abc.abstractmethod
  def loss(self, params: Params, batch: dict[str, jax.Array], rng: jax.Array,
           train: bool = True, step: Optional[jax.Array] = None) -> tuple[jax.Array, Metrics]:
    """Scalar loss to minimise and a dict of scalar metrics (with 'loss'). `batch` holds the
    global (micro-)batch, sharded over the mesh by jit; `step` is the optimizer step (None
    outside training: schedules inside a loss then take their starting value)."""

  @abc.abstractmethod
  def features(self, params: Params, images: jax.Array, pool: Optional[str] = None) -> jax.Array:
    """One feature vector per image, [B, D], from the encoder on all patches (no mask).

    `params` is the full pretraining tree (as `loss` takes it); `pool` names how tokens become
    one vector ('cls' or 'avg'; None: the method's default, the one its linear probe uses).
    Deterministic (no dropout, no drop-path): for k-NN, probes and analysis.
    """

  @property
  def encoder_module(self) -> nn.Module:
    """The encoder whose parameters are `params[encoder_key]` (fine-tuning rebuilds it)."""
    return self.model.encoder

  def init_state(self, rng: jax.Array, images: jax.Array) -> tuple[Params, Any]:
    return self.init_params(rng, images), {}

  def train_loss(self, params, model_state, batch, rng, step):
    loss, metrics = self.loss(params, batch, rng, train=True, step=step)
    return loss, (metrics, model_state)

  def eval_metrics(self, params: Params, model_state: Any, batch: dict[str, jax.Array],
                   rng: jax.Array, step: jax.Array) -> Metrics:
    """The loss's metrics without training noise (train=False, no update): the held-out MIM
    loss."""
    del model_state
    return self.loss(params, batch, rng, train=False, step=step)[1]
