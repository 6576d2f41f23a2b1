"""mae_jax.load / Pretrained: features, preprocessing, reconstructions and attention against the
code paths they reuse, PyTorch files and model folders, bad input, the analysis CLI's --images,
and the README's API example (executed as written)."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

import mae_jax
from mae_jax import data, tasks
from mae_jax import workdir as workdirs
from mae_jax.analyze import __main__ as analyze_main
from mae_jax.analyze import run
from mae_jax.errors import UserError
from mae_jax.methods import get_method
from conftest import REPO, small_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_data_dir):
  """A 2-step MAE run (Mu/4 at 16 px, 4x4 patches, one device) and the digits it reads."""
  workdir = str(tmp_path_factory.mktemp("api_mae"))
  config = small_config(digits_data_dir, total_steps=2)
  tasks.pretrain(config, workdir, devices=jax.devices()[:1])
  source = data.get_source(config.dataset)
  batches = data.eval_batches(source, config.dataset, split="validation", image_size=16,
                              global_batch_size=10)
  images = next(batches)["image"]
  batches.close()
  return {"workdir": workdir, "config": config, "model": mae_jax.load(workdir),
          "source": source, "images": images}


def _direct(workdir):
  """(method, params) read the way the evaluators read a workdir."""
  method = get_method(workdirs.read_config(workdir))
  params, _ = workdirs.load_params(workdir)
  return method, params


def _uint8(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _one_line_error(fn, match):
  with pytest.raises(UserError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the model


def test_attributes_and_repr(trained):
  m = trained["model"]
  assert (m.method, m.variant, m.step, m.image_size, m.patch_size, m.grid) == (
      "mae", "Mu/4", 2, 16, 4, (4, 4))
  assert m.mean == tuple(trained["config"].dataset.mean)
  assert m.std == tuple(trained["config"].dataset.std)
  assert m.has_cls and m.has_decoder and m.workdir == trained["workdir"]
  assert set(m.params) == {"encoder", "decoder"}
  text = repr(m)
  assert text.startswith("Pretrained(mae Mu/4, 16 px, 4 px tokens (4x4 + cls), step 2, ")
  assert "encoder + decoder" in text and trained["workdir"] in text


def test_features_are_the_methods_own(trained):
  m, images = trained["model"], trained["images"]
  method, params = _direct(trained["workdir"])
  for pool, theirs in ((None, None), ("cls", "cls"), ("mean", "avg")):
    want = np.asarray(jax.jit(lambda p, x, t=theirs: method.features(p, x, t))(params, images))
    np.testing.assert_allclose(m.features(images, pool=pool), want, rtol=1e-5, atol=1e-5)
  tokens = m.features(images, pool="tokens")
  assert tokens.shape == (10, 17, 128)
  np.testing.assert_allclose(tokens[:, 0], m.features(images, pool="cls"), rtol=1e-5, atol=1e-6)
  # Batches of 3 (the last one padded): the same numbers; one compilation for the 4 batches of 3
  # beside the one for the 10 images padded to 16.
  np.testing.assert_allclose(m.features(images, batch_size=3), m.features(images), rtol=1e-5,
                             atol=1e-5)
  assert {k for k in m._compiled if k[0] == "features"} == {
      ("features", p) for p in (None, "cls", "mean", "tokens")}
  assert m._compiled[("features", None)]._cache_size() == 2


def _folder_batch(config, folder, n):
  """The evaluation pipeline's images of a flat image folder (its 'train' split, in order)."""
  d = config.dataset.copy_and_resolve_references()
  with d.unlocked():
    d.name, d.folder, d.val_fraction = "folder", str(folder), 0.0
  batches = data.eval_batches(data.get_source(d), d, split="train", image_size=16,
                              global_batch_size=n)
  batch = next(batches)
  batches.close()
  return batch["image"]


