"""MAE method: patchify order, normalized-pixel target, masked loss, model wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mae as mae_config
from mae_jax.errors import UserError
from mae_jax.methods import get_method, mae


def tiny_config(**overrides):
  c = mae_config.get_config("tiny")
  c.unlock()
  c.model.variant = "Mu/8"
  c.model.decoder_depth = 1
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_patchify_order_and_inverse():
  images = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  p = mae.patchify(images, 2)
  assert p.shape == (2, 6, 12)
  # Patch (row 1, col 2) of image 0: pixels (p, q, c) in that order.
  expected = images[0, 2:4, 4:6, :].reshape(-1)
  np.testing.assert_array_equal(p[0, 1 * 3 + 2], expected)
  np.testing.assert_array_equal(mae.unpatchify(p, 2, (2, 3)), images)


def test_norm_pix_target_uses_unbiased_variance():
  images = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 3))
  t = mae.pixel_targets(images, 4, norm_pix=True)[0, 0]
  x = np.asarray(images[0]).reshape(-1)  # one patch covers the image; order irrelevant here
  expected_std = np.sqrt(x.var(ddof=1) + 1e-6)
  np.testing.assert_allclose(np.std(t, ddof=1), np.std(x, ddof=1) / expected_std, rtol=1e-5)
  np.testing.assert_allclose(t.mean(), 0, atol=1e-6)


def test_masked_mse_hand_computed():
  pred = jnp.zeros((1, 3, 2))
  target = jnp.array([[[1.0, 3.0], [2.0, 2.0], [10.0, 10.0]]])
  mask = jnp.array([[1.0, 1.0, 0.0]])
  # per-patch means: (1+9)/2 = 5, (4+4)/2 = 4, 100 (not masked) -> (5 + 4) / 2
  assert float(mae.masked_mse(pred, target, mask)) == pytest.approx(4.5)


def test_loss_and_shapes():
  method = get_method(tiny_config())
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  params = method.init_params(jax.random.PRNGKey(1), images)
  assert set(params) == {"encoder", "decoder"}
  pred, mask = method.predict(params, images, jax.random.PRNGKey(2))
  assert pred.shape == (4, 16, 8 * 8 * 3) and mask.shape == (4, 16)
  assert np.all(mask.sum(1) == 16 - method.num_keep) and method.num_keep == 4
  loss, metrics = method.loss(params, {"image": images}, jax.random.PRNGKey(2))
  assert np.isfinite(loss) and metrics["loss"] == loss
  # The loss sees only masked patches: changing predictions' targets at visible patches is moot.
  vis = (1 - mask)[:, :, None]
  target = mae.pixel_targets(images, 8, True)
  np.testing.assert_allclose(mae.masked_mse(pred, target, mask),
                             mae.masked_mse(pred, target + 5.0 * vis, mask), rtol=1e-6)


def test_decoder_is_independent_of_masked_pixels():
  method = get_method(tiny_config())
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = method.init_params(jax.random.PRNGKey(1), images)
  rng = jax.random.PRNGKey(5)
  pred, mask = method.predict(params, images, rng)
  # Add noise only inside masked patches: the prediction (a function of visible tokens) is equal.
  pix_mask = mae.unpatchify(jnp.repeat(mask[:, :, None], 8 * 8 * 3, axis=2), 8, (4, 4))
  noisy = images + pix_mask * jax.random.normal(jax.random.PRNGKey(9), images.shape)
  pred2, _ = method.predict(params, noisy, rng)
  np.testing.assert_allclose(pred, pred2, atol=1e-6)


@pytest.mark.parametrize("overrides,match", [
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_ratio=0.0), "mask_ratio"),
    (dict(image_size=30), "not divisible by the patch size"),
])
def test_bad_config(overrides, match):
  with pytest.raises(UserError, match=match):
    get_method(tiny_config(**overrides))


def test_unknown_method():
  with pytest.raises(UserError, match="unknown method"):
    get_method(tiny_config(method="nope"))
