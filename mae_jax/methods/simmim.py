"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling").

Follows the official microsoft/SimMIM ViT path: the mask is drawn on a coarse mask-patch grid (32 px
at 224: 7x7 cells, ceil(0.6 * 49) = 30 masked) and repeated onto the token grid; a learnable mask
token replaces the masked patch embeddings (before the position embedding is added) and the
encoder's blocks see every token; a linear head predicts the p*p*3 pixels of each patch; the loss
is L1 on the (ImageNet-normalized) pixels of masked patches only,
sum(|x - x_hat| * M) / (sum(M) + 1e-5) / 3.

Differences from the official model, by choice: our ViT keeps the fixed sin-cos position embedding
and has no relative position bias or layer scale.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax import configlib, masking
from mae_jax.errors import UserError
from mae_jax.methods import base
from mae_jax.methods.mae import ENCODER_CHECKS, patchify, reconstruction, vit_features, vit_size
from mae_jax.models.vit import ViT, compute_of, dense_init

# timm's trunc_normal_(std=.02) (the official mask token init) cuts at +-2 absolute, i.e. at 100
# standard deviations: the same as a plain normal(0.02).
mask_token_init = nn.initializers.normal(stddev=0.02)


def masked_l1(pred: jax.Array, target: jax.Array, mask: jax.Array, channels: int = 3) -> jax.Array:
  """SimMIM's loss in patch form. pred, target [B, L, p*p*C], mask [B, L] (1 = masked).

  Official (pixel form, M [B, 1, H, W]): sum(|x - x_hat| * M) / (sum(M) + 1e-5) / C, where sum(M)
  counts masked pixels once (not per channel); here sum(M) = sum(mask) * p * p.
  """
  pixels_per_patch = pred.shape[-1] // channels
  per_patch = jnp.sum(jnp.abs(pred.astype(jnp.float32) - target), axis=-1)  # [B, L]
  masked_pixels = jnp.sum(mask) * pixels_per_patch
  return jnp.sum(per_patch * mask) / (masked_pixels + 1e-5) / channels


class SimMIM(nn.Module):
  """ViT on all tokens (masked ones replaced by `mask_token`) + linear per-patch pixel head.

  Params: 'encoder' (a plain ViT tree), 'mask_token' [1, 1, D], 'head' (Dense D -> p*p*3).
  """
  encoder: ViT

  @nn.compact
  def __call__(self, images, patch_mask, train: bool = False):
    """images [B, H, W, 3], patch_mask [B, L] (1 = masked) -> pixel predictions [B, L, p*p*3]."""
    mask_token = self.param("mask_token", mask_token_init, (1, 1, self.encoder.width))
    enc = self.encoder
    x = enc.embed_patches(images)  # [B, L, D]
    # Masked patch embeddings -> the mask token, before the position embedding is added (the
    # official VisionTransformerForSimMIM.forward).
    w = patch_mask.astype(x.dtype)[:, :, None]  # [B, L, 1]
    x = x * (1.0 - w) + mask_token.astype(x.dtype) * w
    pos = enc.position_embedding(enc.grid(images.shape[1:3]))  # [1, 1 + L, D]
    x = x + jnp.broadcast_to(pos[:, 1:], x.shape).astype(x.dtype)
    tokens = enc.encode(enc.prepend_cls(x, pos), train)  # [B, 1 + L, D]
    out_dim = enc.patch_size**2 * 3
    return nn.Dense(out_dim, kernel_init=dense_init, name="head")(tokens[:, 1:])  # [B, L, p*p*3]


CHECKS = {"mask_patch_size": configlib.integer("[1, inf)"),
          "mask_ratio": configlib.number("(0, 1)"), **ENCODER_CHECKS}


