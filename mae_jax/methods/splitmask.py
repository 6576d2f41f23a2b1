"""SplitMask (El-Nouby et al. 2021, "Are Large-scale Datasets Necessary for Self-Supervised
Pre-training?", arXiv 2112.10740; there is no official code).

Split, inpaint, match: the patches of each image are split into two disjoint halves A and B
(argsort of noise: the first L // 2 are A, the rest B; or BEiT blocks with config.masking='block');
one shared ViT encodes each half alone (no mask tokens, static shapes); a shallow decoder inpaints
B from A and A from B; each branch's decoder output tokens are average-pooled into a global
descriptor, and an InfoNCE loss matches the A and B descriptors of the same image against those of
every other image of the GLOBAL batch (under jit the loss sees the whole sharded batch as one
array, so the [B, B] similarity spans every device).

Ours vs the paper: pixel targets (MAE's normalized-pixel MSE) instead of BEiT visual tokens, whose
tokenizer cannot be downloaded here; cosine similarity with temperature config.nce_temperature and
the loss recon + config.nce_weight * InfoNCE (tau 0.2 and weight 1 are our choice: we could not
confirm the paper's values offline).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax import configlib, masking
from mae_jax.errors import UserError
from mae_jax.methods import base
from mae_jax.methods.mae import (DECODER_CHECKS, ENCODER_CHECKS, check_decoder, masked_mse,
                                 pixel_targets, reconstruction, vit_encoder, vit_features,
                                 vit_size)
from mae_jax.models.decoder import MAEDecoder
from mae_jax.models.vit import ViT, compute_of, dense_init


class Split(NamedTuple):
  """Two disjoint halves of the patches, each in MAE's (ids_keep, ids_restore) form."""
  ids_a: jax.Array  # [B, n_a] patches of half A
  restore_a: jax.Array  # [B, L]: A first, then B (the decoder's order for branch A)
  ids_b: jax.Array  # [B, n_b]
  restore_b: jax.Array  # [B, L]: B first, then A
  in_a: jax.Array  # [B, L] float32: 1 where the patch is in A (so 1 - in_a marks B)


def split_patches(kind: str, rng: jax.Array, batch: int, grid: tuple[int, int]) -> Split:
  """A = the num_keep = L // 2 visible patches of a `masking.draw_mask(kind)` mask, B = the rest."""
  num_patches = grid[0] * grid[1]
  n_a = num_patches // 2
  m = masking.draw_mask(kind, rng, batch, grid, n_a)
  ids_shuffle = jnp.argsort(m.ids_restore, axis=1).astype(jnp.int32)  # A (n_a), then B
  ids_b = ids_shuffle[:, n_a:]
  restore_b = jnp.argsort(jnp.concatenate([ids_b, m.ids_keep], axis=1), axis=1).astype(jnp.int32)
  return Split(m.ids_keep, m.ids_restore, ids_b, restore_b, 1.0 - m.mask)


def info_nce(x_a: jax.Array, x_b: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """(loss, top-1 accuracy) of InfoNCE (CPC) from A to B over the batch; x_a, x_b [B, D].

  loss = mean_i -log(exp(s_ii / tau) / sum_j exp(s_ij / tau)), s_ij = cos(x_a^i, x_b^j): the
  paper's L(x_a, x_b), the other images of the batch as negatives.
  """
  x_a = x_a.astype(jnp.float32)
  x_b = x_b.astype(jnp.float32)
  x_a = x_a / jnp.maximum(jnp.linalg.norm(x_a, axis=-1, keepdims=True), 1e-12)
  x_b = x_b / jnp.maximum(jnp.linalg.norm(x_b, axis=-1, keepdims=True), 1e-12)
  logits = jnp.einsum("id,jd->ij", x_a, x_b) / temperature  # [B, B]
  positive = jnp.diagonal(logits)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive)
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
  return loss, accuracy


