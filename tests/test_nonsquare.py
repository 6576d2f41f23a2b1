"""Non-square images end to end: config.image_size=(16, 24) (a 4 x 6 grid of 4 px patches) through
training, `mae_jax.load`, export to a timm folder and to files, import back, and Hugging Face
(ViT classifiers take (H, W); transformers' ViTMAE cannot, so that export is refused)."""

try:  # before anything that imports TensorFlow (see conftest.py)
  import torch
except ImportError:
  torch = None

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mae_jax
from conftest import small_config
from mae_jax import data, tasks
from mae_jax import workdir as workdirs
from mae_jax.convert import files, workdirs as convert
from mae_jax.convert.__main__ import main as convert_main
from mae_jax.errors import UserError
from mae_jax.methods import get_method
from mae_jax.models.vit import ViT, sincos_2d
from test_convert import _assert_bitwise, _draw, _rel, _run_main

HW = (16, 24)
GRID = (4, 6)
RTOL = 1e-5  # on max |ours - theirs| / max |theirs| (test_convert._rel)


def _assert_parity(what: str, ours, theirs) -> None:
  rel = _rel(ours, theirs)
  print(f"{what} at {HW[0]}x{HW[1]} px: max rel diff {rel:.2e}")
  assert rel < RTOL


def _import_back(folder: str, tmp_path, pos_embed: str) -> str:
  """`convert import` of an exported folder into a workdir; checks the size and position
  embedding it recorded and returns the workdir."""
  back = str(tmp_path / "back")
  summary = convert.import_checkpoint(folder, back)
  assert summary["image_size"] == HW and summary["pos_embed"] == pos_embed
  return back


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_data_dir):
  """A 2-step MAE run (Mu/4 at 16 x 24 px, one device) and 6 validation digits at that size."""
  workdir = str(tmp_path_factory.mktemp("nonsquare_mae"))
  config = small_config(digits_data_dir, total_steps=2, image_size=HW)
  tasks.pretrain(config, workdir, devices=jax.devices()[:1])
  source = data.get_source(config.dataset)
  batches = data.eval_batches(source, config.dataset, split="validation", image_size=HW,
                              global_batch_size=6)
  images = next(batches)["image"]
  batches.close()
  return {"workdir": workdir, "model": mae_jax.load(workdir), "source": source, "images": images}


def test_training_and_load(trained, tmp_path):
  m, images = trained["model"], trained["images"]
  with open(os.path.join(trained["workdir"], "config.json")) as f:
    assert json.load(f)["image_size"] == list(HW)
  assert images.shape == (6, *HW, 3)
  assert (m.step, m.image_size, m.grid, m.patch_size) == (2, HW, GRID, 4)
  assert repr(m).startswith("Pretrained(mae Mu/4, 16x24 px, 4 px tokens (4x6 + cls), step 2")
  # preprocess is the evaluation pipeline: a digit as stored (8x8 PNG) gives the batch's image.
  encoded = next(trained["source"].reader("validation", 0, 1, False, None).take(1)
                 .as_numpy_iterator())
  path = tmp_path / "digit.png"
  path.write_bytes(encoded["image"])
  np.testing.assert_allclose(m.preprocess(str(path)), images[:1], atol=1e-5)
  assert m.preprocess(np.zeros((2, 30, 20, 3), np.uint8)).shape == (2, *HW, 3)
  method = get_method(workdirs.read_config(trained["workdir"]))
  params, _ = workdirs.load_params(trained["workdir"])
  want = np.asarray(jax.jit(lambda p, x: method.features(p, x, None))(params, images))
  np.testing.assert_allclose(m.features(images), want, rtol=1e-5, atol=1e-6)
  assert m.features(images, pool="tokens").shape == (6, 1 + 24, 128)
  attn = m.attention(images[:2])
  assert attn.shape == (4, 2, 4, 25, 25)
  np.testing.assert_allclose(attn.sum(axis=-1), 1.0, atol=1e-5)
  out = m.reconstruct(images, seed=1)
  for name in ("original", "masked", "reconstruction", "pasted"):
    assert out[name].shape == (6, *HW, 3), name
  mask = out["mask"]
  assert mask.shape == (6, 24)
  np.testing.assert_array_equal(mask.sum(axis=1), 18)  # 75% of the 24 patches hidden
  # The mask is row-major over the 4 x 6 grid: hidden pixels are where the pasted panel takes the
  # reconstruction, visible ones where it keeps the original.
  pixels = np.repeat(np.repeat(mask.reshape(6, *GRID), 4, axis=1), 4, axis=2)[..., None] > 0
  pixels = np.broadcast_to(pixels, out["original"].shape)
  np.testing.assert_array_equal(out["pasted"][~pixels], out["original"][~pixels])
  np.testing.assert_array_equal(out["pasted"][pixels], out["reconstruction"][pixels])


# ----------------------------------------------------------------------------- export / import


def test_timm_folder_loads_in_timm_and_imports_back(trained, tmp_path):
  timm = pytest.importorskip("timm")
  m, images = trained["model"], trained["images"]
  out = str(tmp_path / "timm_dir")
  info = convert.export_workdir(trained["workdir"], out, fmt="timm")
  assert info["layout"] == "timm folder"
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["model_args"]["img_size"] == list(HW)
  assert cfg["pretrained_cfg"]["input_size"] == [3, *HW]
  model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
  assert tuple(model.patch_embed.img_size) == HW and tuple(model.patch_embed.grid_size) == GRID
  with torch.no_grad():
    theirs = model.forward_features(_nchw(images)).numpy()
  _assert_parity("timm folder: tokens", m.features(images, pool="tokens"), theirs)
  back = _import_back(out, tmp_path, pos_embed="sincos")
  params, _ = workdirs.load_params(back)
  _assert_bitwise(params["encoder"], m.params["encoder"])
  assert mae_jax.load(back).grid == GRID


