"""The interface every pretraining method implements."""

from __future__ import annotations

import abc
from typing import Any, Optional

import flax.linen as nn
import jax

Params = Any
Metrics = dict[str, jax.Array]


class Method(abc.ABC):
  """Model + masking + loss for one pretraining method.

  The training loop calls `init_params` once and `loss` inside the jitted step. `loss` must use
  static shapes only; `batch` holds the global (micro-)batch, sharded over the mesh by jit.
  """

  # Where the encoder's parameters live in the params tree; fine-tuning and export read it.
  encoder_key: str = "encoder"

  def __init__(self, config):
    self.config = config

  @property
  @abc.abstractmethod
  def model(self) -> nn.Module:
    """The Linen module whose parameters are trained."""

  @abc.abstractmethod
  def init_params(self, rng: jax.Array, images: jax.Array) -> Params:
    """Initial parameters for images of the shape of `images` ([B, H, W, 3])."""

  @abc.abstractmethod
  def loss(self, params: Params, batch: dict[str, jax.Array], rng: jax.Array,
           train: bool = True) -> tuple[jax.Array, Metrics]:
    """Scalar loss to minimise and a dict of scalar metrics (with 'loss')."""

  @abc.abstractmethod
  def features(self, params: Params, images: jax.Array, pool: Optional[str] = None) -> jax.Array:
    """One feature vector per image, [B, D], from the encoder on all patches (no mask).

    `params` is the full pretraining tree (as `loss` takes it); `pool` names how tokens become
    one vector ('cls' or 'avg'; None: the method's default, the one its linear probe uses).
    Deterministic (no dropout, no drop-path): for k-NN, probes and analysis.
    """
