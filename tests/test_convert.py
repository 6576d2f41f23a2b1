"""Checkpoint conversion: timm and official-MAE parity, bitwise round trips, the CLI, bad input.

Parity tests need the `torch` extra (torch, timm, safetensors); launch/local.sh test installs it,
so CI runs them. Workdirs are written with the project's Checkpointer (params drawn with numpy,
no compiled init or training: seconds saved on 2 CPU cores); their layout is a pretraining
run's: config.json + checkpoints/<step>/{state: params, opt_state, step, rng; meta}.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import convmae as convmae_config
from configs import mae as mae_config
from mae_jax import masking
from mae_jax.checkpoint import Checkpointer
from mae_jax.convert import files, layout, workdirs
from mae_jax.convert.__main__ import main as convert_main
from mae_jax.errors import UserError
from mae_jax.workdir import check_fits, load_params as load_pretrained
from mae_jax.methods import get_method
from mae_jax.models.vit import ViT, sincos_2d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_RTOL = 1e-4  # the bar: max |ours - torch| / max |torch|, float32.


def _draw(shapes, seed: int):
  """Arrays for an abstract tree, scaled like a trained model: kernels ~ N(0, 1/fan_in),
  LayerNorm scales ~ 1 + N(0, 0.1), biases and tokens ~ N(0, 0.1). numpy, no compile."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, s in traverse_util.flatten_dict(shapes).items():
    x = rng.standard_normal(s.shape)
    if path[-1] == "kernel":
      x /= np.sqrt(np.prod(s.shape[:-1]))
    elif path[-1] == "scale":
      x = 1.0 + 0.1 * x
    else:
      x *= 0.1
    out[path] = x.astype(np.float32)
  return traverse_util.unflatten_dict(out)


