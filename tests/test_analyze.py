"""mae_jax.analyze: attention metrics on hand-built maps, reconstructions, figures from a tiny
pretrained MAE, the CLI's errors, and the held-out evaluator (mae_jax.evaluators.heldout)."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mae_jax import data, evaluators, tasks, train
from mae_jax.analyze import __main__ as analyze_main
from mae_jax.analyze import metrics, plots, run
from mae_jax.errors import UserError
from mae_jax.evaluators import heldout as heldout_eval
from mae_jax.evaluators import panels as image_panels
from mae_jax.methods import get_method, mae
from conftest import REPO, small_config


def _tensorboard_images(workdir):
  """[(step, tag, decoded uint8 image)] of the image summaries in WORKDIR/tensorboard."""
  found = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.metadata.plugin_data.plugin_name == "images":
          t = tf.make_ndarray(v.tensor)
          image = tf.io.decode_png(t[2]).numpy()
          assert (int(t[0]), int(t[1])) == (image.shape[1], image.shape[0])  # width, height
          found.append((event.step, v.tag, image))
  return found


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, digits_data_dir):
  """A 2-step MAE run (Mu/4 at 16 px, 2 devices) with the held-out evaluator on at step 2."""
  workdir = str(tmp_path_factory.mktemp("analyze_mae"))
  config = small_config(digits_data_dir, total_steps=2, **{
      "evals.heldout.every_steps": 2, "evals.heldout.batches": 2,
      "evals.heldout.num_images": 3})
  out = tasks.pretrain(config, workdir, devices=jax.devices()[:2])
  return {"workdir": workdir, "config": config, "out": out}


# ----------------------------------------------------------------------------- attention metrics


def _grid_distances_by_loops(grid, stride):
  """[N, N] pixel distances between patch centres, with plain loops (independent of metrics)."""
  cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
  return np.array([[stride * np.hypot(r1 - r2, c1 - c2) for (r2, c2) in cells]
                   for (r1, c1) in cells])


def _with_cls(patch_attn, cls_mass):
  """[B, H, N, N] rows summing to 1 -> [B, H, 1 + N, 1 + N]: each patch row gives `cls_mass` to
  [CLS] and keeps 1 - cls_mass on the patches; the [CLS] row is uniform."""
  b, h, n, _ = patch_attn.shape
  out = np.full((b, h, n + 1, n + 1), 1.0 / (n + 1))
  out[:, :, 1:, 0] = cls_mass
  out[:, :, 1:, 1:] = (1.0 - cls_mass) * patch_attn
  return out


def test_attention_only_to_self_has_distance_zero():
  grid = (3, 4)
  n = 12
  attn = np.broadcast_to(np.eye(n), (2, 3, n, n))
  np.testing.assert_allclose(metrics.attention_distance(attn, grid, 16), np.zeros(3), atol=1e-6)
  # With a [CLS] token taking mass from every row: still 0, renormalized or not.
  for renormalize in (True, False):
    got = metrics.attention_distance(_with_cls(np.asarray(attn), 0.4), grid, 16, renormalize)
    np.testing.assert_allclose(got, np.zeros(3), atol=1e-6)


def test_uniform_attention_gives_the_mean_pairwise_distance_of_the_grid():
  grid, stride = (4, 4), 4
  n = 16
  want = _grid_distances_by_loops(grid, stride).mean()
  assert want == pytest.approx(metrics.uniform_distance(grid, stride))
  uniform = np.full((1, 2, n, n), 1.0 / n)
  np.testing.assert_allclose(metrics.attention_distance(uniform, grid, stride), [want, want],
                             rtol=1e-6)
  # By hand: on a 1x2 grid the two patches are `stride` apart (mean over the 4 ordered pairs:
  # stride / 2); on a 2x2 grid each cell sees distances 0, 1, 1, sqrt(2) cells.
  assert metrics.uniform_distance((1, 2), 16) == pytest.approx(8.0)
  assert metrics.uniform_distance((2, 2), 16) == pytest.approx(16 * (2 + np.sqrt(2)) / 4)


def test_cls_is_dropped_and_rows_renormalized_or_not():
  grid, stride = (2, 3), 8
  n = 6
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 2, n, n))
  patch = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # rows sum to 1
  d = _grid_distances_by_loops(grid, stride)
  direct = np.einsum("bhqk,qk->bhq", patch, d).mean(axis=(0, 2))  # [H]
  full = _with_cls(patch, 0.3)
  np.testing.assert_allclose(metrics.attention_distance(patch, grid, stride), direct, rtol=1e-5)
  np.testing.assert_allclose(metrics.attention_distance(full, grid, stride), direct, rtol=1e-5)
  np.testing.assert_allclose(metrics.attention_distance(full, grid, stride, renormalize=False),
                             0.7 * direct, rtol=1e-5)
  # Weights leave padding images out.
  w = np.array([1.0, 1.0, 0.0])
  want = np.einsum("bhqk,qk->bhq", patch[:2], d).mean(axis=(0, 2))
  np.testing.assert_allclose(metrics.attention_distance(patch, grid, stride, weights=w), want,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="does not fit"):
    metrics.patch_attention(patch, 4)


def test_identical_heads_have_zero_diversity():
  rng = np.random.default_rng(1)
  one = rng.dirichlet(np.ones(9), size=(2, 1, 9))  # [B, 1, Q, K]
  attn = np.repeat(one, 4, axis=1)
  np.testing.assert_allclose(metrics.head_diversity(attn, 9), np.zeros(4), atol=1e-6)
  np.testing.assert_allclose(metrics.head_diversity(_with_cls(attn, 0.5), 9), np.zeros(4),
                             atol=1e-6)
  assert metrics.head_diversity(one, 9).tolist() == [0.0]  # one head: no other head to differ


def test_two_head_diversity_hand_computed():
  # One image, 2 patches (2 queries), 2 heads.
  a = np.array([[[[0.5, 0.5], [0.9, 0.1]],
                 [[0.8, 0.2], [0.9, 0.1]]]])  # [1, 2, 2, 2]

  def kl(p, q):
    return sum(pi * np.log(pi / qi) for pi, qi in zip(p, q))

  # query 0: KL(h0 || h1) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = 0.2231...; query 1: identical rows.
  assert kl([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.22314355, rel=1e-6)
  want = [kl(a[0, 0, 0], a[0, 1, 0]) / 2, kl(a[0, 1, 0], a[0, 0, 0]) / 2]
  np.testing.assert_allclose(metrics.head_diversity(a, 2), want, rtol=1e-5)


def test_linear_cka():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(50, 6))
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  assert float(metrics.linear_cka(x, x)) == pytest.approx(1.0, rel=1e-5)
  # Invariant to orthogonal transforms and isotropic scaling (Kornblith et al.).
  assert float(metrics.linear_cka(x, 3.0 * x @ q)) == pytest.approx(1.0, rel=1e-4)
  y = rng.normal(size=(50, 4))
  xc, yc = x - x.mean(0), y - y.mean(0)
  want = (np.linalg.norm(yc.T @ xc) ** 2 /
          (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))
  assert float(metrics.linear_cka(x, y)) == pytest.approx(want, rel=1e-4)
  # Rows of weight 0 are left out entirely.
  w = np.r_[np.ones(40), np.zeros(10)]
  assert float(metrics.linear_cka(x, y, w)) == pytest.approx(
      float(metrics.linear_cka(x[:40], y[:40])), rel=1e-4)


# ----------------------------------------------------------------------------- reconstructions


def test_reconstruction_denormalizes_each_patch_with_the_true_patch_statistics():
  # 2 images of 16 px in 4x4 patches of 4x4 px; random normalized-pixel predictions and mask.
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 16, 16, 3))
  p = rng.normal(size=(2, 16, 48))
  m = (rng.random(size=(2, 16)) < 0.75).astype(np.float32)
  out = mae.reconstruction(jnp.asarray(x, jnp.float32), jnp.asarray(p, jnp.float32),
                           jnp.asarray(m), 4, (4, 4), norm_pix=True)
  # Directly in numpy: patch k = 4i + j of image b holds pixels [4i:4i+4, 4j:4j+4, :], flattened
  # (row, col, channel); scaled back with the mean and unbiased variance of the true patch.
  want = np.zeros_like(x)
  want_mask = np.zeros(x.shape[:3] + (1,))
  for b in range(2):
    for i in range(4):
      for j in range(4):
        true = x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :]
        k = 4 * i + j
        patch = p[b, k] * np.sqrt(true.var(ddof=1) + 1e-6) + true.mean()
        want[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :] = patch.reshape(4, 4, 3)
        want_mask[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = m[b, k]
  np.testing.assert_allclose(out["pred_pixels"], want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out["mask"], want_mask)
  # Without norm_pix the prediction already is in pixels.
  raw = mae.reconstruction(jnp.asarray(x, jnp.float32), jnp.asarray(p, jnp.float32),
                           jnp.asarray(m), 4, (4, 4), norm_pix=False)
  np.testing.assert_allclose(raw["pred_pixels"][1, 4:8, 8:12].reshape(-1), p[1, 6], rtol=1e-6)


def test_mae_reconstruct_is_its_prediction_with_its_mask(pretrained):
  method = get_method(pretrained["config"])
  params = jax.device_get(pretrained["out"]["state"].params)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  rng = jax.random.PRNGKey(2)
  out, (pred, mask) = jax.jit(lambda p, x, r: (method.reconstruct(p, x, r), method.predict(
      p, x, r)))(params, images, rng)
  want = mae.reconstruction(images, pred, mask, 4, (4, 4), norm_pix=True)
  np.testing.assert_allclose(out["pred_pixels"], want["pred_pixels"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["mask"], want["mask"])
  assert float(np.asarray(out["mask"]).mean()) == pytest.approx(0.75)


def test_panels_paste_visible_patches_back():
  images = np.random.default_rng(3).normal(size=(1, 4, 4, 3)).astype(np.float32)
  mask = np.zeros((1, 4, 4, 1), np.float32)
  mask[:, :2] = 1.0  # top half hidden
  recon = {"pred_pixels": np.zeros_like(images), "mask": mask}
  mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  shown = image_panels.panels(images, recon, mean, std)
  original = np.clip(images * 0.25 + 0.5, 0, 1)
  np.testing.assert_allclose(shown["original"], original)
  np.testing.assert_allclose(shown["masked"][:, :2], 0.5)
  np.testing.assert_allclose(shown["masked"][:, 2:], original[:, 2:])
  np.testing.assert_allclose(shown["reconstruction"], 0.5)  # prediction 0 -> the mean colour
  np.testing.assert_allclose(shown["reconstruction + visible"][:, 2:], original[:, 2:])
  np.testing.assert_allclose(shown["reconstruction + visible"][:, :2], 0.5)
  err = image_panels.hidden_mse(images, recon, mean, std)
  np.testing.assert_allclose(err, [((original[:, :2] - 0.5) ** 2).mean()], rtol=1e-5)
  grid = image_panels.tile([shown[k] for k in image_panels.PANELS], gap=1, scale=2)
  assert grid.shape == (4 * 9 - 1, 1 * 9 - 1, 3) and grid.dtype == np.uint8


# ----------------------------------------------------------------------------- held-out evaluator


def test_heldout_loss_is_logged_beside_the_loss_and_matches_a_direct_evaluation(pretrained):
  workdir, config, out = pretrained["workdir"], pretrained["config"], pretrained["out"]
  records = train.read_metrics(workdir)
  heldout = [r for r in records if "heldout/loss" in r]
  assert [r["step"] for r in heldout] == [2]
  assert any("loss" in r and r["step"] == 2 for r in records)
  # The same number without the loop: the method's loss (train=False) on the split's first two
  # batches, the evaluator's fixed keys, on one device.
  method = get_method(config)
  source = data.get_source(config.dataset)
  monitor = _heldout(config, method, total_steps=2)
  params = jax.device_get(out["state"].params)
  batches = data.eval_batches(source, config.dataset, split="validation", image_size=16,
                              global_batch_size=32)
  loss_fn = jax.jit(lambda p, x, r: method.loss(p, {"image": x}, r, train=False)[0])
  losses = [float(loss_fn(params, next(batches)["image"], jax.random.fold_in(monitor.loss_key, i)))
            for i in range(2)]
  batches.close()
  assert heldout[0]["heldout/loss"] == pytest.approx(np.mean(losses), rel=1e-5)
  assert out["history"][-1] == {"step": 2, "heldout/loss": heldout[0]["heldout/loss"]}


def test_reconstruction_images_reach_tensorboard(pretrained):
  found = _tensorboard_images(pretrained["workdir"])
  assert [(step, tag) for step, tag, _ in found] == [(2, "heldout/" + heldout_eval.IMAGE_TAG)]
  image = found[0][2]
  # 4 rows of panels, 3 images, 16 px images upscaled x4 with 2 px gaps.
  assert image.shape == (4 * 66 - 2, 3 * 66 - 2, 3)
  assert image.std() > 0


def _heldout(config, method, total_steps, devices=1):
  """The held-out evaluator of config.evals.heldout, outside a run."""
  cfg = config.evals.heldout
  ctx = evaluators.Context(config=config, trainable=method, source=data.get_source(config.dataset),
                           mesh=train.make_mesh(jax.devices()[:devices]), total_steps=total_steps,
                           steps_per_epoch=46)
  return heldout_eval.Evaluator(cfg, ctx)


def test_heldout_cadence_and_config_checks(digits_data_dir):
  config = small_config(digits_data_dir, **{"evals.heldout.every_steps": 3})
  monitor = _heldout(config, get_method(config), total_steps=7)
  assert [s for s in range(1, 8) if monitor.due(s)] == [3, 6, 7]
  assert monitor.num_batches == 300 // 32  # batches 0: every full batch
  short = _heldout(config, get_method(config), total_steps=2)
  assert not any(short.due(s) for s in (1, 2))  # runs shorter than one period: not run
  bad = small_config(digits_data_dir, **{"evals.heldout.num_images": -2})
  with pytest.raises(UserError, match="must be >= 0"):
    _heldout(bad, get_method(bad), 2)
  with pytest.raises(UserError, match="has no split 'nope'"):
    c = small_config(digits_data_dir, **{"dataset.eval_split": "nope"})
    _heldout(c, get_method(config), 2)
  with pytest.raises(UserError, match="fewer images per process than one batch"):
    c = small_config(digits_data_dir, batch_size=512)
    _heldout(c, get_method(c), 2)


# ----------------------------------------------------------------------------- every method's hooks


METHOD_CONFIGS = ("mae", "simmim", "splitmask", "droppos", "convmae")


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_every_method_has_a_heldout_loss_and_its_analyses(name):
  import importlib
  c = importlib.import_module(f"configs.{name}").get_config("tiny")
  c.unlock()
  c.image_size = 32 if name == "convmae" else 16
  method = get_method(c)
  size = c.image_size
  images = jnp.zeros((2, size, size, 3))
  params = jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images)
  key = jax.random.PRNGKey(1)
  heldout = jax.eval_shape(method.eval_metrics, params, {}, {"image": images}, key,
                           jnp.zeros((), jnp.int32))
  assert heldout["loss"].shape == ()
  fits = run.applicable(method)
  assert ("recon" in fits) == (name != "droppos") and ("droppos" in fits) == (name == "droppos")
  if name != "droppos":
    out = jax.eval_shape(method.reconstruct, params, images, key)
    assert out["pred_pixels"].shape == (2, size, size, 3)
    assert out["mask"].shape == (2, size, size, 1)
  else:
    out = jax.eval_shape(method.predict_positions, params, images, key)
    assert out["pred_ids"].shape == out["ids_keep"].shape == (2, 4)  # 4 of 16 patches visible
  # The attention layers the analyses read: the ViT's blocks, or ConvMAE's stage-3 blocks.
  geo = run.geometry(run.Run(workdir="", config=c, method=method, params=params, step=0,
                             source=None, split="", out=""))
  depth = 2 if name == "convmae" else 4
  assert geo.names == ([f"blocks3_{i}" for i in range(2)] if name == "convmae" else
                       [f"blocks_{i}" for i in range(4)])
  assert len(geo.names) == depth
  assert (geo.grid, geo.stride, geo.has_cls) == (((2, 2), 16.0, False) if name == "convmae" else
                                                ((4, 4), 4.0, True))


def test_eval_metrics_run_the_loss_in_eval_mode():
  seen = []

  class Plain(mae.Method):
    def loss(self, params, batch, rng, train=True, step=None):
      seen.append((train, step))
      return 1.0, {"loss": 1.0}

  assert Plain(small_config("unused")).eval_metrics({}, {}, {}, None, 5) == {"loss": 1.0}
  assert seen == [(False, 5)]


# ----------------------------------------------------------------------------- the CLI


def _png(path):
  from PIL import Image
  with Image.open(path) as im:
    return im.size, np.asarray(im.convert("RGB"), np.float32)


def test_cli_writes_figures_and_numbers_of_a_tiny_pretrained_mae(pretrained, tmp_path):
  out = str(tmp_path / "figs")
  written = analyze_main.main([f"--workdir={pretrained['workdir']}", f"--out={out}",
                               "--num_images=3", "--stat_images=40", "--batch_size=20"])
  names = ("recon", "attention_distance", "head_diversity", "cka")
  assert sorted(os.path.basename(p) for p in written) == sorted(
      [f"{n}.png" for n in names] + [f"{n}.json" for n in names])
  sizes = {"recon": tuple(round(plots.DPI * w) for w in plots.recon_figsize(3, 4)),
           "attention_distance": (600, 400), "head_diversity": (600, 400),
           "cka": tuple(round(plots.DPI * w) for w in plots.CKA_FIGSIZE)}
  for n in names:
    size, pixels = _png(os.path.join(out, f"{n}.png"))
    assert size == tuple(sizes[n]), n
    assert pixels.std() > 0, n  # not blank
    assert os.path.getsize(os.path.join(out, f"{n}.png")) < 200_000
    with open(os.path.join(out, f"{n}.json")) as f:
      record = json.load(f)
    assert record["analysis"] == n and record["step"] == 2 and record["method"] == "mae"
    assert record["figure"] == f"{n}.png"
  with open(os.path.join(out, "attention_distance.json")) as f:
    dist = json.load(f)
  assert dist["layers"] == [f"blocks_{i}" for i in range(4)] and dist["num_images"] == 40
  assert np.asarray(dist["distance_px"]).shape == (4, 4)  # Mu: 4 layers x 4 heads
  assert dist["uniform_attention_distance_px"] == pytest.approx(
      metrics.uniform_distance((4, 4), 4.0), abs=1e-4)
  assert dist["rows_renormalized_after_dropping_cls"] and dist["cls_token"]
  # Renormalizing after dropping [CLS] can only lengthen a distance (the [CLS] mass counts 0).
  assert np.all(np.asarray(dist["distance_px"]) >= np.asarray(dist["distance_px_not_renormalized"]))
  with open(os.path.join(out, "head_diversity.json")) as f:
    div = json.load(f)
  assert np.all(np.asarray(div["diversity_nats"]) >= 0)
  with open(os.path.join(out, "cka.json")) as f:
    cka = np.asarray(json.load(f)["cka"])
  np.testing.assert_allclose(np.diag(cka), 1.0, rtol=1e-4)
  np.testing.assert_allclose(cka, cka.T)
  with open(os.path.join(out, "recon.json")) as f:
    recon = json.load(f)
  assert recon["num_images"] == 3 and recon["norm_pix_loss"]
  assert recon["hidden_fraction"] == [0.75] * 3 and len(recon["hidden_mse"]) == 3


def test_droppos_analysis_scores_the_dropped_positions(digits_data_dir, tmp_path):
  from configs import droppos as droppos_config
  c = droppos_config.get_config("tiny")
  c.unlock()
  c.image_size = 16
  c.model.decoder_depth = 1
  c.dataset.data_dir = digits_data_dir
  method = get_method(c)
  params = jax.jit(method.init_params)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  source = data.get_source(c.dataset)
  r = run.Run(workdir="", config=c, method=method, params=params, step=0, source=source,
              split="validation", out=str(tmp_path), num_images=5, stat_images=10, batch_size=5)
  written = run.droppos_analysis(r)
  assert [os.path.basename(p) for p in written] == ["droppos.png", "droppos_accuracy.png",
                                                     "droppos.json"]
  size, pixels = _png(written[0])
  assert size == tuple(round(plots.DPI * w) for w in plots.recon_figsize(5, 3))
  assert pixels.std() > 0
  with open(written[2]) as f:
    record = json.load(f)
  # Directly: the two batches of 5 images with the analysis's keys (fold_in(key, batch + 1)).
  predict = run.jitted(method, "predict_positions")  # the analysis's own: compiled already
  outs = [predict(params, images, jax.random.fold_in(r.key, i + 1))
          for i, (images, _) in enumerate(r.batches(10))]
  dropped = np.concatenate([np.asarray(o["pos_mask"]) > 0 for o in outs])
  right = np.concatenate([np.asarray(o["pred_ids"]) == np.asarray(o["ids_keep"]) for o in outs])
  assert record["num_dropped_tokens"] == dropped.sum() == 10 * 3  # 3 of 4 visible per image
  assert record["dropped_position_accuracy"] == pytest.approx(right[dropped].mean())
  assert record["kept_position_accuracy"] == pytest.approx(right[~dropped].mean())
  assert np.asarray(record["accuracy_per_position"], dtype=float).shape == (4, 4)


@pytest.mark.parametrize("args,match", [
    (["--workdir=/nonexistent/wd"], "does not exist"),
    (["--what=droppos"], "--what=droppos does not apply: method 'mae' predicts no positions"),
    (["--what=recon,pixels"], "unknown analysis 'pixels'"),
    (["--split=nope"], "has no split 'nope'"),
    (["--step=7"], "no checkpoint for step 7"),
    (["--num_images=0"], "--num_images must be >= 1"),
])
def test_cli_errors_are_one_line_with_exit_code_2(pretrained, tmp_path, capsys, args, match):
  argv = [f"--workdir={pretrained['workdir']}", f"--out={tmp_path / 'o'}", *args]
  with pytest.raises(SystemExit) as e:
    analyze_main.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and match in err and "\n" not in err


def test_cli_needs_a_pretraining_workdir_with_a_checkpoint(pretrained, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  with open(os.path.join(pretrained["workdir"], "config.json")) as f:
    (no_ckpt / "config.json").write_text(f.read())
  for workdir, match in ((empty, "has no config.json"), (no_ckpt, "no checkpoints in")):
    with pytest.raises(SystemExit) as e:
      analyze_main.main([f"--workdir={workdir}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


def test_python_dash_m_entry_point(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "mae_jax.analyze", f"--workdir={tmp_path}/none"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: {tmp_path}/none does not exist (no config.json): it must be a pretraining workdir"]
