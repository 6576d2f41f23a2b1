"""What the training loop optimises: the `Trainable` protocol, and `Classifier` for trainables
with class logits.

The loop (`mae_jax.train.train_and_evaluate`) calls exactly these members and nothing else:

  init_state(rng, images)          -> (params, model_state): fresh weights; model_state is what
                                      the step carries without gradients ({} for most methods)
  initial_weights(params, state)   -> (params, model_state) replacing fresh ones when a run
                                      starts (not on resume), or None to keep them
  train_loss(params, model_state, batch, rng, step)
                                   -> (loss, (metrics, model_state)), inside the jitted step
  optimizer(schedule, params)      -> an optax transformation (`params` are abstract shapes)
  workdir_files()                  -> {file name: text} written beside config.json
  name                             -> printed in the run's summary line

A trainable is built with its run length (`total_steps`, None outside a training run), so a
schedule inside a loss needs nothing from the loop. Pretraining methods
(`mae_jax.methods.base.Method`) and the downstream tasks (`mae_jax.evaluate.finetune`,
`mae_jax.evaluate.linprobe`) implement it.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import jax
import optax

from mae_jax import optim

Params = Any
Metrics = dict[str, jax.Array]


class Trainable(abc.ABC):
  """Base of everything the loop trains; see the module docstring for the protocol."""

  name: str = ""

  def __init__(self, config, total_steps: Optional[int] = None):
    self.config = config
    self.total_steps = total_steps

  @abc.abstractmethod
  def init_state(self, rng: jax.Array, images: jax.Array) -> tuple[Params, Any]:
    """(trainable params, model state) for images shaped like `images` ([B, H, W, 3])."""

  @abc.abstractmethod
  def train_loss(self, params: Params, model_state: Any, batch: dict[str, jax.Array],
                 rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """(scalar loss, (metrics with 'loss', new model state)); static shapes only."""

  def initial_weights(self, params: Params, model_state: Any) -> Optional[tuple[Params, Any]]:
    del params, model_state
    return None

  def optimizer(self, schedule: optax.Schedule, params: Params) -> optax.GradientTransformation:
    """AdamW of config.optimizer (MAE's pretraining optimizer)."""
    del params
    return optim.adamw(schedule, self.config.optimizer)

  def workdir_files(self) -> dict[str, str]:
    return {}


class Classifier(Trainable):
  """A trainable that predicts `num_classes` class logits (the classification evaluator's)."""

  num_classes: int

  @abc.abstractmethod
  def logits(self, params: Params, model_state: Any, images: jax.Array) -> jax.Array:
    """Class logits [B, num_classes] in evaluation mode (no dropout, running statistics)."""
