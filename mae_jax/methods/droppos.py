"""DropPos (Wang et al. 2023, "DropPos: Pre-Training Vision Transformers by Reconstructing Dropped
Positions"), following the official Haochen-Wang409/DropPos code.

Mask patches as MAE (gamma = 0.75, static gather); among the visible tokens, replace the position
embedding of gamma_pos = 0.75 of them by a learnable position mask token ([CLS] keeps its own);
a 2-block decoder without position embedding classifies each token's position among all N
(cross-entropy). Targets are smoothed by a Gaussian over 2-D grid distance,
W_ij = exp(-||p_i - p_j||^2 / sigma^2), each row normalized to sum 1 (the official code divides by
the column sums through broadcasting, a quirk we do not copy; W is symmetric, so only the
normalization axis differs); sigma decays linearly from config.sigma to 0 over training. Attentive
reconstruction weights each dropped token by its [CLS] affinity: without gradients, the encoder
sees the full image with true positions; softmax over patches of cos(CLS, patch) / tau, gathered
at the visible patches and renormalized. Logs pos_acc, the accuracy on the dropped positions.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import configlib, masking
from mae_jax.errors import UserError
from mae_jax.methods import base
from mae_jax.methods.mae import (DECODER_CHECKS, ENCODER_CHECKS, check_decoder, num_keep,
                                 vit_encoder, vit_features, vit_size)
from mae_jax.models.vit import (Compute, ViT, compute_of, dense_init, gather_tokens, run_blocks,
                                token_init)


def grid_sq_distances(grid: tuple[int, int]) -> np.ndarray:
  """[N, N] squared Euclidean distances between (row, col) cells, row-major patch order."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  coords = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1).astype(np.float32)  # [N, 2]
  return ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)


def smoothed_targets(grid: tuple[int, int], sigma) -> jax.Array:
  """[N, N] row-stochastic position targets: row i = exp(-d_ij^2 / sigma^2), normalized to sum 1.

  No factor 2 in the exponent (official DropPos). sigma -> 0 gives the identity (one-hot); sigma
  may be a traced scalar (it follows the schedule inside the jitted step).
  """
  d2 = jnp.asarray(grid_sq_distances(grid))
  sigma2 = jnp.maximum(jnp.asarray(sigma, jnp.float32) ** 2, 1e-12)  # d = 0 stays exp(0) = 1
  w = jnp.exp(-d2 / sigma2)
  return w / jnp.sum(w, axis=1, keepdims=True)


def sigma_schedule(sigma_max: float, step, total_steps: Optional[int]):
  """sigma = sigma_max * (1 - progress), progress = step / total_steps clipped to [0, 1]; the
  official (1 - epoch / epochs) * sigma_max, per step. Without a step or a total: sigma_max."""
  if step is None or not total_steps:
    return jnp.float32(sigma_max)
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  return sigma_max * (1.0 - progress)


