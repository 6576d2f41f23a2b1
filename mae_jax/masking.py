"""Static-shape masking: argsort of noise, then gather/scatter by index.

Every shape here is a Python int known at trace time (`num_keep` comes from the config), so the
jitted step never sees a data-dependent shape and never uses boolean indexing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RandomMask(NamedTuple):
  ids_keep: jax.Array  # [B, num_keep] int32: patch indices the encoder sees, in shuffled order.
  ids_restore: jax.Array  # [B, L] int32: position of each patch in the shuffled order.
  mask: jax.Array  # [B, L] float32: 1 = masked (removed), 0 = visible, in patch order.


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Visible patches per image: int(L * (1 - mask_ratio)), as the official MAE."""
  return int(num_patches * (1 - mask_ratio))


def random_mask(rng: jax.Array, batch: int, num_patches: int, num_keep: int) -> RandomMask:
  """Per-example uniform random masking (official MAE `random_masking`, without the gather).

  noise ~ U[0, 1); ids_shuffle = argsort(noise) (small noise is kept); ids_restore =
  argsort(ids_shuffle); mask = ones with the first num_keep zeroed, unshuffled by ids_restore.
  """
  noise = jax.random.uniform(rng, (batch, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  mask = (ids_restore >= num_keep).astype(jnp.float32)  # same as unshuffling [0]*keep + [1]*rest
  return RandomMask(ids_shuffle[:, :num_keep], ids_restore, mask)


def unshuffle(x_shuffled: jax.Array, ids_restore: jax.Array) -> jax.Array:
  """[B, L, D] tokens in shuffled order -> patch order, via ids_restore (static gather)."""
  return jnp.take_along_axis(x_shuffled, ids_restore[:, :, None], axis=1)


def upsample_mask(mask: jax.Array, grid: tuple[int, int], factor: int) -> jax.Array:
  """Nearest-neighbour upsampling of a patch mask onto a finer feature grid (ConvMAE).

  mask: [B, h*w] in patch order (row-major over the (h, w) grid), any values (ConvMAE passes
  1 = masked). Returns [B, h*factor, w*factor, 1] (NHWC, ready to multiply a feature map) where
  cell (i, j) holds mask[i // factor, j // factor]: the official ConvMAE's repeat/permute of
  the 14x14 mask to 28x28 (factor 2) and 56x56 (factor 4), for any grid.
  """
  h, w = grid
  m = mask.reshape(mask.shape[0], h, w)
  m = jnp.repeat(jnp.repeat(m, factor, axis=1), factor, axis=2)
  return m[..., None]