def mask_grid(config) -> tuple[tuple[int, int], int, int]:
  """((H / mask_patch_size, W / mask_patch_size) mask-cell grid, tokens per cell side, masked
  cells) of config.mask_patch_size and config.mask_ratio at config.image_size; UserError if
  they don't fit."""
  size, _ = vit_size(config)
  p, mp = size.patch_size, config.mask_patch_size
  if mp % p:
    raise UserError(f"config.mask_patch_size={mp} must be a positive multiple of the patch "
                    f"size {p} of config.model.variant={config.model.variant!r}")
  grid = configlib.image_grid(config.image_size, mp)
  if grid is None:
    raise UserError(f"config.image_size={config.image_size} is not divisible by "
                    f"config.mask_patch_size={mp}")
  cells = grid[0] * grid[1]
  # ceil, as the official MaskGenerator's mask_count.
  masked = int(math.ceil(cells * config.mask_ratio))
  if not 0 < masked < cells:
    raise UserError(f"config.mask_ratio={config.mask_ratio} masks {masked} of the {cells} mask "
                    "cells; mask at least one, keep at least one")
  return grid, mp // p, masked


class Method(base.Method):
  """SimMIM pretraining: config.model.{variant, drop_path_rate}, config.mask_patch_size,
  config.mask_ratio, config.masking ('random' | 'block', both on the mask-patch grid)."""

  name = "simmim"

  @staticmethod
  def check_config(config) -> None:
    configlib.check(config, CHECKS)
    mask_grid(config)

  def __init__(self, config, total_steps=None):
    super().__init__(config, total_steps)
    self.check_config(config)
    self.mask_grid, self.scale, self.num_masked_cells = mask_grid(config)
    gh, gw = self.mask_grid
    self.grid = (gh * self.scale, gw * self.scale)  # the token grid
    self.num_cells = gh * gw
    encoder = ViT.from_variant(config.model.variant, drop_path_rate=config.model.drop_path_rate,
                               compute=compute_of(config))
    self.patch_size = encoder.patch_size
    self._model = SimMIM(encoder=encoder)

  @property
  def model(self) -> SimMIM:
    return self._model

  def draw_mask(self, rng: jax.Array, batch: int) -> jax.Array:
    """[B, L] token mask (1 = masked): config.masking on the mask-cell grid, each cell repeated
    onto its scale x scale tokens (official SimMIM MaskGenerator)."""
    cells = masking.draw_mask(self.config.get("masking", "random"), rng, batch, self.mask_grid,
                              self.num_cells - self.num_masked_cells).mask  # [B, cells]
    tokens = masking.upsample_mask(cells, self.mask_grid, self.scale)  # [B, h, w, 1]
    return tokens.reshape(batch, -1)

  def init_params(self, rng, images):
    mask = self.draw_mask(rng, images.shape[0])
    return self.model.init({"params": rng}, images, mask)["params"]

  def predict(self, params, images, rng, train: bool = False):
    """(pred [B, L, p*p*3], mask [B, L])."""
    mask_rng, drop_rng = jax.random.split(rng)
    mask = self.draw_mask(mask_rng, images.shape[0])
    pred = self.model.apply({"params": params}, images, mask, train=train,
                            rngs={"dropout": drop_rng})
    return pred, mask

  def reconstruct(self, params, images, rng):
    """Pixels predicted for one mask (no dropout); SimMIM predicts raw pixels (no norm_pix)."""
    pred, mask = self.predict(params, images, rng, train=False)
    return reconstruction(images, pred, mask, self.patch_size, self.grid, norm_pix=False)

  def features(self, params, images, pool=None):
    """'avg' (default: the mean of the patch tokens; SimMIM's cls output is never trained, and
    its fine-tuning pools the average) or 'cls'."""
    return vit_features(self, params, images, pool, "avg", "SimMIM")

  def loss(self, params, batch, rng, train=True, step=None):
    del step
    images = batch["image"]  # already normalized with the dataset mean/std (ImageNet's)
    pred, mask = self.predict(params, images, rng, train=train)
    loss = masked_l1(pred, patchify(images, self.patch_size).astype(jnp.float32), mask)
    return loss, {"loss": loss}
