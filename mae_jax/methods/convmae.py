"""ConvMAE (Gao et al. 2022, "ConvMAE: Masked Convolution Meets Masked Autoencoders").

Follows the official Alpha-VL/ConvMAE `models_convmae.py`: MAE's random mask drawn on the stage-3
grid (one token per 16x16 pixels), masked convolutions in stages 1-2 (the mask upsampled x4 and
x2), the transformer stage on the kept tokens only, multi-scale fusion of the stage-1/2 features,
MAE's decoder without a cls token, and MAE's loss on masked 16x16 patches (normalized pixels,
unbiased variance). Masking, prediction and loss are MAE's own code (`mae.Method`); only the
encoder and the config checks differ.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mae_jax import configlib
from mae_jax.errors import UserError
from mae_jax.methods import base, mae
from mae_jax.models import convvit
from mae_jax.models.convvit import PATCH_SIZE, ConvMAEEncoder
from mae_jax.models.decoder import MAEDecoder
from mae_jax.models.vit import compute_of


class ConvMAE(nn.Module):
  """Masked hybrid encoder on the kept stage-3 tokens + MAE decoder over all positions."""
  encoder: ConvMAEEncoder
  decoder: MAEDecoder

  def __call__(self, images, ids_keep, ids_restore, train: bool = False):
    # masking.random_mask's mask (1 = masked): the patches shuffled past the kept ones.
    mask = (ids_restore >= ids_keep.shape[1]).astype(jnp.float32)  # [B, L]
    latent = self.encoder(images, ids_keep, mask, train=train)  # [B, N_vis, w3]
    return self.decoder(latent, ids_restore)  # [B, L, 16*16*3]


def check_model_config(config) -> convvit.ConvViTSize:
  """The size config.model.variant names and config.image_size at the stage strides; UserError
  for values that cannot work."""
  configlib.check(config, mae.CHECKS)
  try:
    size = convvit.get_size(config.model.variant)
  except ValueError as e:
    raise UserError(f"config.model.variant: {e}") from None
  if config.model.dwconv_impl not in convvit.DWCONV_IMPLS:
    raise UserError(f"config.model.dwconv_impl={config.model.dwconv_impl!r} is not one of "
                    f"{convvit.DWCONV_IMPLS}")
  if configlib.image_grid(config.image_size, PATCH_SIZE) is None:
    raise UserError(f"config.image_size={config.image_size} is not a multiple of {PATCH_SIZE}, "
                    "the pixels per ConvMAE stage-3 token (strides "
                    f"{' x '.join(map(str, convvit.STRIDES))})")
  mae.check_decoder(config)
  return size


class Method(mae.Method):
  """ConvMAE pretraining: config.model.{variant, dwconv_impl, decoder_*}, config.mask_ratio,
  config.norm_pix_loss.

  Inherits MAE's draw_mask / init_params / predict / loss: the ConvMAE module takes the same
  (images, ids_keep, ids_restore) and the targets are MAE's, with 16x16 patches.
  """

  name = "convmae"

  @staticmethod
  def check_config(config) -> None:
    check_model_config(config)
    h, w = configlib.image_grid(config.image_size, PATCH_SIZE)
    mae.num_keep(config, h * w, "stage-3 tokens")

  def __init__(self, config, total_steps=None):
    base.Method.__init__(self, config, total_steps)  # not mae.Method's: that one builds a ViT.
    size = check_model_config(config)
    self.grid = configlib.image_grid(config.image_size, PATCH_SIZE)  # (H / 16, W / 16)
    self.patch_size = PATCH_SIZE
    self.num_patches = self.grid[0] * self.grid[1]
    self.num_keep = mae.num_keep(config, self.num_patches, "stage-3 tokens")
    m = config.model
    encoder = ConvMAEEncoder(widths=size.widths, depths=size.depths, num_heads=size.num_heads,
                             drop_path_rate=m.drop_path_rate, dwconv_impl=m.dwconv_impl,
                             compute=compute_of(config))
    decoder = MAEDecoder(width=m.decoder_width, depth=m.decoder_depth, num_heads=m.decoder_heads,
                         out_dim=PATCH_SIZE**2 * 3, grid=self.grid, has_cls=False,
                         compute=compute_of(config))
    self._model = ConvMAE(encoder=encoder, decoder=decoder)

  def features(self, params, images, pool=None):
    """Mean of all stage-3 tokens (ConvMAE has no cls token; its linear probe averages)."""
    if (pool or "avg") != "avg":
      raise UserError(f"ConvMAE features pool must be 'avg' (there is no cls token), got {pool!r}")
    tokens = self.model.encoder.apply({"params": params[self.encoder_key]}, images)  # [B, h*w, D]
    return tokens.mean(axis=1)
