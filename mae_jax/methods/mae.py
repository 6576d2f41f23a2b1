"""MAE (He et al. 2021): asymmetric encoder on visible patches, light decoder, pixel targets.

Follows the official facebookresearch/mae `models_mae.py`: random masking by argsort of noise,
encoder on the kept patches only, decoder with mask tokens, normalized-pixel target with the
unbiased per-patch variance, mean squared error on masked patches only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax import configlib, masking
from mae_jax.errors import UserError
from mae_jax.methods import base
from mae_jax.models.decoder import MAEDecoder
from mae_jax.models.vit import ViT, ViTSize, compute_of, parse_variant


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, h*w, p*p*C], pixel order (p, q, c) as the official `patchify`."""
  b, hh, ww, c = images.shape
  p = patch_size
  h, w = hh // p, ww // p
  x = images.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, p, q, c]
  return x.reshape(b, h * w, p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int]) -> jax.Array:
  """Inverse of `patchify`: [B, h*w, p*p*C] -> [B, h*p, w*p, C]."""
  b = patches.shape[0]
  h, w = grid
  p = patch_size
  c = patches.shape[-1] // (p * p)
  x = patches.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)


def pixel_targets(images: jax.Array, patch_size: int, norm_pix: bool) -> jax.Array:
  """Per-patch regression targets [B, L, p*p*3].

  With norm_pix, each patch is normalized by its own mean and UNBIASED variance (ddof=1, torch's
  `var` default used by the official code; jnp.var defaults to ddof=0), eps 1e-6.
  """
  target = patchify(images, patch_size).astype(jnp.float32)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def denormalize_patches(pred: jax.Array, images: jax.Array, patch_size: int,
                        norm_pix: bool) -> jax.Array:
  """Predicted patches [B, L, p*p*3] in `pixel_targets` space -> the pixel space of `images`.

  With norm_pix each patch is scaled back with the mean and unbiased variance of the TRUE patch
  (the inverse of `pixel_targets`, as MAE's visualization of normalized-pixel models); otherwise
  the prediction already is in pixels.
  """
  pred = pred.astype(jnp.float32)
  if not norm_pix:
    return pred
  target = patchify(images, patch_size).astype(jnp.float32)
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, ddof=1, keepdims=True)
  return pred * jnp.sqrt(var + 1e-6) + mean


def reconstruction(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
                   grid: tuple[int, int], norm_pix: bool) -> dict[str, jax.Array]:
  """The `reconstruct` hook's output from per-patch predictions and a patch mask [B, L]:
  {'pred_pixels': [B, H, W, 3] in the input's pixel space, 'mask': [B, H, W, 1], 1 = hidden}."""
  pixels = denormalize_patches(pred, images, patch_size, norm_pix)
  mask_patches = jnp.repeat(mask.astype(jnp.float32)[:, :, None], patch_size * patch_size, axis=2)
  return {"pred_pixels": unpatchify(pixels, patch_size, grid),
          "mask": unpatchify(mask_patches, patch_size, grid)}


def vit_features(method, params, images, pool, default: str, name: str) -> jax.Array:
  """[B, D] from `method`'s ViT encoder on all patches: the cls token ('cls') or the mean of the
  patch tokens ('avg'); `pool` None takes `default`; `name` names the method in the error."""
  pool = pool or default
  if pool not in ("cls", "avg"):
    raise UserError(f"{name} features pool must be 'cls' or 'avg', got {pool!r}")
  tokens = method.model.encoder.apply({"params": params[method.encoder_key]}, images)  # [B, 1+N, D]
  return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(axis=1)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over pixels per patch, then mean over masked patches: sum(l * m) / sum(m)."""
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)  # [B, L]
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAE(nn.Module):
  """Encoder on the kept patches + decoder over all positions."""
  encoder: ViT
  decoder: MAEDecoder

  def __call__(self, images, ids_keep, ids_restore, train: bool = False):
    latent = self.encoder(images, ids_keep, train=train)  # [B, 1 + N_vis, D]
    return self.decoder(latent, ids_restore)  # [B, L, p*p*3]


# DropPath divides by 1 - rate.
ENCODER_CHECKS = {"model.drop_path_rate": configlib.number("[0, 1)")}
DECODER_CHECKS = {
    "model.decoder_width": configlib.integer("[1, inf)"),
    "model.decoder_depth": configlib.integer("[0, inf)"),  # 0: embed, norm and the linear head.
    "model.decoder_heads": configlib.integer("[1, inf)"),
}
CHECKS = {"mask_ratio": configlib.number("(0, 1)"), "norm_pix_loss": configlib.BOOL,
          **ENCODER_CHECKS, **DECODER_CHECKS}


def vit_size(config) -> tuple[ViTSize, tuple[int, int]]:
  """The ViT size config.model.variant names and its patch grid (H / p, W / p) at
  config.image_size (S or (H, W)); UserError if they don't fit."""
  configlib.check(config, ENCODER_CHECKS)
  try:
    size = parse_variant(config.model.variant)
  except ValueError as e:
    raise UserError(f"config.model.variant: {e}") from None
  if size.patch_size < 1:
    raise UserError(f"config.model.variant={config.model.variant!r}: the patch size must be >= 1")
  grid = configlib.image_grid(config.image_size, size.patch_size)
  if grid is None:
    raise UserError(f"config.image_size={config.image_size} is not divisible by the patch size "
                    f"{size.patch_size} of config.model.variant={config.model.variant!r}")
  return size, grid