class SplitMask(nn.Module):
  """Shared encoder on each half; decoder over all positions; pixel head; pooled descriptors.

  Params: 'encoder' (a plain ViT tree), 'decoder' (MAEDecoder whose output is the decoder token
  representation, decoder-width wide), 'head' (Dense to p*p*3 pixels).
  """
  encoder: ViT
  decoder: MAEDecoder
  out_dim: int

  @nn.compact
  def __call__(self, images, split: Split, train: bool = False):
    head = nn.Dense(self.out_dim, kernel_init=dense_init, name="head")
    outs = []
    for ids_keep, ids_restore in ((split.ids_a, split.restore_a), (split.ids_b, split.restore_b)):
      latent = self.encoder(images, ids_keep, train=train)  # [B, 1 + n, D]
      tokens = self.decoder(latent, ids_restore)  # [B, L, Dd], in patch order
      outs.append((head(tokens), tokens.mean(axis=1)))  # pixels [B, L, p*p*3], descriptor [B, Dd]
    return outs


CHECKS = {
    "norm_pix_loss": configlib.BOOL,
    "nce_temperature": configlib.number("(0, inf)"),
    "nce_weight": configlib.number("[0, inf)"),  # 0: inpainting alone.
    **ENCODER_CHECKS, **DECODER_CHECKS}


class Method(base.Method):
  """SplitMask pretraining: config.model.{variant, drop_path_rate, decoder_*},
  config.norm_pix_loss, config.nce_temperature, config.nce_weight, config.masking."""

  name = "splitmask"

  @staticmethod
  def check_config(config) -> None:
    configlib.check(config, CHECKS)
    _, (h, w) = vit_size(config)
    if h * w < 2:
      raise UserError(f"SplitMask needs at least 2 patches; config.image_size="
                      f"{config.image_size} gives {h * w}")
    check_decoder(config)

  def __init__(self, config, total_steps=None):
    super().__init__(config, total_steps)
    self.check_config(config)
    encoder, self.grid = vit_encoder(config)
    self.patch_size = encoder.patch_size
    self.num_patches = self.grid[0] * self.grid[1]
    m = config.model
    decoder = MAEDecoder(width=m.decoder_width, depth=m.decoder_depth, num_heads=m.decoder_heads,
                         out_dim=m.decoder_width, grid=self.grid, compute=compute_of(config))
    self._model = SplitMask(encoder=encoder, decoder=decoder, out_dim=self.patch_size**2 * 3)

  @property
  def model(self) -> SplitMask:
    return self._model

  def split(self, rng: jax.Array, batch: int) -> Split:
    return split_patches(self.config.get("masking", "random"), rng, batch, self.grid)

  def init_params(self, rng, images):
    return self.model.init({"params": rng}, images, self.split(rng, images.shape[0]))["params"]

  def features(self, params, images, pool=None):
    """'avg' (default: SplitMask pools patch tokens into its descriptors) or 'cls'."""
    return vit_features(self, params, images, pool, "avg", "SplitMask")

  def forward(self, params, images, rng, train: bool = False):
    """(split, [(pixels, descriptor) of branch A, of branch B]) for one split drawn from `rng`."""
    split_rng, drop_rng = jax.random.split(rng)
    split = self.split(split_rng, images.shape[0])
    return split, self.model.apply({"params": params}, images, split, train=train,
                                   rngs={"dropout": drop_rng})

  def reconstruct(self, params, images, rng):
    """Branch A's inpainting of half B (no dropout): B is the hidden part."""
    split, ((pred_a, _), _) = self.forward(params, images, rng)
    return reconstruction(images, pred_a, 1.0 - split.in_a, self.patch_size, self.grid,
                          self.config.norm_pix_loss)

  def loss(self, params, batch, rng, train=True, step=None):
    del step
    images = batch["image"]
    split, ((pred_a, x_a), (pred_b, x_b)) = self.forward(params, images, rng, train=train)
    target = pixel_targets(images, self.patch_size, self.config.norm_pix_loss)
    # Branch A inpaints B's patches, branch B inpaints A's.
    recon = 0.5 * (masked_mse(pred_a, target, 1.0 - split.in_a) +
                   masked_mse(pred_b, target, split.in_a))
    nce, nce_acc = info_nce(x_a, x_b, self.config.nce_temperature)
    loss = recon + self.config.nce_weight * nce
    return loss, {"loss": loss, "recon": recon, "nce": nce, "nce_acc": nce_acc}
