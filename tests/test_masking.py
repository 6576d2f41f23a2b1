"""Static-shape masking: random (MAE) and block-wise (BEiT)."""

import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import masking


def test_shapes_and_partition():
  b, length, keep = 4, 49, 12
  m = masking.random_mask(jax.random.PRNGKey(0), b, length, keep)
  assert m.ids_keep.shape == (b, keep) and m.ids_restore.shape == (b, length)
  assert m.mask.shape == (b, length) and m.ids_keep.dtype == jnp.int32
  for i in range(b):
    kept = set(np.asarray(m.ids_keep[i]).tolist())
    masked = set(np.flatnonzero(np.asarray(m.mask[i])).tolist())
    assert len(kept) == keep and len(masked) == length - keep
    assert kept.isdisjoint(masked) and kept | masked == set(range(length))


def test_restore_inverts_shuffle_and_masks_differ_per_example():
  m = masking.random_mask(jax.random.PRNGKey(1), 8, 16, 4)
  x = jnp.arange(16)[None, :, None].repeat(8, 0)  # token i carries value i
  # Shuffled order = kept ids then the masked ids; unshuffling must give back patch order.
  ids_shuffle = jnp.argsort(m.ids_restore, axis=1)
  shuffled = jnp.take_along_axis(x, ids_shuffle[:, :, None], axis=1)
  np.testing.assert_array_equal(masking.unshuffle(shuffled, m.ids_restore), x)
  np.testing.assert_array_equal(ids_shuffle[:, :4], m.ids_keep)
  assert len({tuple(np.asarray(r)) for r in m.mask}) == 8


def test_reproducible_from_seed_and_num_visible():
  a = masking.random_mask(jax.random.PRNGKey(3), 2, 196, 49)
  b = masking.random_mask(jax.random.PRNGKey(3), 2, 196, 49)
  np.testing.assert_array_equal(a.ids_keep, b.ids_keep)
  assert masking.num_visible(196, 0.75) == 49
  assert masking.num_visible(64, 0.75) == 16
  assert masking.num_visible(256, 0.6) == 102  # int(), not round(): official len_keep


def test_jit_static_shapes():
  f = jax.jit(lambda k: masking.random_mask(k, 3, 36, 9))
  m = f(jax.random.PRNGKey(0))
  assert m.ids_keep.shape == (3, 9)


# --- Block-wise masking (BEiT). -------------------------------------------------------------------

def _beit_reference(rng, grid_h, grid_w, num_masked, min_num_patches=16, min_aspect=0.3):
  """BEiT's MaskingGenerator, re-written from its description in pure Python (the oracle)."""
  mask = np.zeros((grid_h, grid_w), int)
  count = 0
  lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
  while count < num_masked:
    remaining, delta = num_masked - count, 0
    for _ in range(10):
      area = rng.uniform(min_num_patches, remaining)
      ratio = math.exp(rng.uniform(lo, hi))
      h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
      if w < grid_w and h < grid_h:
        top, left = rng.randint(0, grid_h - h), rng.randint(0, grid_w - w)
        new = h * w - mask[top:top + h, left:left + w].sum()
        if 0 < new <= remaining:
          mask[top:top + h, left:left + w] = 1
          delta = new
          break
    if delta == 0:
      break
    count += delta
  return mask


@pytest.mark.parametrize("grid,num_masked", [((14, 14), 75), ((7, 7), 30), ((3, 5), 1)])
def test_block_mask_exact_count_and_partition(grid, num_masked):
  b = 16
  length = grid[0] * grid[1]
  m = masking.block_mask(jax.random.PRNGKey(0), b, *grid, num_masked)
  keep = length - num_masked
  assert m.ids_keep.shape == (b, keep) and m.ids_restore.shape == (b, length)
  mask = np.asarray(m.mask)
  np.testing.assert_array_equal(mask.sum(1), num_masked)  # exact, every image
  for i in range(b):
    kept = set(np.asarray(m.ids_keep[i]).tolist())
    masked = set(np.flatnonzero(mask[i]).tolist())
    assert len(kept) == keep and kept.isdisjoint(masked) and kept | masked == set(range(length))
  # random_mask's contract: visible patches come first in the shuffled order.
  np.testing.assert_array_equal(np.asarray(m.ids_restore) >= keep, mask == 1)


def test_block_mask_follows_beit_generator_statistics():
  # Before the top-up, our generator and BEiT's stop short of 75 with the same probability and
  # leave the same mean count (stopping is the rare, distribution-sensitive event).
  n = 2000
  ours = jax.jit(jax.vmap(lambda k: masking._block_mask_one(k, 14, 14, 75, 16, 75, 0.3)))(
      jax.random.split(jax.random.PRNGKey(0), n))
  ours = np.asarray(ours.sum(axis=(1, 2)))
  py_rng = random.Random(0)
  ref = np.array([_beit_reference(py_rng, 14, 14, 75).sum() for _ in range(n)])
  assert ours.max() <= 75 and ref.max() <= 75
  assert abs(ours.mean() - ref.mean()) < 0.4, (ours.mean(), ref.mean())
  assert abs((ours == 75).mean() - (ref == 75).mean()) < 0.06


def test_block_mask_is_blocky_not_uniform():
  # Masked patches cluster: far more masked 4-neighbours than under a uniform random mask.
  def neighbour_agreement(mask, grid):
    m = mask.reshape(-1, *grid)
    return ((m[:, 1:] == m[:, :-1]).mean() + (m[:, :, 1:] == m[:, :, :-1]).mean()) / 2
  k = jax.random.PRNGKey(3)
  block = np.asarray(masking.block_mask(k, 16, 14, 14, 75).mask)  # compiled above: same shapes
  uniform = np.asarray(masking.random_mask(k, 16, 196, 121).mask)
  assert neighbour_agreement(block, (14, 14)) > 0.75 > 0.6 > neighbour_agreement(uniform,
                                                                                  (14, 14))


def test_block_mask_reproducible_and_differs_per_example():
  a = masking.block_mask(jax.random.PRNGKey(5), 4, 8, 8, 48)
  b = masking.block_mask(jax.random.PRNGKey(5), 4, 8, 8, 48)
  np.testing.assert_array_equal(a.mask, b.mask)
  assert len({tuple(r) for r in np.asarray(a.mask)}) == 4
  assert masking.block_min_patches(196) == 16 and masking.block_min_patches(16) == 1


def test_draw_mask_dispatch_and_config_validation():
  from configs import mae as mae_config
  from mae_jax import configlib
  from mae_jax.errors import UserError
  from mae_jax.methods import get_method
  m = masking.draw_mask("block", jax.random.PRNGKey(0), 4, (8, 8), 16)
  assert m.ids_keep.shape == (4, 16) and np.all(np.asarray(m.mask).sum(1) == 48)
  with pytest.raises(ValueError, match="masking"):
    masking.draw_mask("grid", jax.random.PRNGKey(0), 2, (8, 8), 16)
  c = mae_config.get_config("tiny")
  assert c.masking == "random"
  c.masking = "block"
  configlib.validate_common(c)
  method = get_method(c)
  mm = method.draw_mask(jax.random.PRNGKey(1), 4)
  np.testing.assert_array_equal(np.asarray(mm.mask).sum(1), 64 - method.num_keep)
  assert np.array_equal(mm.mask, masking.block_mask(jax.random.PRNGKey(1), 4, 8, 8, 48).mask)
  c.masking = "blocks"
  with pytest.raises(UserError, match="config.masking must be one of"):
    configlib.validate_common(c)
