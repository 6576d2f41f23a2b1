"""Downstream evaluation: method features, loading pretrained params, weighted k-NN."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import convmae as convmae_config
from mae_jax import data, masking, tasks, train
from mae_jax.errors import UserError
from mae_jax import workdir as workdirs
from mae_jax.evaluators import knn
from mae_jax.methods import get_method
from conftest import small_config


def _random_params(method, image_size):
  """Parameters of `method.model` drawn with numpy (no compiled init: seconds saved on CPU)."""
  images = jnp.zeros((1, image_size, image_size, 3))
  shapes = jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images)
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(shapes)
  return traverse_util.unflatten_dict({
      path: jnp.asarray((path[-1] == "scale") + 0.2 * rng.standard_normal(s.shape), s.dtype)
      for path, s in flat.items()})


# ----------------------------------------------------------------------------- features


def test_mae_features_are_the_encoder_on_all_patches_in_order():
  # The no-mask path must equal the masked path with every patch kept in its own order.
  method = get_method(small_config("unused"))  # Mu/4 at 16 px: 16 patches.
  params = _random_params(method, 16)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  ids_all = jnp.broadcast_to(jnp.arange(16), (2, 16))

  @jax.jit
  def all_three(params, images):  # one compile instead of op-by-op passes (seconds on CPU).
    tokens = method.model.encoder.apply({"params": params["encoder"]}, images, ids_all)
    return tokens, method.features(params, images), method.features(params, images, "avg")

  tokens, cls, avg = all_three(params, images)
  np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-5)
  np.testing.assert_allclose(avg, tokens[:, 1:].mean(1), atol=1e-5)
  with pytest.raises(UserError, match="pool"):
    method.features(params, images, "max")


def test_convmae_features_average_all_stage3_tokens():
  c = convmae_config.get_config("tiny")
  c.unlock()
  c.image_size = 32  # a 2x2 stage-3 grid
  method = get_method(c)
  params = _random_params(method, 32)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  m = masking.random_mask(jax.random.PRNGKey(2), 2, 4, 4)  # keep all 4, in shuffled order

  @jax.jit
  def both(params, images, m):  # one compile instead of two op-by-op passes (seconds on CPU).
    tokens = method.model.encoder.apply({"params": params["encoder"]}, images, m.ids_keep, m.mask)
    return tokens, method.features(params, images)

  tokens, feats = both(params, images, m)
  assert feats.shape == (2, 128)
  np.testing.assert_allclose(feats, tokens.mean(1), atol=1e-5)  # the mean ignores token order.
  with pytest.raises(UserError, match="no cls token"):
    method.features(params, images, "cls")


# ----------------------------------------------------------------------------- k-NN


def _unit(deg, norm=1.0):
  r = np.deg2rad(deg)
  return norm * np.array([np.cos(r), np.sin(r)])


def test_knn_weights_votes_by_exp_similarity_over_temperature():
  # Query at 0 deg. Its 3 nearest (by angle) neighbours disagree: one of class 0 at 30 deg, two
  # of class 1 at +-45 deg. Class 2 lies far away. Norms differ wildly: only angles may count.
  train_feats = np.stack([_unit(30, 10.0), _unit(45, 0.5), _unit(-45, 0.5),
                          _unit(150, 1.0), _unit(180, 3.0)])
  train_labels = np.array([0, 1, 1, 2, 2])
  query = _unit(0, 2.0)[None]
  # Votes: class 0 exp(cos30 / T), class 1 2 exp(cos45 / T): class 0 wins iff
  # T < (cos30 - cos45) / ln 2 = 0.229.
  boundary = (np.cos(np.deg2rad(30)) - np.cos(np.deg2rad(45))) / np.log(2)
  assert 0.22 < boundary < 0.24
  for t in (0.02, 0.07, 0.2, 0.26, 0.5, 1.0):
    pred = knn.knn_classify(train_feats, train_labels, query, num_classes=3, k=3, temperature=t)
    assert pred.tolist() == [0 if t < boundary else 1], t
  # k=1: the single nearest neighbour; k larger than the memory is capped (all 5 vote).
  assert knn.knn_classify(train_feats, train_labels, query, 3, k=1, temperature=1.0)[0] == 0
  assert knn.knn_classify(-train_feats, train_labels, query, 3, k=1, temperature=1.0)[0] == 2
  assert knn.knn_classify(train_feats, train_labels, query, 3, k=50, temperature=1.0)[0] == 1


def test_knn_chunks_agree_and_accuracy():
  rng = np.random.default_rng(0)
  train_feats = rng.standard_normal((40, 8))
  train_labels = rng.integers(0, 4, 40)
  test_feats = rng.standard_normal((23, 8))
  whole = knn.knn_classify(train_feats, train_labels, test_feats, 4, k=5)
  chunked = knn.knn_classify(train_feats, train_labels, test_feats, 4, k=5, chunk=4)
  assert whole.shape == (23,) and (whole == chunked).all()
  # Each training point is its own nearest neighbour: with k=1 the memory classifies itself.
  assert knn.knn_accuracy(train_feats, train_labels, train_feats, train_labels, 4, k=1) == 1.0
  with pytest.raises(UserError, match="k >= 1"):
    knn.knn_classify(train_feats, train_labels, test_feats, 4, k=0)


def test_extract_drops_padding_rows_and_normalizes():
  method = get_method(small_config("unused"))
  params = _random_params(method, 16)
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3)))
  batches = [{"image": images, "label": np.array([3, 1, 0, 0]), "mask": np.array([1, 1, 0, 0])},
             {"image": images[::-1], "label": np.array([5, 0, 0, 0]), "mask": np.array([1, 0, 0, 0])}]
  feats, labels = knn.extract(method, params, batches)
  assert feats.dtype == np.float32 and feats.shape == (3, 128)
  assert labels.tolist() == [3, 1, 5]
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
  alone, _ = knn.extract(method, params, [{"image": images[3:] + 0 * images,  # images[3] x4
                                            "label": np.zeros(4), "mask": np.eye(4)[0]}])
  np.testing.assert_allclose(feats[2], alone[0], atol=1e-5)  # images[::-1][0] is images[3]


# ----------------------------------------------------------------------------- pretrained


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, digits_data_dir):
  """A 2-step MAE Mu/4 run at 16 px with checkpoints at steps 1 and 2."""
  config = small_config(digits_data_dir, total_steps=2, checkpoint_every_steps=1)
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  out = tasks.pretrain(config, workdir, devices=jax.devices()[:1])
  return config, workdir, out["state"]


def test_load_pretrained_restores_params_only(pretrained):
  config, workdir, state = pretrained
  params, meta = workdirs.load_params(workdir)
  assert meta["step"] == 2 and meta["method"] == "mae"
  assert set(params) == {"encoder", "decoder"}  # no optimizer state, step or rng.
  got = traverse_util.flatten_dict(params)
  want = traverse_util.flatten_dict(jax.device_get(state.params))
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(np.asarray(got[k]), want[k]), k
  # An explicit step, from the checkpoints folder itself: step 1's params are not step 2's.
  params1, meta1 = workdirs.load_params(f"{workdir}/checkpoints", step=1)
  assert meta1["step"] == 1
  a = np.asarray(params1["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])
  assert not np.array_equal(a, want[("encoder", "blocks_0", "attn", "qkv", "kernel")])
  method = get_method(config)
  assert workdirs.subtree(params, method.encoder_key) is params["encoder"]
  with pytest.raises(UserError, match=r"have no 'student' subtree; they have \['decoder', "
                                      r"'encoder'\]"):
    workdirs.subtree(params, "student")


def test_load_pretrained_errors(pretrained, tmp_path):
  config, workdir, _ = pretrained
  with pytest.raises(UserError, match="does not exist"):
    workdirs.load_params(str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="no checkpoints"):
    workdirs.load_params(str(tmp_path))
  with pytest.raises(UserError, match=r"no checkpoint for step 7 .*\[1, 2\]"):
    workdirs.load_params(workdir, step=7)
  params, _ = workdirs.load_params(workdir)
  mine = get_method(config)
  workdirs.check_fits(_abstract_encoder(mine, 16), params["encoder"])  # fits: no error
  other = get_method(small_config(config.dataset.data_dir, **{"model.variant": "Mu/8"}))
  with pytest.raises(UserError, match=r"1 shapes differ \(have vs want\): "
                                      r"patch_embed/proj/kernel \(4, 4, 3, 128\) vs \(8, 8, 3, 128\)"):
    workdirs.check_fits(_abstract_encoder(other, 16), params["encoder"])
  with pytest.raises(UserError, match=r"missing: blocks_1.*unexpected: embed"):
    workdirs.check_fits(_abstract_encoder(mine, 16), params["decoder"])


def _abstract_encoder(method, image_size):
  images = jnp.zeros((1, image_size, image_size, 3))
  return jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images)[method.encoder_key]


def test_knn_on_digits_with_a_barely_pretrained_encoder(pretrained):
  config, workdir, _ = pretrained
  params, _ = workdirs.load_params(workdir)
  method = get_method(config)
  source = data.get_source(config.dataset)
  result = knn.evaluate_knn(config, method, params, source, batch_size=256)
  # 10 classes, chance 0.1. Measured on the 300 validation digits at 16 px (k=20, T=0.07):
  # cls token 0.77 after these 2 steps, 0.75 for a random Mu/4 init; raw pixels 0.99. A random
  # ViT keeps enough of the pixels for k-NN; 0.5 leaves a wide margin against init noise while
  # failing for broken features (constant, shuffled labels, padding rows kept: all near 0.1).
  assert 0.5 < result["knn_top1"] <= 1.0


# ----------------------------------------------------------------------------- tasks


def _knn_task_config(init_from, data_dir, **overrides):
  from configs import knn as knn_config
  c = knn_config.get_config()
  c.init_from = init_from
  c.dataset.data_dir = data_dir
  c.batch_size = 100
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_knn_task_scores_a_pretraining_workdir_and_a_random_baseline(pretrained, tmp_path,
                                                                      digits_data_dir):
  _, workdir, _ = pretrained
  out = tasks.knn(_knn_task_config(workdir, digits_data_dir), str(tmp_path / "a"))
  assert 0.1 < out["knn_top1"] <= 1.0 and out["pretrain_step"] == 2 and not out["random_init"]
  with open(tmp_path / "a" / "knn.json") as f:
    assert json.load(f)["knn_top1"] == out["knn_top1"]
  rand = tasks.knn(_knn_task_config(workdir, digits_data_dir, random_init=True),
                          str(tmp_path / "b"))
  assert rand["random_init"] and rand["pretrain_step"] is None
  assert rand["knn_top1"] != out["knn_top1"]  # other weights, other neighbours.
  with pytest.raises(UserError, match="init_from"):
    tasks.knn(_knn_task_config("", digits_data_dir), str(tmp_path / "c"))
  with pytest.raises(UserError, match="has no config.json"):
    tasks.knn(_knn_task_config(str(tmp_path), digits_data_dir), str(tmp_path / "d"))


def test_knn_evaluator_during_pretraining(tmp_path, digits_data_dir):
  config = small_config(digits_data_dir, total_steps=3, **{"evals.knn.every_steps": 2,
                                                           "evals.knn.batch_size": 100})
  out = tasks.pretrain(config, str(tmp_path / "wd"), devices=jax.devices()[:1])
  knn = [h for h in out["history"] if "knn/top1" in h]
  assert [h["step"] for h in knn] == [2, 3]  # every 2 steps and at the end.
  assert all(0.0 <= h["knn/top1"] <= 1.0 for h in knn)
  assert [r["step"] for r in train.read_metrics(str(tmp_path / "wd")) if "knn/top1" in r] == [2, 3]
