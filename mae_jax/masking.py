"""Static-shape masking: argsort of noise, then gather/scatter by index.

Every shape here is a Python int known at trace time (`num_keep` comes from the config), so the
jitted step never sees a data-dependent shape and never uses boolean indexing.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

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


# --- Block-wise masking (BEiT, microsoft/unilm beit/masking_generator.py). ---------------------

# BEiT's block proposal: area ~ U[min_num_patches, remaining], log aspect ~ U[log 0.3, log 1/0.3],
# up to 10 tries per block.
BLOCK_MIN_ASPECT = 0.3
BLOCK_ATTEMPTS = 10


def block_min_patches(num_patches: int) -> int:
  """Smallest block area for a grid of `num_patches`: BEiT's 16 at 14x14 = 196 patches, scaled
  by area for other grids (our choice: 16 cells cannot fit in a 4x4 grid under h < H, w < W)."""
  return max(1, round(16 * num_patches / 196))


def _block_mask_one(rng: jax.Array, grid_h: int, grid_w: int, num_masked: int,
                    min_num_patches: int, max_num_patches: int,
                    min_aspect: float) -> jax.Array:
  """BEiT's generator for one image -> [grid_h, grid_w] float32 (1 = masked), < num_masked set
  only when it stops early (a block that adds nothing ends it, as in BEiT).

  BEiT's 10 sequential tries of one block are independent draws against an unchanged mask, and
  the first acceptable one is applied: here the 10 are drawn at once and the first valid is taken.
  The block loop is a `lax.while_loop` (each accepted block adds >= 1 patch, so it ends).
  """
  rows = jnp.arange(grid_h)[None, :, None]  # [1, H, 1]
  cols = jnp.arange(grid_w)[None, None, :]  # [1, 1, W]
  log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)

  def add_block(state):
    mask, count, _, it = state
    remaining = jnp.minimum(num_masked - count, max_num_patches).astype(jnp.float32)
    k_area, k_ratio, k_top, k_left = jax.random.split(jax.random.fold_in(rng, it), 4)
    shape = (BLOCK_ATTEMPTS,)
    # random.uniform(a, b) = a + (b - a) * u, also when b < a (BEiT's case near the end).
    area = min_num_patches + (remaining - min_num_patches) * jax.random.uniform(k_area, shape)
    ratio = jnp.exp(jax.random.uniform(k_ratio, shape, minval=log_lo, maxval=log_hi))
    h = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32)  # round half to even, as Python's.
    w = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32)
    fits = (h < grid_h) & (w < grid_w)
    # random.randint(0, H - h): uniform over the H - h + 1 top rows (clipped where h does not fit).
    top = jnp.floor(jax.random.uniform(k_top, shape) * jnp.maximum(grid_h - h + 1, 1))
    left = jnp.floor(jax.random.uniform(k_left, shape) * jnp.maximum(grid_w - w + 1, 1))
    top, left = top.astype(jnp.int32)[:, None, None], left.astype(jnp.int32)[:, None, None]
    block = ((rows >= top) & (rows < top + h[:, None, None]) &
             (cols >= left) & (cols < left + w[:, None, None]))  # [10, H, W]
    new = jnp.sum(block & (mask[None] == 0), axis=(1, 2))  # patches a block would add
    ok = fits & (new > 0) & (new <= remaining)
    first = jnp.argmax(ok)  # the first acceptable try
    accepted = ok[first]
    mask = jnp.where(accepted & block[first], 1.0, mask)
    return mask, count + jnp.where(accepted, new[first], 0), ~accepted, it + 1

  def going(state):
    _, count, stopped, _ = state
    return (count < num_masked) & ~stopped

  init = (jnp.zeros((grid_h, grid_w), jnp.float32), jnp.int32(0), jnp.bool_(False), jnp.int32(0))
  return jax.lax.while_loop(going, add_block, init)[0]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7))
def block_mask(rng: jax.Array, batch: int, grid_h: int, grid_w: int, num_masked: int,
               min_num_patches: Optional[int] = None, max_num_patches: Optional[int] = None,
               min_aspect: float = BLOCK_MIN_ASPECT) -> RandomMask:
  """BEiT block-wise masking with exactly `num_masked` masked patches per image (static shapes).

  Each image runs BEiT's generator (`_block_mask_one`); where it stops short of `num_masked`,
  random unmasked patches top it up (BEiT itself returns fewer; a fixed count keeps shapes
  static). Returns `random_mask`'s structure: ids_keep lists the visible patches (random order),
  ids_restore puts the visible first, so `ids_restore < num_keep` marks exactly the visible ones.
  Defaults: min_num_patches = block_min_patches(L) (16 at 14x14, BEiT's), max_num_patches = no cap.
  """
  num_patches = grid_h * grid_w
  if not 0 < num_masked < num_patches:
    raise ValueError(f"block_mask needs 0 < num_masked < {num_patches}, got {num_masked}")
  min_num_patches = min_num_patches or block_min_patches(num_patches)
  max_num_patches = max_num_patches or num_masked
  k_blocks, k_fill, k_order = jax.random.split(rng, 3)
  blocks = jax.vmap(lambda k: _block_mask_one(k, grid_h, grid_w, num_masked, min_num_patches,
                                              max_num_patches, min_aspect))(
      jax.random.split(k_blocks, batch)).reshape(batch, num_patches)  # [B, L]
  # Exact count: rank blocks first, then random others; the first num_masked are masked.
  fill = jax.random.uniform(k_fill, (batch, num_patches))
  by_mask = jnp.argsort(-(blocks * 2.0 + fill), axis=1)
  ranks = jnp.argsort(by_mask, axis=1)
  mask = (ranks < num_masked).astype(jnp.float32)  # [B, L], exactly num_masked ones per row
  # Shuffled order: visible patches (random order) then masked ones, as random_mask's.
  order = jax.random.uniform(k_order, (batch, num_patches)) + mask * 2.0
  ids_shuffle = jnp.argsort(order, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  num_keep = num_patches - num_masked
  return RandomMask(ids_shuffle[:, :num_keep], ids_restore, mask)


def draw_mask(kind: str, rng: jax.Array, batch: int, grid: tuple[int, int],
              num_keep: int) -> RandomMask:
  """`config.masking` -> a mask with `num_keep` visible patches per image: 'random' (MAE's
  argsort of noise) or 'block' (BEiT's block-wise masking, exact count)."""
  num_patches = grid[0] * grid[1]
  if kind == "random":
    return random_mask(rng, batch, num_patches, num_keep)
  if kind == "block":
    return block_mask(rng, batch, grid[0], grid[1], num_patches - num_keep)
  raise ValueError(f"unknown masking {kind!r}; expected 'random' or 'block'")
