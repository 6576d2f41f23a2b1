"""Static-shape random masking."""

import jax
import jax.numpy as jnp
import numpy as np

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