def _rel(ours, ref) -> float:
  """max |ours - ref| / max |ref|: the relative difference reported in README."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _assert_bitwise(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


def mae_small(image_size=32):
  """MAE Mu/4 (128 wide, 4 blocks) with a 32-wide, 1-block decoder of 4 heads."""
  c = mae_config.get_config("tiny")
  c.unlock()
  c.update(image_size=image_size)
  c.model.update(decoder_width=32, decoder_depth=1, decoder_heads=4)
  return c


def convmae_small(image_size=32):
  """ConvMAE 'mu' at 32 px: a 2x2 stage-3 grid; a 32-wide, 1-block decoder of 4 heads."""
  c = convmae_config.get_config("tiny")
  c.unlock()
  c.update(image_size=image_size)
  c.model.update(decoder_width=32, decoder_depth=1, decoder_heads=4, dwconv_impl="conv")
  return c


def make_workdir(path, config, steps=(1, 2)) -> dict:
  """A pretraining-shaped workdir with checkpoints at `steps`; returns {step: params}."""
  method = get_method(config)
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  shapes = jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  ckpt = Checkpointer(str(path), 3)
  out = {}
  for s in steps:
    params = _draw(shapes, s)
    state = {"params": params, "opt_state": {"mu": params}, "step": np.int32(s),
             "rng": np.zeros(2, np.uint32)}
    ckpt.save(s, state, {"step": s, "method": config.method})
    out[s] = params
  ckpt.wait()
  ckpt.close()
  return out


@pytest.fixture(scope="module")
def mae_workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mae_wd"))
  return path, mae_small(), make_workdir(path, mae_small())


@pytest.fixture(scope="module")
def convmae_workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("convmae_wd"))
  return path, convmae_small(), make_workdir(path, convmae_small(), steps=(3,))


# ----------------------------------------------------------------------------- names


def _torch_shapes(config) -> dict:
  method = get_method(config)
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  shapes = jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images)
  out = {n: layout.torch_shape(s, k) for n, (_, k, s) in layout.spec(shapes).items()}
  out.update({n: v.shape for n, v in layout.constants(shapes, method.grid).items()})
  return out


def test_names_and_shapes_are_the_official_releases():
  # MAE ViT-B/16 and ConvMAE-Base at 224 px, as the official models_mae.py / models_convmae.py
  # state_dicts list them.
  mae = _torch_shapes(mae_config.get_config("vit_b16"))
  want = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768),
          "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,),
          "blocks.11.norm1.weight": (768,), "blocks.0.attn.qkv.weight": (2304, 768),
          "blocks.0.attn.qkv.bias": (2304,), "blocks.0.attn.proj.weight": (768, 768),
          "blocks.0.mlp.fc1.weight": (3072, 768), "blocks.0.mlp.fc2.weight": (768, 3072),
          "norm.weight": (768,), "decoder_embed.weight": (512, 768), "mask_token": (1, 1, 512),
          "decoder_pos_embed": (1, 197, 512), "decoder_blocks.7.attn.qkv.weight": (1536, 512),
          "decoder_norm.bias": (512,), "decoder_pred.weight": (768, 512)}
  assert {k: mae[k] for k in want} == want
  per_block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
  n_block = 2 * len(per_block)
  # 4 + 2 (cls, pos, patch w/b; norm) + 12 blocks; 2 + 2 + 2 + 2 decoder + 8 blocks.
  assert len(mae) == 4 + 2 + 12 * n_block + 2 + 2 + 2 + 2 + 8 * n_block
  assert not any("_" in k.split(".")[0] and k.split(".")[0].startswith("blocks") for k in mae)

  conv = _torch_shapes(convmae_config.get_config("base"))
  want = {"pos_embed": (1, 196, 768), "patch_embed1.proj.weight": (256, 3, 4, 4),
          "patch_embed2.proj.weight": (384, 256, 2, 2),
          "patch_embed3.proj.weight": (768, 384, 2, 2), "patch_embed1.norm.weight": (256,),
          "patch_embed4.weight": (768, 768), "blocks1.1.norm1.weight": (256,),
          "blocks1.0.conv1.weight": (256, 256, 1, 1), "blocks1.0.attn.weight": (256, 1, 5, 5),
          "blocks1.0.conv2.bias": (256,), "blocks2.1.mlp.fc1.weight": (1536, 384, 1, 1),
          "blocks2.1.mlp.fc2.weight": (384, 1536, 1, 1), "blocks3.10.attn.qkv.weight": (2304, 768),
          "norm.weight": (768,), "stage1_output_decode.weight": (768, 256, 4, 4),
          "stage2_output_decode.weight": (768, 384, 2, 2), "decoder_embed.weight": (512, 768),
          "decoder_pos_embed": (1, 196, 512), "decoder_pred.weight": (768, 512)}
  assert {k: conv[k] for k in want} == want
  assert "cls_token" not in conv and "blocks3.11.norm1.weight" not in conv


def test_layout_transposes_and_buffers():
  # Dense [in, out] <-> Linear [out, in]; HWIO <-> OIHW (element (i, j, c, d) -> (d, c, i, j)).
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  t = layout.to_torch(x, layout.CONV)
  assert t.shape == (5, 4, 2, 3) and t[4, 3, 1, 2] == x[1, 2, 3, 4]
  assert np.array_equal(layout.from_torch(t, layout.CONV), x)
  assert layout.torch_name(("decoder", "blocks_3", "mlp", "fc1", "kernel")) == \
      "decoder_blocks.3.mlp.fc1.weight"
  assert layout.torch_name(("encoder", "blocks1_0", "attn", "kernel")) == "blocks1.0.attn.weight"
  assert layout.torch_name(("decoder", "mask_token")) == "mask_token"
  assert layout.torch_name(("stage1_output_decode", "bias")) == "stage1_output_decode.bias"
  enc = {"cls_token": np.zeros((1, 1, 8))}
  np.testing.assert_array_equal(layout.constants(enc, (2, 3))["pos_embed"],
                                sincos_2d(8, 2, 3, cls_token=True)[None])
  assert layout.constants({**enc, "pos_embed": np.zeros((1, 7, 8))}, (2, 3)) == {}


# ----------------------------------------------------------------------------- timm parity


def _timm_features(model, images_nhwc):
  torch = pytest.importorskip("torch")
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    tokens = model.forward_features(x)
    return tokens.numpy(), model.forward_head(tokens).numpy()


def _load_timm(name, path, **kwargs):
  timm = pytest.importorskip("timm")
  from safetensors.torch import load_file
  model = timm.create_model(name, pretrained=False, **kwargs).eval()
  model.load_state_dict(load_file(path), strict=True)
  return model


@pytest.mark.parametrize("variant,image_size", [("Ti/16", 64), ("S/16", 32)])
def test_timm_encoder_features_match(variant, image_size, tmp_path):
  pytest.importorskip("timm")
  model = ViT.from_variant(variant)
  images = np.random.default_rng(1).standard_normal((2, image_size, image_size, 3), np.float32)
  params = _draw(jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])["params"], 0)
  tokens = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images))
  grid = model.grid(images.shape[1:3])
  out = str(tmp_path / "vit.safetensors")
  files.write_state_dict(out, layout.export_state_dict(params, grid), {}, wrap_model=False)
  name = layout.vit_timm_name(variant)
  t_tokens, t_pooled = _timm_features(_load_timm(name, out, num_classes=0, img_size=image_size),
                                      images)
  rel = _rel(tokens, t_tokens)
  print(f"timm {name} at {image_size} px: tokens max rel diff {rel:.2e}")
  assert rel < PARITY_RTOL
  assert _rel(tokens[:, 0], t_pooled) < PARITY_RTOL  # timm's default pool: the cls token.


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_timm_classifier_logits_match_and_round_trip(pool, tmp_path):
  # A fine-tuning ViT (learned pos_embed, head; fc_norm for 'avg') in timm with its head. Two
  # blocks (timm's depth=2 override) keep the compile short: the blocks have their own test.
  pytest.importorskip("timm")
  model = ViT(width=192, depth=2, num_heads=3, patch_size=16, global_pool=pool, num_classes=5,
              learnable_pos_embed=True)
  images = np.random.default_rng(2).standard_normal((2, 32, 32, 3), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])["params"]
  params = _draw(shapes, 3)
  params["head"]["kernel"] *= 30  # logits of a useful size.
  logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images))
  sd = layout.export_state_dict(params, (2, 2))
  assert ("fc_norm.weight" in sd) == (pool == "avg") and ("norm.weight" in sd) == (pool == "token")
  out = str(tmp_path / "cls.safetensors")
  files.write_state_dict(out, sd, {}, wrap_model=False)
  timm_model = _load_timm("vit_tiny_patch16_224", out, num_classes=5, global_pool=pool, img_size=32,
                          depth=2)
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    t_logits = timm_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  rel = _rel(logits, t_logits)
  print(f"timm classifier ({pool}) logits max rel diff {rel:.2e}")
  assert rel < PARITY_RTOL
  back = layout.import_state_dict(files.read_state_dict(out)[0], shapes, (2, 2))
  _assert_bitwise(params, back)


def test_export_of_a_fine_tuning_workdir_goes_through_load_classifier(tmp_path, monkeypatch):
  # The fine-tuning workdir's own format belongs to mae_jax.evaluate.finetune: this checks the
  # export's use of its documented loader, (module, params, info) = load_classifier(workdir).
  from mae_jax.evaluate import finetune
  pytest.importorskip("timm")
  model = ViT(width=192, depth=2, num_heads=3, patch_size=16, global_pool="avg", num_classes=5,
              learnable_pos_embed=True)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = _draw(shapes, 6)
  workdir = tmp_path / "ft"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"task": "finetune", "image_size": 32}))
  calls = []

  def load_classifier(path, step=None, best=False):
    calls.append((path, step, best))
    return model, params, {"step": 7, "image_size": 32, "variant": "Ti/16"}

  monkeypatch.setattr(finetune, "load_classifier", load_classifier)
  out = str(tmp_path / "ft.safetensors")
  info = workdirs.export_workdir(str(workdir), out, step=7)
  assert calls == [(str(workdir), 7, False)] and info["source"].endswith("step 7")
  assert info["hint"].startswith("timm.create_model('vit_tiny_patch16_224', num_classes=5, "
                                 "global_pool='avg', img_size=32)")
  _load_timm("vit_tiny_patch16_224", out, num_classes=5, global_pool="avg", img_size=32, depth=2)
  info = workdirs.export_workdir(str(workdir), out, head=False, force=True)
  assert "head.weight" not in files.read_state_dict(out)[0] and "num_classes=0" in info["hint"]


# ----------------------------------------------------------------------------- official MAE


def torch_mae(img_size, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads):
  """A PyTorch MAE keyed exactly as the official `models_mae.MaskedAutoencoderViT` (timm's
  PatchEmbed and Block, LayerNorm eps 1e-6, fixed pos-embed buffers as parameters), whose
  forward takes ids_keep / ids_restore instead of drawing noise."""
  torch = pytest.importorskip("torch")
  from timm.models.vision_transformer import Block, PatchEmbed
  nn = torch.nn
  norm = functools.partial(nn.LayerNorm, eps=1e-6)

  class MAE(nn.Module):

    def __init__(self):
      super().__init__()
      self.patch_embed = PatchEmbed(img_size, patch, 3, dim)
      n = self.patch_embed.num_patches
      self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
      self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
      self.blocks = nn.ModuleList([Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm)
                                   for _ in range(depth)])
      self.norm = norm(dim)
      self.decoder_embed = nn.Linear(dim, dec_dim)
      self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
      self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dec_dim), requires_grad=False)
      self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads, 4.0, qkv_bias=True,
                                                 norm_layer=norm) for _ in range(dec_depth)])
      self.decoder_norm = norm(dec_dim)
      self.decoder_pred = nn.Linear(dec_dim, patch**2 * 3)

    def forward(self, imgs, ids_keep, ids_restore):
      x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
      x = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, x.shape[-1]))
      cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
      x = torch.cat([cls, x], dim=1)
      for blk in self.blocks:
        x = blk(x)
      x = self.decoder_embed(self.norm(x))
      fill = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
      x_ = torch.cat([x[:, 1:], fill], dim=1)
      x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
      x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
      for blk in self.decoder_blocks:
        x = blk(x)
      return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  return MAE().eval()


def test_official_mae_export_gives_the_same_decoder_predictions(mae_workdir, tmp_path):
  torch = pytest.importorskip("torch")
  workdir, config, by_step = mae_workdir
  out = str(tmp_path / "mae_full.pth")
  info = workdirs.export_workdir(workdir, out, fmt="mae")
  assert info["layout"] == "mae" and "MaskedAutoencoderViT" in info["hint"]
  ckpt = torch.load(out, map_location="cpu", weights_only=True)
  assert set(ckpt) == {"model", "mae_jax"}  # the release's {'model': sd} plus our config.
  ref = torch_mae(32, 4, 128, 4, 4, 32, 1, 4)
  ref.load_state_dict(ckpt["model"], strict=True)
  method = get_method(config)
  images = np.random.default_rng(4).standard_normal((3, 32, 32, 3), np.float32)
  m = masking.random_mask(jax.random.PRNGKey(5), 3, method.num_patches, method.num_keep)
  pred = jax.jit(method.model.apply)({"params": by_step[2]}, images, m.ids_keep, m.ids_restore)
  with torch.no_grad():
    t_pred = ref(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                 torch.from_numpy(np.asarray(m.ids_keep, np.int64)),
                 torch.from_numpy(np.asarray(m.ids_restore, np.int64))).numpy()
  rel = _rel(pred, t_pred)
  print(f"official-layout MAE decoder predictions max rel diff {rel:.2e}")
  assert rel < PARITY_RTOL
  # The encoder alone for timm, its sin-cos buffer written for another image size.
  out = str(tmp_path / "enc64.safetensors")
  info = workdirs.export_workdir(workdir, out, fmt="timm", image_size=64)
  sd, _ = files.read_state_dict(out)
  np.testing.assert_array_equal(sd["pos_embed"], sincos_2d(128, 16, 16, cls_token=True)[None])
  assert "decoder_embed.weight" not in sd and "img_size=64, patch_size=4" in info["hint"]


# ----------------------------------------------------------------------------- round trips


def _no_torch_env(tmp_path) -> dict:
  """Environment whose `import torch` fails, as on an install without the torch extra."""
  block = tmp_path / "no_torch"
  block.mkdir(exist_ok=True)
  (block / "torch.py").write_text("raise ImportError('torch is blocked for this test')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), REPO]))
  env.pop("XLA_FLAGS", None)
  return env


def run_cli(args, env=None):
  return subprocess.run([sys.executable, "-m", "mae_jax.convert", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_mae_round_trip_through_the_cli_is_bitwise(mae_workdir, tmp_path):
  pytest.importorskip("torch")
  workdir, config, by_step = mae_workdir
  out = str(tmp_path / "step1.safetensors")
  # Export needs no torch for .safetensors: run it with torch unimportable.
  r = run_cli(["export", f"--workdir={workdir}", "--step=1", f"--out={out}"], _no_torch_env(tmp_path))
  assert r.returncode == 0, r.stderr
  assert "mae layout" in r.stdout and "step 1" in r.stdout
  back = str(tmp_path / "imported")
  r = run_cli(["import", f"--src={out}", f"--workdir={back}"])
  assert r.returncode == 0, r.stderr
  assert f"--config.init_from={back}" in r.stdout
  params, meta = load_pretrained(back)
  _assert_bitwise(by_step[1], params)
  assert meta["step"] == 0 and meta["method"] == "mae" and meta["source"] == out
  with open(os.path.join(back, "config.json")) as f:
    got = json.load(f)
  assert got == json.loads(config.to_json_best_effort())  # heads too: from the file's metadata.


def test_convmae_round_trip_is_bitwise(convmae_workdir, tmp_path):
  pytest.importorskip("torch")
  workdir, config, by_step = convmae_workdir
  for ext in ("safetensors", "pth"):
    out = str(tmp_path / f"convmae.{ext}")
    info = workdirs.export_workdir(workdir, out)  # auto: the official ConvMAE layout.
    assert info["layout"] == "convmae"
    back = str(tmp_path / f"back_{ext}")
    summary = workdirs.import_checkpoint(out, back)
    assert summary["variant"] == "mu" and summary["decoder"] and summary["pos_embed"] == "sincos"
    params, _ = load_pretrained(back)
    _assert_bitwise(by_step[3], params)
  sd, _ = files.read_state_dict(out)
  np.testing.assert_array_equal(sd["pos_embed"], sincos_2d(128, 2, 2)[None])  # no cls row.
  assert sd["blocks1.0.attn.weight"].shape == (32, 1, 5, 5)


def test_import_official_mae_releases_without_our_metadata(mae_workdir, tmp_path):
  # Official releases carry only {'model': sd}: the size, image size and decoder come from the
  # weights (decoder heads are not in them: the official 16 unless --decoder_heads).
  torch = pytest.importorskip("torch")
  workdir, config, by_step = mae_workdir
  sd = layout.export_state_dict(by_step[2], (8, 8))
  full = str(tmp_path / "mae_pretrain_vit_mu_full.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, full)
  info = workdirs.import_checkpoint(full, str(tmp_path / "full"), decoder_heads=4,
                                    norm_pix_loss=False)
  assert (info["variant"], info["image_size"], info["decoder"]) == ("Mu/4", 32, True)
  params, _ = load_pretrained(str(tmp_path / "full"))
  _assert_bitwise(by_step[2], params)
  with open(tmp_path / "full" / "config.json") as f:
    got = json.load(f)
  assert got["model"]["decoder_heads"] == 4 and got["norm_pix_loss"] is False
  # Encoder-only release (mae_pretrain_vit_*.pth): no decoder, pos_embed dropped as the constant.
  enc = {k: torch.from_numpy(v) for k, v in sd.items()
         if not (k.startswith("decoder_") or k == "mask_token")}
  path = str(tmp_path / "mae_pretrain_vit_mu.pth")
  import argparse
  torch.save({"model": enc, "args": argparse.Namespace(lr=1.0)}, path)  # as training saves.
  info = workdirs.import_checkpoint(path, str(tmp_path / "enc"))
  assert not info["decoder"] and info["pos_embed"] == "sincos"
  params, meta = load_pretrained(str(tmp_path / "enc"))
  assert set(params) == {"encoder"} and meta["decoder"] is False
  _assert_bitwise(by_step[2]["encoder"], params["encoder"])
  fresh = jax.eval_shape(get_method(config).init_params, jax.random.PRNGKey(0),
                         jnp.zeros((1, 32, 32, 3)))
  check_fits(fresh["encoder"], params["encoder"])


def test_import_timm_vit_keeps_its_learned_pos_embed(tmp_path):
  timm = pytest.importorskip("timm")
  from safetensors.torch import save_file
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)  # 1000 classes.
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  path = str(tmp_path / "vit_tiny.safetensors")
  save_file(sd, path)
  info = workdirs.import_checkpoint(path, str(tmp_path / "wd"), arch="timm")
  assert (info["variant"], info["image_size"], info["pos_embed"]) == ("Ti/16", 32, "learned")
  assert any("head.weight" in n for n in info["notes"])
  params, meta = load_pretrained(str(tmp_path / "wd"))
  enc = params["encoder"]
  assert "head" not in enc and meta["dropped"] == ["head.weight", "head.bias"]
  np.testing.assert_array_equal(enc["pos_embed"], sd["pos_embed"].numpy())
  np.testing.assert_array_equal(enc["blocks_3"]["mlp"]["fc1"]["kernel"],
                                sd["blocks.3.mlp.fc1.weight"].numpy().T)
  np.testing.assert_array_equal(enc["patch_embed"]["proj"]["kernel"],
                                sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))


# ----------------------------------------------------------------------------- bad input


def _run_main(argv, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    convert_main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err, err
  return err


def test_bad_inputs_are_one_line_errors(mae_workdir, tmp_path, capsys):
  torch = pytest.importorskip("torch")
  workdir, _, by_step = mae_workdir
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  err = _run_main(["import", f"--src={text}", f"--workdir={tmp_path / 'a'}"], capsys)
  assert "wrong file type" in err
  sd = {k: torch.from_numpy(v) for k, v in layout.export_state_dict(by_step[2], (8, 8)).items()}
  broken = dict(sd)
  del broken["blocks.1.norm1.weight"], broken["decoder_norm.bias"]
  broken["blocks.0.attn.qkv.weight"] = torch.zeros(10, 128)
  broken["extra.thing"] = torch.zeros(1)
  path = str(tmp_path / "broken.pth")
  torch.save({"model": broken}, path)
  err = _run_main(["import", f"--src={path}", f"--workdir={tmp_path / 'b'}"], capsys)
  for part in ("2 missing: blocks.1.norm1.weight, decoder_norm.bias", "1 unexpected: extra.thing",
               "blocks.0.attn.qkv.weight (10, 128) vs (384, 128)"):
    assert part in err, err
  assert not (tmp_path / "b" / "checkpoints").exists()  # nothing written on failure.
  odd = {k: v for k, v in sd.items() if not k.startswith("blocks.3.")}  # depth 3: no such size.
  torch.save({"model": odd}, path)
  err = _run_main(["import", f"--src={path}", f"--workdir={tmp_path / 'c'}"], capsys)
  assert "unknown architecture" in err and "depth 3" in err
  err = _run_main(["import", f"--src={path}", f"--workdir={tmp_path / 'c'}", "--variant=Mu/4"],
                  capsys)
  assert "12 missing: blocks.3." in err
  # Pickled objects other than tensors are refused, not unpickled.
  torch.save({"model": sd, "evil": _Opaque()}, path)
  err = _run_main(["import", f"--src={path}", f"--workdir={tmp_path / 'd'}"], capsys)
  assert "refusing to unpickle" in err and "Unsupported global" in err and "_Opaque" in err
  # Nothing is overwritten without --force.
  out = tmp_path / "exists.pth"
  out.write_bytes(b"keep")
  err = _run_main(["export", f"--workdir={workdir}", f"--out={out}"], capsys)
  assert "exists; pass --force" in err and out.read_bytes() == b"keep"
  err = _run_main(["import", f"--src={out}", f"--workdir={workdir}"], capsys)
  assert "is not empty" in err
  err = _run_main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'x.npz'}"], capsys)
  assert "wrong file type" in err
  err = _run_main(["export", f"--workdir={workdir}", "--format=convmae",
                   f"--out={tmp_path / 'x.pth'}"], capsys)
  assert "needs a convmae pretraining workdir" in err
  err = _run_main(["export", f"--workdir={workdir}", "--format=bogus",
                   f"--out={tmp_path / 'x.pth'}"], capsys)
  assert "invalid choice" in err


class _Opaque:
  pass


def test_pth_without_torch_says_how_to_install(mae_workdir, tmp_path):
  workdir, _, _ = mae_workdir
  r = run_cli(["export", f"--workdir={workdir}", f"--out={tmp_path / 'x.pth'}"],
           _no_torch_env(tmp_path))
  assert r.returncode == 2
  assert r.stderr.strip().count("\n") == 0
  assert r.stderr.startswith("error: torch is not installed") and \
      'pip install "mae-jax[torch]"' in r.stderr
  with pytest.raises(UserError, match="torch extra"):
    files.require("mae_jax_no_such_module")
