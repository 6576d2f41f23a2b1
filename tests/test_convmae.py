"""ConvMAE: masked convolutions, mask upsampling, official shapes and count, ConvViT, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import convmae as convmae_config
from mae_jax import masking, tasks, train
from mae_jax.errors import UserError
from mae_jax.methods import get_method, mae
from mae_jax.models import convvit
from mae_jax.models.convvit import STAGE_DECODERS, ConvMAEEncoder, ConvViT


def tiny_config(**overrides):
  """The tiny config with one decoder block; keys like 'model.variant' reach nested fields."""
  c = convmae_config.get_config("tiny")
  c.unlock()
  c.model.decoder_depth = 1
  c.update_from_flattened_dict(overrides)
  return c


def _random_params(module, *args):
  """Parameters of `module` drawn with numpy: N(0, 0.2) around the init's mean (no compile).

  The properties tested here hold for any parameters; jitting an init costs seconds on CPU.
  """
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(shapes)
  return traverse_util.unflatten_dict({
      path: jnp.asarray((path[-1] == "scale") + 0.2 * rng.standard_normal(s.shape), s.dtype)
      for path, s in flat.items()})


@jax.jit
def _encode(params, images, m):
  """ConvMAE-mu's (visible tokens [B, N_vis, D], stage-1 map, stage-2 map) for one mask."""
  encoder = ConvMAEEncoder.from_variant("mu")
  out, state = encoder.apply({"params": params}, images, m.ids_keep, m.mask,
                             mutable=["intermediates"])
  inter = state["intermediates"]
  return out, inter["stage1"][0], inter["stage2"][0]


def test_visible_features_ignore_masked_pixels_at_every_stage():
  encoder = ConvMAEEncoder.from_variant("mu")
  h, w = 64, 48  # non-square: a 4x3 stage-3 grid, 16x12 stage-1 and 8x6 stage-2 maps.
  grid = (h // 16, w // 16)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, h, w, 3))
  m = masking.random_mask(jax.random.PRNGKey(1), 2, grid[0] * grid[1], 4)
  params = _random_params(encoder, images, m.ids_keep, m.mask)
  masked_pixels = masking.upsample_mask(m.mask, grid, 16)  # [B, H, W, 1], 1 inside masked patches
  noisy = images + masked_pixels * 3.0 * jax.random.normal(jax.random.PRNGKey(3), images.shape)

  tokens, s1, s2 = _encode(params, images, m)
  tokens_n, s1_n, s2_n = _encode(params, noisy, m)
  assert tokens.shape == (2, 4, 128) and s1.shape == (2, 16, 12, 32) and s2.shape == (2, 8, 6, 64)
  np.testing.assert_allclose(tokens, tokens_n, atol=1e-5)
  for a, b, f in [(s1, s1_n, 4), (s2, s2_n, 2)]:
    visible = 1 - masking.upsample_mask(m.mask, grid, f)
    np.testing.assert_allclose(a * visible, b * visible, atol=1e-5)
    assert np.abs((a - b) * (1 - visible)).max() > 1e-2  # the noise did reach masked positions.

  # Without the masked convolution (same kept tokens, nothing masked in stages 1-2) the noise
  # leaks into the visible tokens through the 5x5 depthwise convs: the mask is what prevents it.
  leaky = m._replace(mask=jnp.zeros_like(m.mask))
  assert np.abs(_encode(params, images, leaky)[0] -
                _encode(params, noisy, leaky)[0]).max() > 1e-3


def test_depthwise_conv_impls_agree():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 5, 8)).astype(np.float32)  # odd, non-square map.
  params = {"params": {"kernel": rng.standard_normal((5, 5, 1, 8)).astype(np.float32),
                       "bias": np.arange(8.0, dtype=np.float32)}}
  conv = jax.jit(convvit.DepthwiseConv(5, "conv").apply)(params, x)
  shifts = jax.jit(convvit.DepthwiseConv(5, "shifts").apply)(params, x)
  np.testing.assert_allclose(conv, shifts, rtol=1e-5, atol=1e-5)
  # Channel 3 at (0, 0): zero padding, so only the kernel's lower-right 3x3 meets the input.
  expected = np.sum(x[0, :3, :3, 3] * params["params"]["kernel"][2:, 2:, 0, 3])
  np.testing.assert_allclose(conv[0, 0, 0, 3], expected + 3.0, rtol=1e-5)


