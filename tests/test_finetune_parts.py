"""Fine-tuning parts: layer-wise lr decay and timm-style mixup / cutmix."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mae_jax.evaluate import layer_decay, mixup
from mae_jax.models.vit import ViT


def vit_b16_params():
  model = ViT.from_variant("B/16")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  params = dict(shapes["params"])
  params["fc_norm"] = jax.eval_shape(nn.LayerNorm().init, jax.random.key(0),
                                     jnp.zeros((1, 768)))["params"]
  params["head"] = jax.eval_shape(nn.Dense(1000).init, jax.random.key(0),
                                  jnp.zeros((1, 768)))["params"]
  return params


def test_vit_b16_layer_scales():
  params = vit_b16_params()
  assert model_depth(params) == 12
  scales = layer_decay.layer_scales(
      params, functools.partial(layer_decay.vit_layer_id, depth=12), 0.65, 13)
  expected = {"cls_token": 0.65 ** 13, "patch_embed": 0.65 ** 13, "norm": 1.0,
              "fc_norm": 1.0, "head": 1.0}
  expected.update({f"blocks_{i}": 0.65 ** (12 - i) for i in range(12)})
  assert set(scales) == set(expected)
  n_leaves = 0
  for (key_path, value) in jax.tree_util.tree_flatten_with_path(scales)[0]:
    top = key_path[0].key
    assert value == pytest.approx(expected[top], rel=1e-12), key_path
    n_leaves += 1
  assert n_leaves == len(jax.tree.leaves(params))
  assert scales["blocks_0"]["attn"]["qkv"]["kernel"] == pytest.approx(0.65 ** 12)
  assert scales["blocks_11"]["mlp"]["fc2"]["bias"] == pytest.approx(0.65)


def model_depth(params):
  return sum(1 for k in params if k.startswith("blocks_"))


def test_layer_ids_ignore_collection_key_and_reject_out_of_range():
  assert layer_decay.vit_layer_id(("params", "blocks_3", "norm1", "scale"), 12) == 4
  assert layer_decay.vit_layer_id(("cls_token",), 12) == 0
  with pytest.raises(ValueError):
    layer_decay.layer_scales({"head": {"kernel": jnp.zeros((2, 2))}},
                             functools.partial(layer_decay.vit_layer_id, depth=12), 0.5, 5)


def test_convvit_layer_ids():
  lid = functools.partial(layer_decay.convvit_layer_id, depths=(2, 2, 11))
  for name in ("patch_embed1", "patch_embed4", "blocks1_0", "blocks2_1", "pos_embed"):
    assert lid((name, "kernel")) == 0, name
  assert lid(("blocks3_0", "attn", "qkv", "kernel")) == 1
  assert lid(("blocks3_10", "norm1", "scale")) == 11
  for name in ("norm", "fc_norm", "head"):
    assert lid((name, "bias")) == 12


def toy_params():
  return {"patch_embed": {"proj": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.ones((3,))}},
          "blocks_0": {"w": jnp.full((3, 3), -1.5)},
          "head": {"kernel": jnp.full((3, 4), 0.5)}}


TOY_ID = functools.partial(layer_decay.vit_layer_id, depth=1)


def test_scale_by_layer_multiplies_updates():
  params = toy_params()
  scales = layer_decay.layer_scales(params, TOY_ID, 0.5, 2)
  tx = layer_decay.scale_by_layer(scales)
  updates = jax.tree.map(jnp.ones_like, params)
  out, _ = tx.update(updates, tx.init(params), params)
  np.testing.assert_allclose(out["patch_embed"]["proj"]["kernel"], 0.25)
  np.testing.assert_allclose(out["patch_embed"]["proj"]["bias"], 0.25)
  np.testing.assert_allclose(out["blocks_0"]["w"], 0.5)
  np.testing.assert_allclose(out["head"]["kernel"], 1.0)


def test_adamw_layer_decay_scales_weight_decay():
  params = toy_params()
  lr, wd, decay = 0.1, 0.05, 0.5
  cfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, weight_decay=wd, grad_clip_norm=0.0))
  tx = layer_decay.adamw_layer_decay(optax.constant_schedule(lr), cfg, params, TOY_ID, decay, 2)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  p0 = params["patch_embed"]["proj"]["kernel"]
  np.testing.assert_allclose(updates["patch_embed"]["proj"]["kernel"],
                             -decay ** 2 * lr * wd * p0, rtol=1e-6)
  np.testing.assert_allclose(updates["blocks_0"]["w"], -decay * lr * wd * params["blocks_0"]["w"],
                             rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], -lr * wd * params["head"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_array_equal(updates["patch_embed"]["proj"]["bias"], 0.0)  # 1-D: no decay.


NUM_CLASSES, SMOOTH = 10, 0.1
# One jitted function (one compilation) for all mixup tests: compiling jax.random.beta dominates
# their run time, and only num_classes is static.
_MIX = jax.jit(mixup.mixup_cutmix, static_argnums=3)


def MIX(rng, images, labels, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
        label_smoothing=0.1):
  """Same call signature every time (all f32 arrays), so the jit cache is hit after one trace."""
  knobs = [jnp.float32(v) for v in (mixup_alpha, cutmix_alpha, switch_prob, label_smoothing)]
  return _MIX(rng, images, labels, num_classes, *knobs)
OFF = SMOOTH / NUM_CLASSES
ON = 1.0 - SMOOTH + OFF


def batch(b=6, h=16, w=12):
  images = jax.random.normal(jax.random.key(1), (b, h, w, 3))
  labels = jnp.arange(b) % NUM_CLASSES  # distinct labels: row 0 and row b-1 differ.
  return images, labels


def lam_from_targets(targets, labels):
  return (np.asarray(targets)[0, int(labels[0])] - OFF) / (ON - OFF)


def check_targets(targets):
  targets = np.asarray(targets)
  assert targets.shape == (6, NUM_CLASSES)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
  assert targets.min() >= 0.0 and targets.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_only(seed):
  images, labels = batch()
  out, targets = MIX(jax.random.key(seed), images, labels, NUM_CLASSES,
                     cutmix_alpha=0.0, switch_prob=0.0, label_smoothing=SMOOTH)
  check_targets(targets)
  lam = lam_from_targets(targets, labels)
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cutmix_only(seed):
  images, labels = batch()
  out, targets = MIX(jax.random.key(seed), images, labels, NUM_CLASSES,
                     mixup_alpha=0.0, label_smoothing=SMOOTH)
  check_targets(targets)
  lam = lam_from_targets(targets, labels)
  out, images = np.asarray(out), np.asarray(images)
  from_flip = np.all(out == images[::-1], axis=-1)
  from_orig = np.all(out == images, axis=-1)
  assert np.all(from_flip | from_orig)
  assert 0.0 < from_flip[0].mean() < 1.0  # these seeds paste a non-empty, partial box.
  # Row 0 and row B-1 differ everywhere, so the pasted pixels are exactly the flipped ones.
  assert from_flip[0].mean() == pytest.approx(1.0 - lam, abs=1e-6)
  assert np.array_equal(from_flip[0], from_flip[1])  # one box for the whole batch.


def test_mixup_and_cutmix_switch_under_jit():
  images, labels = batch()
  kinds = set()
  for seed in range(6):
    out, targets = MIX(jax.random.key(seed), images, labels, num_classes=NUM_CLASSES)
    assert out.shape == images.shape and out.dtype == images.dtype
    check_targets(targets)
    lam = lam_from_targets(targets, labels)
    is_mixup = np.allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-5)
    kinds.add("mixup" if is_mixup else "cutmix")
  assert kinds == {"mixup", "cutmix"}  # switch_prob 0.5 picked each at least once.


def test_soft_cross_entropy():
  logits = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  t = jnp.array([[0.2, 0.7, 0.1], [0.0, 0.0, 1.0]])
  logp = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  expected = -(np.asarray(t) * logp).sum(-1).mean()
  assert float(mixup.soft_cross_entropy(logits, t)) == pytest.approx(expected, rel=1e-5)


def test_no_mixing_when_both_alphas_zero():
  images, labels = batch()
  out, targets = MIX(jax.random.key(0), images, labels, NUM_CLASSES, mixup_alpha=0.0,
                     cutmix_alpha=0.0, label_smoothing=SMOOTH)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets, mixup.smoothed_one_hot(labels, NUM_CLASSES, SMOOTH))