def test_files_round_trip_through_the_cli(trained, tmp_path, capsys):
  pytest.importorskip("torch")
  wd, m = trained["workdir"], trained["model"]
  for name in ("mae.safetensors", "mae.pth"):  # the whole MAE, official layout; size from metadata
    out, back = str(tmp_path / name), str(tmp_path / f"back_{name}")
    convert_main(["export", f"--workdir={wd}", f"--out={out}"])
    convert_main(["import", f"--src={out}", f"--workdir={back}"])
    assert "at 16x24 px, encoder + decoder" in capsys.readouterr().out
    params, _ = workdirs.load_params(back)
    _assert_bitwise(params, m.params)
    with open(os.path.join(back, "config.json")) as f:
      assert json.load(f)["image_size"] == list(HW)
  # A timm file without our metadata: 24 positions name no square grid, --image_size=H,W does.
  out = str(tmp_path / "vit.safetensors")
  convert_main(["export", f"--workdir={wd}", "--format=timm", f"--out={out}"])
  assert "img_size=(16, 24)" in capsys.readouterr().out  # the printed timm.create_model call
  sd, _ = files.read_state_dict(out)
  np.testing.assert_array_equal(sd["pos_embed"], sincos_2d(128, *GRID, cls_token=True)[None])
  bare = str(tmp_path / "bare.safetensors")
  files.write_state_dict(bare, sd, {}, wrap_model=False)
  err = _run_main(["import", f"--src={bare}", f"--workdir={tmp_path / 'w1'}"], capsys)
  assert "24 patch positions, not a square grid; pass --image_size=H,W" in err
  convert_main(["import", f"--src={bare}", f"--workdir={tmp_path / 'w2'}", "--image_size=16,24"])
  params, _ = workdirs.load_params(str(tmp_path / "w2"))
  _assert_bitwise(params["encoder"], m.params["encoder"])
  # --image_size=H,W on export writes the sin-cos buffers of that grid; bad sizes are one line.
  other = str(tmp_path / "other.safetensors")
  convert_main(["export", f"--workdir={wd}", "--format=timm", f"--out={other}",
                "--image_size=24,32"])
  np.testing.assert_array_equal(files.read_state_dict(other)[0]["pos_embed"],
                                sincos_2d(128, 6, 8, cls_token=True)[None])
  err = _run_main(["export", f"--workdir={wd}", f"--out={tmp_path / 'x.safetensors'}",
                   "--image_size=16,x"], capsys)
  assert "expected N or H,W" in err
  err = _run_main(["export", f"--workdir={wd}", f"--out={tmp_path / 'x.safetensors'}",
                   "--image_size=16,26"], capsys)
  assert "--image_size=16x26 is not a multiple of the patch size 4" in err
  assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_mae_folder_is_refused(trained, tmp_path, capsys):
  out = tmp_path / "hf"
  with pytest.raises(UserError, match="square patch grid only") as e:
    convert.export_workdir(trained["workdir"], str(out), fmt="hf")
  assert "\n" not in str(e.value)
  err = _run_main(["export", f"--workdir={trained['workdir']}", "--format=hf", f"--out={out}"],
                  capsys)
  assert "ViTMAEForPreTraining cannot be built for 16x24 px images" in err
  assert not out.exists()
  # The reason still holds in the installed transformers (when this fails, lift the refusal).
  transformers = pytest.importorskip("transformers")
  config = transformers.ViTMAEConfig(
      hidden_size=128, num_hidden_layers=1, num_attention_heads=4, intermediate_size=512,
      image_size=list(HW), patch_size=4, decoder_hidden_size=32, decoder_num_hidden_layers=1,
      decoder_num_attention_heads=4, decoder_intermediate_size=128)
  with pytest.raises(RuntimeError, match="must match the size"):
    transformers.ViTMAEForPreTraining(config)


def test_hf_vit_classifier_folder_matches_and_imports_back(tmp_path, monkeypatch):
  # A [CLS] classifier with a learned pos_embed at 16 x 24 px: transformers' ViT takes (H, W).
  transformers = pytest.importorskip("transformers")
  from mae_jax.evaluate import finetune
  model = ViT(width=128, depth=4, num_heads=4, patch_size=4, global_pool="token", num_classes=5,
              learnable_pos_embed=True)
  images = np.random.default_rng(3).standard_normal((3, *HW, 3)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *HW, 3)))["params"]
  params = _draw(shapes, 4)
  params["head"]["kernel"] *= 30  # logits of a useful size.
  logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images))
  wd = tmp_path / "ft"
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps({"task": "finetune", "image_size": list(HW),
                                              "model": {"variant": "Mu/4"}}))
  info = {"step": 3, "image_size": list(HW), "variant": "Mu/4"}
  monkeypatch.setattr(finetune, "load_classifier", lambda *a, **k: (model, params, info))
  out = str(tmp_path / "hf_vit")
  convert.export_workdir(str(wd), out, fmt="hf")
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["image_size"] == list(HW)
  hf = transformers.ViTForImageClassification.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = hf(pixel_values=_nchw(images)).logits.numpy()
  _assert_parity("ViTForImageClassification: logits", logits, theirs)
  got, _ = workdirs.load_params(_import_back(out, tmp_path, pos_embed="learned"))
  _assert_bitwise(got["encoder"], {k: v for k, v in params.items() if k != "head"})