def _official_upsample(mask, gh, gw, f):
  """The official ConvMAE repeat/permute upsampling (written for 14x14), on a (gh, gw) grid."""
  b = mask.shape[0]
  x = np.repeat(mask.reshape(b, gh, gw, 1), f * f, axis=-1).reshape(b, gh, gw, f, f)
  return x.transpose(0, 1, 3, 2, 4).reshape(b, gh * f, gw * f)


@pytest.mark.parametrize("hw", [(224, 224), (160, 160), (96, 128)])
def test_upsampled_masks_match_the_stage_grids(hw):
  h, w = hw
  gh, gw = h // 16, w // 16
  m = masking.random_mask(jax.random.PRNGKey(0), 2, gh * gw, masking.num_visible(gh * gw, 0.75))
  grid_mask = np.asarray(m.mask).reshape(2, gh, gw)
  # The stage maps' shapes, from the model itself (shapes only, no compute).
  encoder = ConvMAEEncoder.from_variant("mu")
  images = jnp.zeros((2, h, w, 3))
  variables = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), images, m.ids_keep, m.mask)
  _, state = jax.eval_shape(lambda v: encoder.apply(v, images, m.ids_keep, m.mask,
                                                    mutable=["intermediates"]), variables)
  for stage, f in [("stage1", 4), ("stage2", 2)]:
    up = np.asarray(masking.upsample_mask(m.mask, (gh, gw), f))
    assert up.shape[1:3] == state["intermediates"][stage][0].shape[1:3] == (gh * f, gw * f)
    np.testing.assert_array_equal(up[..., 0], np.kron(grid_mask, np.ones((f, f))))
    np.testing.assert_array_equal(up[..., 0], _official_upsample(np.asarray(m.mask), gh, gw, f))


