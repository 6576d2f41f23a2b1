"""SimMIM: L1 loss, mask on the coarse mask-patch grid, mask tokens inside the encoder, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import simmim as simmim_config
from mae_jax.errors import UserError
from mae_jax.methods import get_method, mae, simmim
from mae_jax.models.vit import ViT


def tiny_config(**overrides):
  """16 px, Mu/4 (4x4 tokens), mask patch 8 (2x2 cells, ceil(0.6 * 4) = 3 masked)."""
  c = simmim_config.get_config("tiny")
  c.unlock()
  c.update(image_size=16)
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="module")
def tiny():
  """(method, initial params) of tiny_config(); one jitted init (eager init is slow on CPU)."""
  method = get_method(tiny_config())
  return method, jax.jit(method.init_params)(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))


def test_masked_l1_hand_computed():
  # One pixel per patch (p = 1), 3 channels; only patch 0 is masked.
  pred = jnp.zeros((1, 2, 3))
  target = jnp.array([[[1.0, -2.0, 3.0], [40.0, 50.0, 60.0]]])
  mask = jnp.array([[1.0, 0.0]])
  # sum |x - x_hat| over masked pixels and channels = 6; masked pixels = 1; / 3 channels.
  assert float(simmim.masked_l1(pred, target, mask)) == pytest.approx(6 / (1 + 1e-5) / 3)


def test_masked_l1_equals_the_official_pixel_form():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  x_rec = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  token_mask = (rng.random((2, 4)) < 0.5).astype(np.float32)  # 2x2 patches of 4 px
  pixel_mask = np.repeat(np.repeat(token_mask.reshape(2, 2, 2), 4, 1), 4, 2)[..., None]
  official = (np.abs(x - x_rec) * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3
  ours = simmim.masked_l1(mae.patchify(jnp.asarray(x_rec), 4), mae.patchify(jnp.asarray(x), 4),
                          jnp.asarray(token_mask))
  np.testing.assert_allclose(ours, official, rtol=1e-5)


@pytest.mark.parametrize("masking", ["random", "block"])
def test_mask_is_drawn_on_cells_and_repeated_onto_tokens(masking):
  # Paper geometry: 224 px, patch 16, mask patch 32 -> 7x7 cells, 30 masked, each 2x2 tokens.
  method = get_method(simmim_config.get_config("vit_b16"))
  with method.config.unlocked():
    method.config.masking = masking
  assert (method.mask_grid, method.grid, method.num_masked_cells) == ((7, 7), (14, 14), 30)
  mask = np.asarray(method.draw_mask(jax.random.PRNGKey(0), 8))
  assert mask.shape == (8, 196)
  np.testing.assert_array_equal(mask.sum(1), 30 * 4)  # exact count per image
  cells = mask.reshape(8, 7, 2, 7, 2)
  assert np.all(cells == cells[:, :, :1, :, :1])  # constant on each 2x2 cell
  assert len({tuple(r) for r in mask}) == 8
  # The CPU demo: 32 px, patch 4, mask patch 8 -> 4x4 cells, 10 masked = 40 of 64 tokens.
  demo = get_method(simmim_config.get_config("tiny"))
  np.testing.assert_array_equal(demo.draw_mask(jax.random.PRNGKey(1), 4).sum(1), 40)


def test_masked_pixels_do_not_reach_the_prediction(tiny):
  method, params = tiny
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  mask = method.draw_mask(jax.random.PRNGKey(2), 2)  # [2, 16], 12 masked each
  assert np.all(np.asarray(mask).sum(1) == 12)
  pix = mae.unpatchify(jnp.repeat(mask[:, :, None], 48, axis=2), 4, (4, 4))
  noise = jax.random.normal(jax.random.PRNGKey(3), images.shape)
  # One call: the images, noise in masked patches only, noise in visible patches only.
  batch = jnp.concatenate([images, images + pix * noise, images + (1 - pix) * noise])
  pred = jax.jit(method.model.apply)({"params": params}, batch, jnp.tile(mask, (3, 1)))
  pred = pred.reshape(3, 2, 16, 48)
  # Masked patches are replaced by the mask token: their pixels cannot change anything...
  np.testing.assert_allclose(pred[1], pred[0], atol=1e-5)
  # ...while the visible ones do (the whole sequence is encoded).
  assert not np.allclose(pred[2], pred[0], atol=1e-3)


def test_without_masked_patches_the_model_is_the_plain_encoder_and_head(tiny):
  # The mask-token edit is SimMIM's only change to the encoder's stages.
  method, params = tiny
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  pred = method.model.apply({"params": params}, images, jnp.zeros((2, 16)))
  tokens = method.model.encoder.apply({"params": params["encoder"]}, images)
  head = params["head"]
  np.testing.assert_allclose(pred, tokens[:, 1:] @ head["kernel"] + head["bias"], rtol=1e-5,
                             atol=1e-5)


def test_params_tree_and_encoder_is_a_plain_vit():
  c = tiny_config()
  method = get_method(c)
  images = jnp.zeros((1, 16, 16, 3))
  params = jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images)
  assert set(params) == {"encoder", "mask_token", "head"}
  assert params["mask_token"].shape == (1, 1, 128)
  assert params["head"]["kernel"].shape == (128, 4 * 4 * 3)
  vit = jax.eval_shape(ViT.from_variant(c.model.variant).init, jax.random.PRNGKey(0),
                       images)["params"]
  assert jax.tree.structure(params["encoder"]) == jax.tree.structure(vit)
  assert jax.tree.map(lambda a: a.shape, params["encoder"]) == jax.tree.map(lambda a: a.shape, vit)


def test_loss_goes_down_on_a_fixed_batch(tiny):
  method, params = tiny
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 3))
  tx = optax.adam(2e-3)

  @jax.jit
  def step(params, opt_state):
    (loss, _), grads = jax.value_and_grad(method.loss, has_aux=True)(
        params, {"image": images}, jax.random.PRNGKey(2))
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(25):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  feats = method.features(params, images)
  assert feats.shape == (8, 128) and method.features(params, images, "cls").shape == (8, 128)


@pytest.mark.parametrize("overrides,match", [
    ({"mask_patch_size": 6}, "multiple of the patch size"),
    ({"mask_patch_size": 2}, "multiple of the patch size"),
    ({"image_size": 20}, "not divisible by config.mask_patch_size"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"mask_ratio": 0.99}, "keep at least one"),  # ceil(0.99 * 4) = 4 of 4 cells
    ({"model.variant": "Q/4"}, "config.model.variant"),
])
def test_bad_config(overrides, match):
  with pytest.raises(UserError, match=match):
    get_method(tiny_config(**overrides))
