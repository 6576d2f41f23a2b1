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

from mae_jax import masking
from mae_jax.errors import UserError
from mae_jax.methods import base
from mae_jax.methods.mae import patchify, reconstruction, vit_features
from mae_jax.models.vit import ViT, compute_of, dense_init, parse_variant

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


class Method(base.Method):
  """SimMIM pretraining: config.model.{variant, drop_path_rate}, config.mask_patch_size,
  config.mask_ratio, config.masking ('random' | 'block', both on the mask-patch grid)."""

  name = "simmim"

  def __init__(self, config, total_steps=None):
    super().__init__(config, total_steps)
    try:
      size = parse_variant(config.model.variant)
    except ValueError as e:
      raise UserError(f"config.model.variant: {e}") from None
    p, mp = size.patch_size, config.mask_patch_size
    if mp <= 0 or mp % p:
      raise UserError(f"config.mask_patch_size={mp} must be a positive multiple of the patch "
                      f"size {p} of config.model.variant={config.model.variant!r}")
    if config.image_size % mp:
      raise UserError(f"config.image_size={config.image_size} is not divisible by "
                      f"config.mask_patch_size={mp}")
    if not 0.0 < config.mask_ratio < 1.0:
      raise UserError(f"config.mask_ratio must be in (0, 1), got {config.mask_ratio}")
    self.patch_size = p
    self.scale = mp // p  # tokens per mask cell along each side
    g = config.image_size // mp
    self.mask_grid = (g, g)
    self.grid = (g * self.scale, g * self.scale)
    self.num_cells = g * g
    # ceil, as the official MaskGenerator's mask_count.
    self.num_masked_cells = int(math.ceil(self.num_cells * config.mask_ratio))
    if not 0 < self.num_masked_cells < self.num_cells:
      raise UserError(f"config.mask_ratio={config.mask_ratio} masks {self.num_masked_cells} of "
                      f"the {self.num_cells} mask cells; mask at least one, keep at least one")
    encoder = ViT.from_variant(config.model.variant, drop_path_rate=config.model.drop_path_rate,
                               compute=compute_of(config))
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