def attentive_weights(tokens: jax.Array, ids_keep: jax.Array, tau: float) -> jax.Array:
  """[B, M] weights of the visible tokens from a full-image encoding `tokens` [B, 1 + N, D].

  softmax over all N patches of cos([CLS], patch) / tau, gathered at ids_keep [B, M], renormalized
  to sum 1 (official DropPos attentive reconstruction, tau 0.1).
  """
  tokens = tokens.astype(jnp.float32)
  tokens = tokens / jnp.maximum(jnp.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
  sim = jnp.einsum("bd,bnd->bn", tokens[:, 0], tokens[:, 1:])  # [B, N]
  attn = jax.nn.softmax(sim / tau, axis=1)
  attn = jnp.take_along_axis(attn, ids_keep, axis=1)  # [B, M]
  return attn / jnp.sum(attn, axis=1, keepdims=True)


def position_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_i w_i * CE(target_i, softmax(logits_i)) / sum_i w_i.

  logits, targets [B, M, N]; weights [B, M] (0 where the position was kept).
  """
  ce = -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


class PositionDecoder(nn.Module):
  """DropPos decoder: embed, blocks (no position embedding), norm, linear to N position logits.
  x [B, 1 + M, D_enc] -> [B, M, N] ([CLS] output discarded)."""
  width: int
  depth: int
  num_heads: int
  num_positions: int
  mlp_ratio: float = 4.0
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, kernel_init=dense_init, name="embed")(x)
    x = run_blocks(self, x, prefix="blocks", num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                   rates=[0.0] * self.depth, train=False, compute=self.compute)
    x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
    return nn.Dense(self.num_positions, kernel_init=dense_init, name="pred")(x)[:, 1:]


class DropPos(nn.Module):
  """Encoder on the kept tokens, some with the position mask token, + position decoder.

  Params: 'encoder' (a plain ViT tree), 'pos_mask_token' [1, 1, D], 'decoder'.
  """
  encoder: ViT
  decoder: PositionDecoder

  @nn.compact
  def __call__(self, images, ids_keep, pos_mask, train: bool = False):
    """images [B, H, W, 3], ids_keep [B, M], pos_mask [B, M] (1 = position dropped) -> position
    logits [B, M, N]."""
    pos_mask_token = self.param("pos_mask_token", token_init, (1, 1, self.encoder.width))
    enc = self.encoder
    x = enc.embed_patches(images)  # [B, N, D]
    pos = enc.position_embedding(enc.grid(images.shape[1:3]))  # [1, 1 + N, D]
    patch_pos = jnp.broadcast_to(pos[:, 1:], x.shape).astype(x.dtype)  # [B, N, D]
    x, patch_pos = gather_tokens(x, ids_keep), gather_tokens(patch_pos, ids_keep)  # [B, M, D]
    # The dropped positions: the position mask token instead ([CLS] keeps its own).
    w = pos_mask.astype(patch_pos.dtype)[:, :, None]  # [B, M, 1]
    patch_pos = patch_pos * (1.0 - w) + pos_mask_token.astype(patch_pos.dtype) * w
    x = enc.encode(enc.prepend_cls(x + patch_pos, pos), train)  # [B, 1 + M, D]
    return self.decoder(x)  # [B, M, N]


CHECKS = {
    "mask_ratio": configlib.number("(0, 1)"),
    "pos_mask_ratio": configlib.number("(0, 1]"),  # 1: every visible token loses its position.
    "sigma": configlib.number("[0, inf)"),  # 0: one-hot targets from the start.
    "attentive_tau": configlib.number("[0, inf)"),  # 0: plain average.
    **ENCODER_CHECKS, **DECODER_CHECKS}


def num_pos_keep(config, visible: int) -> int:
  """Visible tokens that keep their position: int(M * (1 - gamma_pos)) (12 of 49), as MAE's
  num_visible; UserError unless at least one of the `visible` loses it (the loss's tokens)."""
  keep = masking.num_visible(visible, config.pos_mask_ratio)
  if not keep < visible:
    raise UserError(f"config.pos_mask_ratio={config.pos_mask_ratio} drops the position of "
                    f"{visible - keep} of the {visible} visible tokens; at least one must be "
                    "dropped")
  return keep


class Method(base.Method):
  """DropPos pretraining: config.model.{variant, drop_path_rate, decoder_*}, config.mask_ratio,
  config.pos_mask_ratio, config.sigma, config.attentive_tau (0 = plain average), config.masking.

  `loss(..., step=None)`: with the training step (and `total_steps`: the run's length the method
  is built with, else config.total_steps) sigma follows its schedule; without, it stays at
  config.sigma.
  """

  name = "droppos"

  @staticmethod
  def check_config(config) -> None:
    configlib.check(config, CHECKS)
    _, grid = vit_size(config)
    num_pos_keep(config, num_keep(config, grid[0] * grid[1]))
    check_decoder(config, sincos=False)  # the position decoder has no position embedding.

  def __init__(self, config, total_steps=None):
    super().__init__(config, total_steps)
    self.check_config(config)
    encoder, self.grid = vit_encoder(config)
    self.num_patches = self.grid[0] * self.grid[1]
    self.num_keep = num_keep(config, self.num_patches)
    self.num_pos_keep = num_pos_keep(config, self.num_keep)
    m = config.model
    decoder = PositionDecoder(width=m.decoder_width, depth=m.decoder_depth,
                              num_heads=m.decoder_heads, num_positions=self.num_patches,
                              compute=compute_of(config))
    self._model = DropPos(encoder=encoder, decoder=decoder)
    # Steps of the whole run, for the sigma schedule: the run's plan, else the config's.
    self.total_steps: Optional[int] = total_steps or config.total_steps or None

  @property
  def model(self) -> DropPos:
    return self._model

  def draw_masks(self, rng: jax.Array, batch: int) -> tuple[masking.RandomMask, jax.Array]:
    """(patch mask, pos_mask [B, M] float32: 1 = position dropped, exactly M - num_pos_keep)."""
    patch_rng, pos_rng = jax.random.split(rng)
    m = masking.draw_mask(self.config.get("masking", "random"), patch_rng, batch, self.grid,
                          self.num_keep)
    pos = masking.random_mask(pos_rng, batch, self.num_keep, self.num_pos_keep)
    return m, pos.mask

  def init_params(self, rng, images):
    m, pos_mask = self.draw_masks(rng, images.shape[0])
    return self.model.init({"params": rng}, images, m.ids_keep, pos_mask)["params"]

  def sigma(self, step=None):
    return sigma_schedule(self.config.sigma, step, self.total_steps)

  def features(self, params, images, pool=None):
    """cls token (default, as MAE's linear probe) or 'avg': mean of the patch tokens."""
    return vit_features(self, params, images, pool, "cls", "DropPos")

  def predict(self, params, images, rng, train: bool = False):
    """(patch mask, pos_mask [B, M], position logits [B, M, N]) for masks drawn from `rng`."""
    mask_rng, drop_rng = jax.random.split(rng)
    m, pos_mask = self.draw_masks(mask_rng, images.shape[0])
    logits = self.model.apply({"params": params}, images, m.ids_keep, pos_mask, train=train,
                              rngs={"dropout": drop_rng})
    return m, pos_mask, logits

  def predict_positions(self, params, images, rng) -> dict[str, jax.Array]:
    """For analysis (no dropout): {'ids_keep' [B, M] true positions of the visible tokens,
    'pos_mask' [B, M] 1 = position dropped, 'pred_ids' [B, M] argmax of the position logits,
    'probs' [B, M, N] their softmax}."""
    m, pos_mask, logits = self.predict(params, images, rng)
    return {"ids_keep": m.ids_keep, "pos_mask": pos_mask,
            "pred_ids": jnp.argmax(logits, axis=-1).astype(jnp.int32),
            "probs": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)}

  def loss(self, params, batch, rng, train=True, step=None):
    images = batch["image"]
    m, pos_mask, logits = self.predict(params, images, rng, train=train)  # logits [B, M, N]
    sigma = self.sigma(step)
    targets = smoothed_targets(self.grid, sigma)[m.ids_keep]  # [B, M, N]
    weights = pos_mask
    if self.config.attentive_tau > 0:
      # The current encoder on the full image with true positions, without gradients.
      full = self.model.encoder.apply({"params": jax.lax.stop_gradient(params[self.encoder_key])},
                                      images)  # [B, 1 + N, D]
      weights = weights * attentive_weights(jax.lax.stop_gradient(full), m.ids_keep,
                                            self.config.attentive_tau)
    loss = position_loss(logits, targets, weights)
    correct = (jnp.argmax(logits, axis=-1) == m.ids_keep).astype(jnp.float32)
    pos_acc = jnp.sum(correct * pos_mask) / jnp.sum(pos_mask)
    return loss, {"loss": loss, "pos_acc": pos_acc, "sigma": jnp.asarray(sigma, jnp.float32)}