def _official_encoder_shapes():
  """The official ConvMAE-Base encoder state_dict (models_convmae.py), name -> torch shape.

  pos_embed [1, 196, 768] is left out: the official model freezes it (requires_grad=False) and
  here it is a computed constant, not a parameter.
  """
  shapes = {}

  def ln(name, d):
    shapes.update({f"{name}.weight": (d,), f"{name}.bias": (d,)})

  def lin(name, i, o):
    shapes.update({f"{name}.weight": (o, i), f"{name}.bias": (o,)})

  def cv(name, i, o, k, groups=1):
    shapes.update({f"{name}.weight": (o, i // groups, k, k), f"{name}.bias": (o,)})

  widths, c = (256, 384, 768), 3
  for s, (d, p) in enumerate(zip(widths, (4, 2, 2)), start=1):
    cv(f"patch_embed{s}.proj", c, d, p)
    ln(f"patch_embed{s}.norm", d)
    c = d
  lin("patch_embed4", 768, 768)
  for s, d in ((1, 256), (2, 384)):
    for i in range(2):
      b = f"blocks{s}.{i}"
      ln(f"{b}.norm1", d), cv(f"{b}.conv1", d, d, 1), cv(f"{b}.attn", d, d, 5, groups=d)
      cv(f"{b}.conv2", d, d, 1), ln(f"{b}.norm2", d)
      cv(f"{b}.mlp.fc1", d, 4 * d, 1), cv(f"{b}.mlp.fc2", 4 * d, d, 1)
  for i in range(11):
    b = f"blocks3.{i}"
    ln(f"{b}.norm1", 768), lin(f"{b}.attn.qkv", 768, 3 * 768), lin(f"{b}.attn.proj", 768, 768)
    ln(f"{b}.norm2", 768), lin(f"{b}.mlp.fc1", 768, 3072), lin(f"{b}.mlp.fc2", 3072, 768)
  ln("norm", 768)
  cv("stage1_output_decode", 256, 768, 4)
  cv("stage2_output_decode", 384, 768, 2)
  return shapes


def _as_official(params):
  """Our flat names/shapes in the official layout: '/'->'.', 'blocks1_0'->'blocks1.0',
  kernel/scale->weight, HWIO conv kernels -> OIHW, [in, out] dense kernels -> [out, in]."""
  out = {}
  for path, x in traverse_util.flatten_dict(params).items():
    *mods, leaf = path
    mods = [m.replace("_", ".") if m.startswith("blocks") else m for m in mods]
    shape = tuple(x.shape)
    if leaf == "kernel":
      shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    out[".".join(mods + ["bias" if leaf == "bias" else "weight"])] = shape
  return out


def test_base_encoder_has_the_official_parameters():
  encoder = ConvMAEEncoder.from_variant("base")
  images = jnp.zeros((1, 224, 224, 3))
  m = masking.random_mask(jax.random.PRNGKey(0), 1, 196, 49)
  params = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), images, m.ids_keep, m.mask)
  ours = _as_official(params["params"])
  official = _official_encoder_shapes()
  assert ours == official  # same names, same shapes, nothing extra.
  count = sum(int(np.prod(s)) for s in official.values())
  # Per official shapes: patch_embed1-3 13,056 + 394,368 + 1,181,952; patch_embed4 590,592;
  # conv blocks (10d^2 + 37d) 2 x 664,832 (d=256) + 2 x 1,488,768 (d=384); ViT blocks
  # (12d^2 + 13d) 11 x 7,087,872; norm 1,536 -> 84,455,296; stage decoders 3,146,496 + 1,180,416.
  assert count == 84_455_296 + 4_326_912 == 88_782_208
  # ConvViT-B (fine-tuning backbone, no head): the stage decoders go, and the official model's
  # pos_embed (196 x 768, trainable there, a constant here) comes in: 84,605,824, the ~84.6M.
  vit = ConvViT.from_variant("base")
  vit_params = jax.eval_shape(vit.init, jax.random.PRNGKey(0), images)["params"]
  vit_count = sum(x.size for x in jax.tree.leaves(vit_params))
  assert vit_count == 84_455_296 and vit_count + 196 * 768 == 84_605_824


def test_method_loss_and_shapes():
  method = get_method(tiny_config())
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  params = _random_params(method.model, images, *method.draw_mask(jax.random.PRNGKey(1), 2)[:2])
  assert set(params) == {"encoder", "decoder"} and method.num_keep == 4

  @jax.jit
  def run(params, rng):
    pred, mask = method.predict(params, images, rng)
    (loss, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(
        params, {"image": images}, rng)
    return pred, mask, loss, metrics, grads

  pred, mask, loss, metrics, grads = run(params, jax.random.PRNGKey(2))
  assert pred.shape == (2, 16, 16 * 16 * 3) and np.all(mask.sum(1) == 12)
  assert np.isfinite(loss) and metrics["loss"] == loss
  # MAE's loss on 16x16 patches, masked ones only (the same rng draws the same mask).
  target = mae.pixel_targets(images, 16, norm_pix=True)
  np.testing.assert_allclose(loss, mae.masked_mse(pred, target, mask), rtol=1e-5)
  enc = grads["encoder"]
  for g in (enc["blocks1_0"]["attn"]["kernel"], enc["stage1_output_decode"]["kernel"],
            enc["blocks3_0"]["attn"]["qkv"]["kernel"], grads["decoder"]["pred"]["kernel"]):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_convvit_starts_from_the_pretrained_encoder():
  method = get_method(tiny_config())
  images = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 64, 3))
  ids_keep, ids_restore, _ = method.draw_mask(jax.random.PRNGKey(1), 3)
  encoder_params = _random_params(method.model, images, ids_keep, ids_restore)["encoder"]
  backbone = {k: v for k, v in encoder_params.items() if k not in STAGE_DECODERS}

  # Pooling after the pretrained `norm`: the same tree as the encoder's minus the stage decoders.
  features = ConvViT.from_variant("mu", global_pool=False)
  fresh = jax.eval_shape(features.init, jax.random.PRNGKey(2), images)["params"]
  assert jax.tree.map(lambda x: x.shape, fresh) == jax.tree.map(jnp.shape, backbone)
  assert jax.jit(features.apply)({"params": backbone}, images).shape == (3, 128)

  # The official fine-tuning model: global pool + fresh fc_norm, and a head.
  model = ConvViT.from_variant("mu", num_classes=10, drop_path_rate=0.5)
  fresh = _random_params(model, images)
  params = convvit.from_pretraining(fresh, encoder_params)
  assert set(params) == set(backbone) - {"norm"} | {"fc_norm", "head"}
  np.testing.assert_array_equal(params["blocks3_1"]["mlp"]["fc2"]["kernel"],
                                encoder_params["blocks3_1"]["mlp"]["fc2"]["kernel"])
  assert params["head"] is fresh["head"]
  apply = jax.jit(model.apply, static_argnames="train")
  logits = apply({"params": params}, images)
  assert logits.shape == (3, 10) and np.all(np.isfinite(logits))
  # Drop path acts in training mode only.
  dropped = apply({"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  assert np.abs(dropped - logits).max() > 0

  narrow = ConvViT(widths=(32, 64, 96), depths=(1, 1, 2), num_heads=4)
  other = jax.eval_shape(narrow.init, jax.random.PRNGKey(0), images)["params"]
  with pytest.raises(ValueError, match="blocks3_0 has shapes"):
    convvit.from_pretraining(other, encoder_params)


def test_pretrain_loop_end_to_end(tmp_path, digits_data_dir):
  # 32 px: a 2x2 stage-3 grid, 1 token kept. The grouped-conv depthwise path (the accelerator
  # one) compiles ~10 s faster than 'shifts', which test_depthwise_conv_impls_agree covers.
  config = tiny_config(**{
      "image_size": 32, "batch_size": 32, "total_steps": 4, "warmup_epochs": 0.1,
      "log_every_steps": 2, "checkpoint_every_steps": 4, "model.decoder_width": 32,
      "dataset.data_dir": digits_data_dir, "model.dwconv_impl": "conv"})
  out = tasks.pretrain(config, str(tmp_path / "wd"), devices=jax.devices()[:1])
  assert int(out["state"].step) == 4
  assert [h["step"] for h in out["history"]] == [2, 4]
  logged = [r["loss"] for r in train.read_metrics(str(tmp_path / "wd")) if "loss" in r]
  assert len(logged) == 2 and all(np.isfinite(logged))
  assert set(out["state"].params["encoder"]) >= set(STAGE_DECODERS)


@pytest.mark.parametrize("overrides,match", [
    ({"image_size": 72}, "not a multiple of 16"),
    ({"mask_ratio": 1.0}, "mask_ratio must be in"),
    ({"mask_ratio": 0.0}, "mask_ratio must be in"),
    ({"model.variant": "huge"}, "unknown ConvViT size 'huge'"),
    ({"model.decoder_width": 66}, "decoder_width=66"),
    ({"model.dwconv_impl": "fft"}, "dwconv_impl='fft'"),
    ({"image_size": 32, "mask_ratio": 0.9}, "keeps 0 of the 4"),
])
def test_bad_config(overrides, match):
  with pytest.raises(UserError, match=match):
    get_method(tiny_config(**overrides))


def test_config_variants():
  base = convmae_config.get_config("base")
  assert (base.model.variant, base.image_size, base.batch_size, base.num_epochs) == (
      "base", 224, 2048, 1600.0)
  assert get_method(base).grid == (14, 14)
  with pytest.raises(ValueError, match="unknown variant"):
    convmae_config.get_config("large")