def test_preprocess_is_the_evaluation_pipeline(trained, tmp_path):
  from PIL import Image
  m, source = trained["model"], trained["source"]
  # A digit as stored in the dataset (8x8 grey PNG): the file, its pixels, a PIL image.
  encoded = next(source.reader("validation", 0, 1, False, None).take(1).as_numpy_iterator())
  path = tmp_path / "digit.png"
  path.write_bytes(encoded["image"])
  want = trained["images"][:1]
  with Image.open(path) as im:
    pixels = np.asarray(im)
    pil = im.copy()
  assert pixels.shape[:2] == (8, 8)
  for given in (str(path), path, pixels, pixels.reshape(8, 8, -1), pil, [pil]):
    got = m.preprocess(given)
    assert got.shape == (1, 16, 16, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
  # Non-square photos: a JPEG, a grey PNG and an RGBA PNG, against a folder source's pipeline.
  folder = tmp_path / "photos"
  folder.mkdir()
  rng = np.random.default_rng(0)
  smooth = np.cumsum(rng.integers(0, 12, (37, 53, 3)), axis=1) % 256
  Image.fromarray(smooth.astype(np.uint8)).save(folder / "b_rgb.jpg", quality=90)
  Image.fromarray(_uint8(1, (20, 30))).save(folder / "a_grey.png")
  Image.fromarray(_uint8(2, (25, 19, 4)), "RGBA").save(folder / "c_rgba.png")
  want = _folder_batch(trained["config"], folder, 3)
  files = sorted(str(p) for p in folder.iterdir())
  np.testing.assert_allclose(m.preprocess(files), want, atol=1e-5)
  with Image.open(files[2]) as im:
    np.testing.assert_allclose(m.preprocess(im), want[2:], atol=1e-5)
    np.testing.assert_allclose(m.preprocess(np.asarray(im)), want[2:], atol=1e-5)
  # A batch array and a list mixing paths and arrays.
  batch = _uint8(3, (2, 24, 24, 3))
  np.testing.assert_allclose(m.preprocess([files[0], batch]),
                             np.concatenate([want[:1], m.preprocess(batch)]), atol=1e-6)


def test_reconstruct(trained):
  m, images = trained["model"], trained["images"][:5]
  out = m.reconstruct(images, seed=3)
  assert sorted(out) == ["hidden_mse", "mask", "masked", "original", "pasted", "reconstruction"]
  for name in ("original", "masked", "reconstruction", "pasted"):
    assert out[name].shape == (5, 16, 16, 3), name
    assert out[name].min() >= 0.0 and out[name].max() <= 1.0, name
  mask = out["mask"]
  assert mask.shape == (5, 16) and set(np.unique(mask)) == {0.0, 1.0}
  np.testing.assert_array_equal(mask.sum(axis=1), 12)  # 75% of the 16 patches hidden
  pixels = np.repeat(np.repeat(mask.reshape(5, 4, 4), 4, axis=1), 4, axis=2)[..., None] > 0
  pixels = np.broadcast_to(pixels, out["original"].shape)
  np.testing.assert_array_equal(out["pasted"][~pixels], out["original"][~pixels])
  np.testing.assert_array_equal(out["pasted"][pixels], out["reconstruction"][pixels])
  np.testing.assert_array_equal(out["masked"][pixels], 0.5)
  d = trained["config"].dataset
  np.testing.assert_allclose(out["original"], np.clip(
      images * np.asarray(d.std) + np.asarray(d.mean), 0, 1), atol=1e-6)
  # The analysis's own function with the same key gives the same numbers.
  method, params = _direct(trained["workdir"])
  key = jax.random.fold_in(jax.random.PRNGKey(3), 0)
  got = run.reconstruct_panels(method, params, np.concatenate([images, np.zeros_like(
      images[:3])]), key, d.mean, d.std)
  np.testing.assert_allclose(out["reconstruction"], got["panels"]["reconstruction"][:5],
                             atol=1e-6)
  # Seeds and ratios.
  np.testing.assert_array_equal(m.reconstruct(images, seed=3)["mask"], mask)
  assert not np.array_equal(m.reconstruct(images, seed=4)["mask"], mask)
  half = m.reconstruct(images, mask_ratio=0.5)["mask"]
  np.testing.assert_array_equal(half.sum(axis=1), 8)


def test_attention(trained):
  m, images = trained["model"], trained["images"][:3]
  attn = m.attention(images)
  assert attn.shape == (4, 3, 4, 17, 17) and attn.dtype == np.float32
  assert attn.min() >= 0
  np.testing.assert_allclose(attn.sum(axis=-1), 1.0, atol=1e-5)
  method, params = _direct(trained["workdir"])
  _, want, _ = run.encoder_intermediates(method, params, images)
  np.testing.assert_allclose(attn, np.stack(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m.attention(images, batch_size=2), attn, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- other sources


def test_official_mae_pth_and_timm_file_load_the_same_model(trained, tmp_path):
  pytest.importorskip("torch")
  from mae_jax.convert import workdirs as convert
  m, images = trained["model"], trained["images"]
  pth = str(tmp_path / "mae_official.pth")
  convert.export_workdir(trained["workdir"], pth, fmt="mae")
  official = mae_jax.load(pth)
  assert official.workdir is None and official.source == pth and official.has_decoder
  assert (official.image_size, official.mean, official.std) == (16, m.mean, m.std)
  np.testing.assert_allclose(official.features(images), m.features(images), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(official.reconstruct(images)["reconstruction"],
                             m.reconstruct(images)["reconstruction"], rtol=1e-5, atol=1e-6)
  timm_file = str(tmp_path / "vit.safetensors")
  convert.export_workdir(trained["workdir"], timm_file, fmt="timm")
  encoder_only = mae_jax.load(timm_file)
  assert not encoder_only.has_decoder and "encoder only" in repr(encoder_only)
  np.testing.assert_allclose(encoder_only.features(images, pool="mean"),
                             m.features(images, pool="mean"), rtol=1e-5, atol=1e-6)
  assert encoder_only.attention(images[:2]).shape == (4, 2, 4, 17, 17)
  _one_line_error(lambda: encoder_only.reconstruct(images), "holds the encoder alone")


def test_a_learned_pos_embed_is_used(trained, tmp_path):
  """A supervised timm ViT keeps its learned pos_embed: features and attention use it."""
  pytest.importorskip("safetensors")
  from safetensors.numpy import load_file, save_file
  from mae_jax.convert import workdirs as convert
  from mae_jax.models.vit import ViT
  m, images = trained["model"], trained["images"][:4]
  path = str(tmp_path / "learned.safetensors")
  convert.export_workdir(trained["workdir"], path, fmt="timm")
  sd = load_file(path)
  sd["pos_embed"] = np.random.default_rng(0).normal(size=sd["pos_embed"].shape).astype(np.float32)
  save_file(sd, path)
  model = mae_jax.load(path)
  assert model.params["encoder"]["pos_embed"].shape == (1, 17, 128)
  vit = ViT.from_variant("Mu/4", learnable_pos_embed=True)
  tokens = vit.apply({"params": model.params["encoder"]}, images)
  np.testing.assert_allclose(model.features(images), tokens[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.features(images, pool="mean"), tokens[:, 1:].mean(axis=1),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(model.features(images), m.features(images), atol=1e-3)
  np.testing.assert_allclose(model.attention(images).sum(axis=-1), 1.0, atol=1e-5)


def test_a_model_folder(trained, tmp_path):
  """A timm / Hugging Face style folder (config.json + model.safetensors)."""
  pytest.importorskip("safetensors")
  from mae_jax.convert import workdirs as convert
  m, images = trained["model"], trained["images"]
  folder = tmp_path / "vit_mu4"
  folder.mkdir()
  convert.export_workdir(trained["workdir"], str(folder / "model.safetensors"), fmt="timm")
  d = trained["config"].dataset
  (folder / "config.json").write_text(json.dumps({
      "architecture": "vit_base_patch16_224", "num_classes": 0, "global_pool": "token",
      "model_args": {"img_size": 16, "patch_size": 4, "embed_dim": 128, "depth": 4,
                     "num_heads": 4},
      "pretrained_cfg": {"input_size": [3, 16, 16], "mean": list(d.mean), "std": list(d.std),
                         "crop_pct": 0.875, "interpolation": "bicubic"}}))
  try:
    model = mae_jax.load(folder)
  except UserError as e:
    if "directory" in str(e) or "folder" in str(e):
      pytest.skip(f"mae_jax.convert.import_checkpoint does not read model folders yet: {e}")
    raise
  assert model.workdir is None and model.image_size == 16
  x = m.preprocess(_uint8(5, (3, 20, 20, 3)))
  np.testing.assert_allclose(model.features(x, pool="mean"), m.features(x, pool="mean"),
                             rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_user_errors(trained, tmp_path):
  m = trained["model"]
  garbage = tmp_path / "notes.png"
  garbage.write_text("not an image")
  truncated = tmp_path / "cut.png"
  from PIL import Image
  Image.fromarray(_uint8(0, (20, 20, 3))).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:60])
  cases = [
      (lambda: m.preprocess(np.zeros((8, 8, 3), np.float64)), "dtype float64, expected uint8"),
      (lambda: m.preprocess(np.zeros((8,), np.uint8)), r"shape \(8,\); expected an image"),
      (lambda: m.preprocess(np.zeros((8, 8, 5), np.uint8)), "has 5 channels"),
      (lambda: m.preprocess(np.zeros((2, 8, 8, 2), np.uint8)), r"images\[0\]: .* 2 channels"),
      (lambda: m.preprocess(str(tmp_path / "missing.jpg")), "missing.jpg does not exist"),
      (lambda: m.preprocess(str(garbage)), "cannot read image .*notes.png"),
      (lambda: m.preprocess(str(truncated)), "cannot read image .*cut.png"),
      (lambda: m.preprocess(str(tmp_path)), "is not an image file"),
      (lambda: m.preprocess([]), "no images given"),
      (lambda: m.preprocess({"a": 1}), "cannot read a dict as images"),
      (lambda: m.features(np.zeros((2, 32, 32, 3), np.float32)),
       r"float batch must be preprocessed images \[B, 16, 16, 3\]"),
      (lambda: m.features(np.zeros((1, 16, 16, 3), np.float32), pool="max"),
       "pool must be one of cls, mean, tokens"),
      (lambda: m.features(np.zeros((1, 16, 16, 3), np.float32), batch_size=0),
       "batch_size must be >= 1"),
      (lambda: m.reconstruct(np.zeros((1, 16, 16, 3), np.float32), mask_ratio=1.5),
       r"mask_ratio must be a number in \(0, 1\)"),
      (lambda: mae_jax.load(tmp_path / "nowhere"), "does not exist: mae_jax.load takes"),
      (lambda: mae_jax.load(trained["workdir"], step=9), "no checkpoint for step 9"),
      (lambda: mae_jax.load(garbage), "wrong file type"),
  ]
  for fn, match in cases:
    _one_line_error(fn, match)


# ----------------------------------------------------------------------------- the CLI


def test_analysis_cli_on_a_folder_of_images(trained, tmp_path, capsys):
  from PIL import Image
  # A copy of the workdir whose dataset cannot be opened: --images must not need it.
  workdir = tmp_path / "no_data"
  shutil.copytree(trained["workdir"], workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["dataset"].update(name="imagenet2012", data_dir=str(tmp_path / "no_tfds"))
  (workdir / "config.json").write_text(json.dumps(config))
  folder = tmp_path / "mine"
  folder.mkdir()
  for i in range(3):
    Image.fromarray(_uint8(i, (24 + 4 * i, 30, 3))).save(folder / f"img{i}.png")
  (folder / "readme.txt").write_text("not an image: left out")
  out = tmp_path / "figs"
  written = analyze_main.main([f"--workdir={workdir}", f"--images={folder}", f"--out={out}",
                               "--batch_size=2"])
  names = ("recon", "attention_distance", "head_diversity", "cka")
  assert sorted(os.path.basename(p) for p in written) == sorted(
      [f"{n}.png" for n in names] + [f"{n}.json" for n in names])
  assert "on 3 images of" in capsys.readouterr().out
  for n in names:
    record = json.loads((out / f"{n}.json").read_text())
    assert record["images"] == str(folder) and record["split"] is None
    assert record["num_images"] == 3
  recon = json.loads((out / "recon.json").read_text())
  assert recon["hidden_fraction"] == [0.75] * 3
  # The figure's images are the API's preprocessing of the files, masked with the --seed key.
  m = trained["model"]
  images = m.preprocess(sorted(str(p) for p in folder.glob("*.png")))
  got = run.reconstruct_panels(m.trainable, m.params, images, jax.random.PRNGKey(0), m.mean,
                               m.std)
  np.testing.assert_allclose(recon["hidden_mse"], got["hidden_mse"].round(6), atol=2e-6)
  # --num_images caps the files read; without --images the dataset is needed.
  written = analyze_main.main([f"--workdir={workdir}", f"--images={folder}", f"--out={out}",
                               "--num_images=2", "--what=attention_distance"])
  assert json.loads((out / "attention_distance.json").read_text())["num_images"] == 2
  for args, match in ((["--what=recon"], "not prepared"),
                      ([f"--images={folder}", "--split=train"], "drop --split"),
                      ([f"--images={tmp_path / 'none'}"], "does not exist"),
                      ([f"--images={workdir / 'checkpoints'}"], "no images")):
    with pytest.raises(SystemExit) as e:
      analyze_main.main([f"--workdir={workdir}", f"--out={out}", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


def test_analysis_cli_on_an_encoder_only_import(trained, tmp_path, capsys):
  pytest.importorskip("safetensors")
  from mae_jax.convert import workdirs as convert
  from PIL import Image
  path = str(tmp_path / "vit.safetensors")
  convert.export_workdir(trained["workdir"], path, fmt="timm")
  workdir = str(tmp_path / "imported")
  convert.import_checkpoint(path, workdir)
  image = tmp_path / "one.png"
  Image.fromarray(_uint8(7, (20, 20, 3))).save(image)
  written = analyze_main.main([f"--workdir={workdir}", f"--images={image}",
                               f"--out={tmp_path / 'o'}"])
  assert sorted(os.path.basename(p) for p in written if p.endswith(".json")) == [
      "attention_distance.json", "cka.json", "head_diversity.json"]
  with pytest.raises(SystemExit):
    analyze_main.main([f"--workdir={workdir}", f"--images={image}", "--what=recon",
                       f"--out={tmp_path / 'o'}"])
  assert "holds the encoder alone" in capsys.readouterr().err


# ----------------------------------------------------------------------------- README


def readme_example() -> str:
  """The ```python block between <!-- api-example --> and <!-- /api-example --> in README.md."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  found = re.search(r"<!-- api-example -->\s*```python\n(.*?)```\s*<!-- /api-example -->", text,
                    re.S)
  assert found, "README.md has no ```python block between the api-example markers"
  return found.group(1)


def test_readme_api_example_runs(trained, tmp_path, monkeypatch):
  code = readme_example()
  line = 'workdir = "workdirs/mae_tiny"'
  assert code.count(line) == 1, f"the example must set the workdir with {line!r}"
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(code.replace(line, f"workdir = {trained['workdir']!r}"), "README.md", "exec"),
       namespace)
  model = namespace["model"]
  assert isinstance(model, mae_jax.Pretrained) and model.workdir == trained["workdir"]
  n = len(namespace["x"])
  assert namespace["x"].shape == (n, 16, 16, 3)
  assert namespace["feats"].shape == (n, 128)
  assert namespace["out"]["pasted"].shape == (n, 16, 16, 3)
  assert namespace["out"]["mask"].shape == (n, 16)
  assert namespace["attn"].shape == (4, n, 4, 17, 17)


def test_import_mae_jax_stays_light():
  """`import mae_jax` loads neither TensorFlow nor JAX (the API imports them on first use)."""
  import subprocess
  import sys
  code = ("import sys, mae_jax; mae_jax.load; "
          "print(sorted(m for m in ('tensorflow', 'jax', 'torch') if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "[]"
