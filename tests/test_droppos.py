"""DropPos: smoothed position targets, sigma schedule, loss, attentive weights, masks, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import droppos as droppos_config
from mae_jax.errors import UserError
from mae_jax.methods import droppos, get_method
from mae_jax.models.vit import ViT


def tiny_config(**overrides):
  """16 px, Mu/4: 16 patches, 4 visible, 3 of them without position; decoder 64 x 1 block."""
  c = droppos_config.get_config("tiny")
  c.unlock()
  c.update(image_size=16)
  c.model.decoder_depth = 1
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="module")
def tiny():
  method = get_method(tiny_config())
  return method, jax.jit(method.init_params)(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))


def test_smoothed_targets_hand_computed_rows_sum_to_one_and_sigma_zero_is_one_hot():
  # 2x2 grid, sigma 1: from cell 0 the squared distances are [0, 1, 1, 2] (no factor 2).
  t = np.asarray(droppos.smoothed_targets((2, 2), 1.0))
  w = np.exp(-np.array([0.0, 1.0, 1.0, 2.0]))
  np.testing.assert_allclose(t[0], w / w.sum(), rtol=1e-6)
  for sigma in (0.3, 1.0, 2.5):
    t = np.asarray(droppos.smoothed_targets((4, 5), sigma))
    assert t.shape == (20, 20)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all(np.argmax(t, axis=1) == np.arange(20))  # the true cell weighs most
  for sigma in (0.0, 1e-3):
    np.testing.assert_array_equal(droppos.smoothed_targets((4, 5), sigma), np.eye(20))
  # Traced sigma (the schedule inside the jitted step) gives the same.
  np.testing.assert_allclose(jax.jit(lambda s: droppos.smoothed_targets((4, 5), s))(1.0),
                             droppos.smoothed_targets((4, 5), 1.0), rtol=1e-6)


def test_sigma_schedule_linear_from_sigma_to_zero():
  s = [float(droppos.sigma_schedule(1.0, step, 200)) for step in (0, 50, 100, 200, 300)]
  np.testing.assert_allclose(s, [1.0, 0.75, 0.5, 0.0, 0.0])
  assert float(droppos.sigma_schedule(2.0, 10, 40)) == pytest.approx(1.5)
  assert float(droppos.sigma_schedule(1.0, None, 200)) == 1.0  # no step: the start value
  assert float(droppos.sigma_schedule(1.0, 50, None)) == 1.0  # no run length known
  method = get_method(tiny_config(total_steps=10))
  assert method.total_steps == 10 and float(method.sigma(5)) == pytest.approx(0.5)


def test_position_loss_hand_computed():
  logits = jnp.array([[[0.0, np.log(3.0)], [0.0, 0.0]]])  # softmax [1/4, 3/4] and [1/2, 1/2]
  targets = jnp.array([[[0.0, 1.0], [1.0, 0.0]]])
  weights = jnp.array([[1.0, 3.0]])
  expected = (1 * -np.log(0.75) + 3 * np.log(2.0)) / 4
  assert float(droppos.position_loss(logits, targets, weights)) == pytest.approx(expected)
  # Tokens of weight 0 (position kept) do not count.
  assert float(droppos.position_loss(logits, targets, jnp.array([[1.0, 0.0]]))) == \
      pytest.approx(-np.log(0.75))


def test_attentive_weights_hand_computed():
  # [CLS] = (1, 0); patches at cosine 1, 0, -1 from it; tau 1; visible patches 0 and 2.
  tokens = jnp.array([[[2.0, 0.0], [1.0, 0.0], [0.0, 5.0], [-3.0, 0.0]]])
  w = droppos.attentive_weights(tokens, jnp.array([[0, 2]]), tau=1.0)
  e = np.exp([1.0, -1.0])
  np.testing.assert_allclose(w, [e / e.sum()], rtol=1e-6)


@pytest.mark.parametrize("masking", ["random", "block"])
def test_masks_partition_patches_and_drop_exact_positions(masking):
  # Paper geometry: 196 patches, 49 visible, 37 of them without position.
  method = get_method(droppos_config.get_config("vit_b16"))
  with method.config.unlocked():
    method.config.masking = masking
  assert (method.num_keep, method.num_keep - method.num_pos_keep) == (49, 37)
  m, pos_mask = method.draw_masks(jax.random.PRNGKey(0), 4)
  pos_mask = np.asarray(pos_mask)
  assert m.ids_keep.shape == (4, 49) and pos_mask.shape == (4, 49)
  np.testing.assert_array_equal(pos_mask.sum(1), 37)
  np.testing.assert_array_equal(np.asarray(m.mask).sum(1), 147)
  for i in range(4):
    kept = set(np.asarray(m.ids_keep[i]).tolist())
    assert len(kept) == 49 and kept.isdisjoint(np.flatnonzero(np.asarray(m.mask[i])).tolist())
  assert len({tuple(r) for r in pos_mask}) == 4


def test_dropped_tokens_carry_no_position(tiny):
  # Two visible patches with the same pixels: without positions (both dropped) the model cannot
  # tell them apart, so their logits are equal; with their true positions they differ.
  method, params = tiny
  images = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3))
  images = images.at[:, 12:16, 12:16].set(images[:, 0:4, 0:4])  # patch 15 := patch 0
  ids_keep = jnp.array([[0, 15, 5, 10], [0, 15, 5, 10]])
  pos_mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
  logits = jax.jit(method.model.apply)({"params": params}, jnp.tile(images, (2, 1, 1, 1)),
                                       ids_keep, pos_mask)  # [2, 4, 16]
  np.testing.assert_allclose(logits[0, 0], logits[0, 1], atol=1e-5)
  assert not np.allclose(logits[1, 0], logits[1, 1], atol=1e-3)


def test_with_all_positions_kept_the_encoder_is_the_plain_masked_vit(tiny):
  # The position-mask-token edit is DropPos's only change to the encoder's stages.
  method, params = tiny
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  ids_keep = jnp.array([[0, 15, 5, 10], [3, 2, 1, 12]])
  logits = method.model.apply({"params": params}, images, ids_keep, jnp.zeros((2, 4)))
  tokens = method.model.encoder.apply({"params": params["encoder"]}, images, ids_keep)
  want = method.model.decoder.apply({"params": params["decoder"]}, tokens)
  np.testing.assert_array_equal(logits, want)


def test_params_tree_and_encoder_is_a_plain_vit():
  c = tiny_config()
  images = jnp.zeros((1, 16, 16, 3))
  params = jax.eval_shape(get_method(c).init_params, jax.random.PRNGKey(0), images)
  assert set(params) == {"encoder", "pos_mask_token", "decoder"}
  assert params["decoder"]["pred"]["kernel"].shape == (64, 16)  # logits over all 16 positions
  vit = jax.eval_shape(ViT.from_variant(c.model.variant).init, jax.random.PRNGKey(0),
                       images)["params"]
  assert jax.tree.structure(params["encoder"]) == jax.tree.structure(vit)
  assert jax.tree.map(lambda a: a.shape, params["encoder"]) == jax.tree.map(lambda a: a.shape, vit)


def test_loss_goes_down_on_a_fixed_batch_with_the_sigma_schedule(tiny):
  method, params = tiny
  method.total_steps = 30  # what the loop sets from its plan
  images = jax.random.normal(jax.random.PRNGKey(0), (16, 16, 16, 3))
  tx = optax.adam(2e-3)

  @jax.jit
  def step(params, opt_state, i):
    (_, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(
        params, {"image": images}, jax.random.PRNGKey(2), step=i)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state = tx.init(params)
  history = []
  for i in range(30):
    params, opt_state, metrics = step(params, opt_state, i)
    history.append(jax.device_get(metrics))
  sigmas = [float(h["sigma"]) for h in history]
  np.testing.assert_allclose(sigmas[:3], [1.0, 29 / 30, 28 / 30], rtol=1e-6)
  # Sharper targets (smaller sigma) also lower the entropy floor of the loss, so the accuracy on
  # dropped positions is the schedule-free evidence of learning.
  assert history[-1]["loss"] < 0.5 * history[0]["loss"], [float(h["loss"]) for h in history]
  assert history[-1]["pos_acc"] > history[0]["pos_acc"] + 0.3, [h["pos_acc"] for h in history]
  assert method.features(params, images).shape == (16, 128)


@pytest.mark.parametrize("overrides,match", [
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"pos_mask_ratio": 0.0}, "pos_mask_ratio must be in"),
    ({"sigma": -1.0}, "sigma must be >= 0"),
    ({"attentive_tau": -0.1}, "attentive_tau must be >= 0"),
    ({"model.decoder_heads": 5}, "decoder_width=64 must be divisible"),
])
def test_bad_config(overrides, match):
  with pytest.raises(UserError, match=match):
    get_method(tiny_config(**overrides))