def vit_encoder(config) -> tuple[ViT, tuple[int, int]]:
  """The ViT named by config.model.variant (with config.model.drop_path_rate) and its patch grid
  at config.image_size; UserError if they don't fit."""
  _, grid = vit_size(config)
  encoder = ViT.from_variant(config.model.variant, drop_path_rate=config.model.drop_path_rate,
                             compute=compute_of(config))
  return encoder, grid


def check_decoder(config, sincos: bool = True) -> None:
  """config.model.decoder_*: sizes >= 1 (depth >= 0), the width split into the heads and, for a
  sin-cos position embedding (`sincos`), divisible by 4."""
  configlib.check(config, DECODER_CHECKS)
  m = config.model
  if (sincos and m.decoder_width % 4) or m.decoder_width % m.decoder_heads:
    raise UserError(f"config.model.decoder_width={m.decoder_width} must be divisible by "
                    f"{'4 and by ' if sincos else ''}config.model.decoder_heads={m.decoder_heads}")


def num_keep(config, num_patches: int, what: str = "patches") -> int:
  """`masking.num_visible` of config.mask_ratio; UserError unless at least one of the
  `num_patches` is kept and one masked (the encoder needs a token, the loss a masked one)."""
  keep = masking.num_visible(num_patches, config.mask_ratio)
  if not 1 <= keep < num_patches:
    raise UserError(f"config.mask_ratio={config.mask_ratio} keeps {keep} of the {num_patches} "
                    f"{what}; at least one must be kept and one masked")
  return keep


class Method(base.Method):
  """MAE pretraining: config.model.{variant, decoder_*}, config.mask_ratio, config.norm_pix_loss."""

  name = "mae"

  @staticmethod
  def check_config(config) -> None:
    configlib.check(config, CHECKS)
    _, grid = vit_size(config)
    num_keep(config, grid[0] * grid[1])
    check_decoder(config)

  def __init__(self, config, total_steps=None):
    super().__init__(config, total_steps)
    self.check_config(config)
    encoder, self.grid = vit_encoder(config)
    self.patch_size = encoder.patch_size
    self.num_patches = self.grid[0] * self.grid[1]
    self.num_keep = num_keep(config, self.num_patches)
    m = config.model
    decoder = MAEDecoder(width=m.decoder_width, depth=m.decoder_depth, num_heads=m.decoder_heads,
                         out_dim=self.patch_size**2 * 3, grid=self.grid,
                         compute=compute_of(config))
    self._model = MAE(encoder=encoder, decoder=decoder)

  @property
  def model(self) -> MAE:
    return self._model

  def draw_mask(self, rng: jax.Array, batch: int) -> masking.RandomMask:
    """config.masking: 'random' (official MAE) or 'block' (BEiT's, same number kept)."""
    return masking.draw_mask(self.config.get("masking", "random"), rng, batch, self.grid,
                             self.num_keep)

  def init_params(self, rng, images):
    m = self.draw_mask(rng, images.shape[0])
    return self.model.init({"params": rng}, images, m.ids_keep, m.ids_restore)["params"]

  def predict(self, params, images, rng, train: bool = False):
    """(pred [B, L, p*p*3], mask [B, L]) for one random mask drawn from `rng`."""
    mask_rng, drop_rng = jax.random.split(rng)
    m = self.draw_mask(mask_rng, images.shape[0])
    pred = self.model.apply({"params": params}, images, m.ids_keep, m.ids_restore, train=train,
                            rngs={"dropout": drop_rng})
    return pred, m.mask

  def reconstruct(self, params, images, rng) -> dict[str, jax.Array]:
    """Pixels predicted for one random mask (no dropout): see `reconstruction`."""
    pred, mask = self.predict(params, images, rng, train=False)
    return reconstruction(images, pred, mask, self.patch_size, self.grid,
                          self.config.norm_pix_loss)

  def features(self, params, images, pool=None):
    """cls token (default, the official linear probe's) or 'avg': mean of the patch tokens."""
    return vit_features(self, params, images, pool, "cls", "MAE")

  def loss(self, params, batch, rng, train=True, step=None):
    del step
    images = batch["image"]
    pred, mask = self.predict(params, images, rng, train=train)
    target = pixel_targets(images, self.patch_size, self.config.norm_pix_loss)
    loss = masked_mse(pred, target, mask)
    return loss, {"loss": loss}
