"""Model folders against the real transformers and timm: `export --format=hf|timm --out=DIR`
loads with `ViTMAEForPreTraining.from_pretrained(DIR)` / `timm.create_model('local-dir:DIR',
pretrained=True)` and computes what our model computes; a Hugging Face folder imports back."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402
from test_convert import _assert_bitwise, make_workdir, mae_small  # noqa: E402

from mae_jax import masking  # noqa: E402
from mae_jax.convert import folders, workdirs  # noqa: E402
from mae_jax.methods import get_method  # noqa: E402
from mae_jax.methods.mae import masked_mse, pixel_targets  # noqa: E402
from mae_jax.workdir import load_params  # noqa: E402

RTOL = 1e-5


def _close(ours, ref, what):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  assert rel < RTOL, f"{what}: max relative difference {rel:.2e}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mae_wd"))
  config = mae_small()
  return path, config, make_workdir(path, config)[2]


def _images(n=3, size=32, seed=4):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def hf_matches_ours(model, method, params, images, key, norm_pix):
  """Prediction and loss of a ViTMAEForPreTraining against ours, for our random mask: HF draws
  its shuffle as argsort(noise), so the noise is each patch's rank in our shuffle order."""
  m = masking.random_mask(key, images.shape[0], method.num_patches, method.num_keep)
  pred = jax.jit(method.model.apply)({"params": params}, images, m.ids_keep, m.ids_restore)
  loss = masked_mse(pred, pixel_targets(images, method.patch_size, norm_pix), m.mask)
  noise = torch.from_numpy(np.asarray(m.ids_restore, np.float32))
  with torch.no_grad():
    out = model(pixel_values=_nchw(images), noise=noise)
  np.testing.assert_array_equal(out.mask.numpy(), np.asarray(m.mask))
  _close(pred, out.logits.numpy(), "prediction")
  _close(loss, out.loss.numpy(), "loss")


def test_hf_folder_loads_in_transformers_and_predicts_as_ours(workdir, tmp_path):
  path, config, params = workdir
  out = str(tmp_path / "hf")
  info = workdirs.export_workdir(path, out, fmt="hf")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert "ViTMAEForPreTraining.from_pretrained" in info["hint"]
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["model_type"] == "vit_mae" and cfg["layer_norm_eps"] == 1e-6
  assert cfg["mask_ratio"] == config.mask_ratio and cfg["norm_pix_loss"] == config.norm_pix_loss
  model = transformers.ViTMAEForPreTraining.from_pretrained(out).eval()
  method = get_method(config)
  hf_matches_ours(model, method, params, _images(), jax.random.PRNGKey(5), config.norm_pix_loss)
  # The encoder alone, all patches kept in order: the [CLS] feature our features() returns.
  encoder = transformers.ViTMAEModel.from_pretrained(out, mask_ratio=0.0).eval()
  images = _images(seed=7)
  n = method.num_patches
  with torch.no_grad():
    hidden = encoder(pixel_values=_nchw(images),
                     noise=torch.arange(n, dtype=torch.float32).repeat(3, 1)).last_hidden_state
  _close(method.features(params, images, "cls"), hidden[:, 0].numpy(), "encoder [CLS] feature")


def test_timm_folder_loads_with_local_dir(workdir, tmp_path):
  path, config, params = workdir
  out = str(tmp_path / "timm_dir")
  info = workdirs.export_workdir(path, out, fmt="timm")
  assert info["layout"] == "timm folder"
  model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
  pc = model.pretrained_cfg
  assert pc["mean"] == tuple(config.dataset.mean) or list(pc["mean"]) == list(config.dataset.mean)
  assert list(pc["std"]) == list(config.dataset.std)
  assert tuple(pc["input_size"]) == (3, config.image_size, config.image_size)
  assert pc["interpolation"] == "bicubic" and pc["crop_pct"] == 0.875
  method = get_method(config)
  images = _images(seed=9)
  with torch.no_grad():
    tokens = model.forward_features(_nchw(images)).numpy()
  _close(method.features(params, images, "cls"), tokens[:, 0], "timm [CLS] feature")


def test_hf_folder_imports_and_round_trips(tmp_path):
  config = transformers.ViTMAEConfig(
      hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
      image_size=16, patch_size=4, decoder_hidden_size=32, decoder_num_hidden_layers=1,
      decoder_num_attention_heads=4, decoder_intermediate_size=128, layer_norm_eps=1e-6,
      norm_pix_loss=True, mask_ratio=0.75)
  torch.manual_seed(0)
  ref = transformers.ViTMAEForPreTraining(config).eval()
  # The Hub's checkpoints hold the fixed sin-cos tables (facebookresearch/mae
  # util/pos_embed.py); a model constructed here may leave them at zero until initialized.
  from mae_jax.models.vit import sincos_2d
  with torch.no_grad():
    ref.vit.embeddings.position_embeddings.copy_(torch.from_numpy(sincos_2d(128, 4, 4, True))[None])
    ref.decoder.decoder_pos_embed.copy_(torch.from_numpy(sincos_2d(32, 4, 4, True))[None])
  src = str(tmp_path / "hub")
  ref.save_pretrained(src)
  wd = str(tmp_path / "imported")
  summary = workdirs.import_checkpoint(src, wd)
  assert summary["variant"] == "Mu/4" and summary["decoder"] and summary["image_size"] == 16
  ours = json.load(open(os.path.join(wd, "config.json")))
  assert ours["norm_pix_loss"] is True and ours["model"]["decoder_heads"] == 4
  from mae_jax import config_files  # noqa: F401  (the import's config is a shipped one)
  import ml_collections
  c = ml_collections.ConfigDict(ours)
  method = get_method(c)
  params, _ = load_params(wd)
  hf_matches_ours(ref, method, params, _images(2, 16, 3), jax.random.PRNGKey(1), True)
  # export -> import -> export is bitwise.
  again = str(tmp_path / "again")
  workdirs.export_workdir(wd, again, fmt="hf")
  wd2 = str(tmp_path / "imported2")
  workdirs.import_checkpoint(again, wd2)
  _assert_bitwise(load_params(wd2)[0], params)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "mae_jax.convert", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_bad_folders_are_one_line(workdir, tmp_path):
  path, _, _ = workdir
  empty = tmp_path / "empty"
  empty.mkdir()
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  (wrong / "config.json").write_text(json.dumps({"model_type": "bert"}))
  (wrong / "model.safetensors").write_bytes(b"")
  cases = [
      (["export", f"--workdir={path}", "--format=hf", f"--out={tmp_path / 'x.safetensors'}"],
       "is a directory path, not a file"),
      (["import", f"--src={empty}", f"--workdir={tmp_path / 'w1'}"], "without config.json"),
  ]
  for args, message in cases:
    r = _cli(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
  assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "w1").exists()
  with pytest.raises(Exception, match="model_type 'bert'|wrong file type|safetensors"):
    folders.read_folder(str(wrong))
  # A folder of another ViT size than the weights: the mismatch is named.
  out = str(tmp_path / "hf")
  workdirs.export_workdir(path, out, fmt="hf")
  cfg = json.load(open(os.path.join(out, "config.json")))
  cfg["num_attention_heads"] = 8
  json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
  r = _cli("import", f"--src={out}", f"--workdir={tmp_path / 'w2'}")
  assert r.returncode == 2 and "8 attention heads" in r.stderr, r.stderr
  # An existing non-empty folder is kept without --force.
  r = _cli("export", f"--workdir={path}", "--format=hf", f"--out={out}")
  assert r.returncode == 2 and "not empty" in r.stderr
