"""TinyMIM: relations and their KL, head regrouping, colour jitter, the frozen teacher in the step,
the chain, config errors, and the student as a plain ViT for downstream tasks."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import convmae as convmae_config
from configs import linprobe as linprobe_config
from configs import mae as mae_config
from configs import tinymim as tinymim_config
from mae_jax import tasks
from mae_jax.checkpoint import Checkpointer
from mae_jax.errors import UserError
from mae_jax import workdir as workdirs
from mae_jax.methods import get_method, tinymim
from mae_jax.models.vit import Attention
from conftest import flat, override, run_cli, small_config, snapshot

IMAGES = jnp.zeros((1, 16, 16, 3))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, digits_data_dir):
  """An MAE workdir as an import writes one (config.json, params at step 2): Mu/4 (128 wide,
  4 blocks, 4 heads) at 16 px, random weights (no training needed for these tests)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  config = small_config(digits_data_dir)
  params = jax.jit(get_method(config).init_params)(jax.random.PRNGKey(5), IMAGES)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json())
  ckpt = Checkpointer(workdir, max_to_keep=1)
  ckpt.save(2, {"params": params}, {"step": 2, "method": "mae"})
  ckpt.wait()
  ckpt.close()
  return workdir


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher, digits_data_dir):
  """A 2-step TinyMIM workdir: Nano/4 student (64 wide, 2 heads) from the Mu/4 teacher."""
  workdir = str(tmp_path_factory.mktemp("tinymim"))
  out = tasks.pretrain(tiny_config(teacher, digits_data_dir), workdir, devices=jax.devices()[:1])
  return workdir, out


def tiny_config(teacher_workdir, data_dir="", **overrides):
  c = tinymim_config.get_config("tiny")
  c.image_size = 16
  c.batch_size = 16
  c.total_steps = 2
  c.warmup_epochs = 0.1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.teacher.workdir = teacher_workdir
  c.dataset.data_dir = data_dir
  return override(c, overrides)


def _ready(method, rng=0):
  """(params, model_state) with the teacher's checkpoint loaded, as a fresh run starts."""
  params, state = method.init_state(jax.random.PRNGKey(rng), IMAGES)
  return method.initial_weights(params, state)


@functools.lru_cache(maxsize=None)
def _loss(method):
  """method.train_loss, jitted once per method (the tests call it on equal shapes)."""
  return jax.jit(method.train_loss)


def _batch(n=4, seed=0):
  return {"image": jax.random.normal(jax.random.PRNGKey(seed), (n, 16, 16, 3))}


# ----------------------------------------------------------------------------- relations


def test_relation_kl_hand_computed():
  # One head of width 1 (scale 1), two tokens. Teacher: q = (1, 0), k = (ln 3, 0): query 0 sees
  # softmax(ln 3, 0) = (3/4, 1/4), query 1 (1/2, 1/2). Student: k = 0, every row (1/2, 1/2).
  q = jnp.array([1.0, 0.0]).reshape(1, 2, 1, 1)
  t = tinymim.relation_log_probs(q, jnp.array([np.log(3.0), 0.0]).reshape(1, 2, 1, 1), 1)
  s = tinymim.relation_log_probs(q, jnp.zeros((1, 2, 1, 1)), 1)
  np.testing.assert_allclose(np.exp(t[0, 0]), [[0.75, 0.25], [0.5, 0.5]], rtol=1e-6)
  row0 = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
  assert float(tinymim.relation_kl(t, s)) == pytest.approx(row0 / 2, rel=1e-6)  # mean of rows
  assert float(tinymim.relation_kl(t, t)) == pytest.approx(0.0, abs=1e-7)


def test_relation_is_the_attention_map_and_heads_regroup_channels():
  # With its own head count, the Q-K relation is the attention the block computes.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  attn = Attention(num_heads=2)
  params = attn.init(jax.random.PRNGKey(1), x)
  _, inter = jax.jit(lambda p, x: attn.apply(p, x, mutable=["intermediates"]))(params, x)
  q, k = inter["intermediates"]["q"][0], inter["intermediates"]["k"][0]  # [2, 5, 2, 8]
  np.testing.assert_allclose(np.exp(tinymim.relation_log_probs(q, k, 2)),
                             inter["intermediates"]["attention"][0], atol=1e-6)
  # With the teacher's 4 heads: head j uses channels 4j..4j+3 of the 16, scale 1/sqrt(4).
  got = np.exp(tinymim.relation_log_probs(q, k, 4))
  qf, kf = np.asarray(q).reshape(2, 5, 16), np.asarray(k).reshape(2, 5, 16)
  for j in range(4):
    logits = np.einsum("bqd,bkd->bqk", qf[..., 4 * j:4 * j + 4], kf[..., 4 * j:4 * j + 4]) / 2.0
    want = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got[:, j], want / want.sum(-1, keepdims=True), atol=1e-6)
  with pytest.raises(ValueError, match="16 channels do not split into 3 heads"):
    tinymim.relation_log_probs(q, k, 3)


def test_color_jitter_matches_torchvision_and_keeps_the_pixel_range():
  import torch
  import torchvision.transforms.functional as TF
  x = np.random.default_rng(0).uniform(0, 1, (6, 5, 3)).astype(np.float32)
  xt = torch.from_numpy(x).permute(2, 0, 1)
  for ours, theirs in ((tinymim.adjust_brightness, TF.adjust_brightness),
                       (tinymim.adjust_contrast, TF.adjust_contrast),
                       (tinymim.adjust_saturation, TF.adjust_saturation)):
    for f in (0.6, 1.3):
      np.testing.assert_allclose(ours(jnp.asarray(x), f),
                                 theirs(xt, f).permute(1, 2, 0).numpy(), atol=1e-5)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  images = (jnp.asarray(x)[None].repeat(8, 0) - jnp.asarray(mean)) / jnp.asarray(std)
  jitter = jax.jit(tinymim.color_jitter, static_argnums=(2, 3, 4))
  same = jitter(jax.random.PRNGKey(0), images, 0.0, mean, std)
  np.testing.assert_allclose(same, images, atol=1e-5)
  out = jitter(jax.random.PRNGKey(0), images, 0.4, mean, std)
  pixels = np.asarray(out) * np.asarray(std) + np.asarray(mean)
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  assert len({float(np.abs(out[i] - images[i]).mean()) for i in range(8)}) == 8  # per image


# ----------------------------------------------------------------------------- the method


def test_same_network_and_weights_give_zero_relation_loss(teacher):
  method = get_method(tiny_config(teacher, **{"model.variant": "Mu/4", "color_jitter": 0.0}))
  params, state = _ready(method)
  batch = _batch()
  params = {"encoder": state["teacher"]}  # the student is the teacher (all 4 blocks, norm).
  loss, (m, _) = _loss(method)(params, state, batch, jax.random.PRNGKey(3), 0)
  assert abs(float(m["loss_qk"])) < 1e-6 and abs(float(m["loss_vv"])) < 1e-6, m
  assert abs(float(loss)) < 2e-6
  # Another student (fresh weights of the same network): positive.
  other = method.init_params(jax.random.PRNGKey(7), IMAGES)
  _, (m, _) = _loss(method)(other, state, batch, jax.random.PRNGKey(3), 0)
  assert float(m["loss_qk"]) > 1e-3 and float(m["loss_vv"]) > 1e-3


def test_distilling_trains_the_student_only_and_keeps_the_teacher_bitwise(teacher, distilled):
  workdir, out = distilled
  state = out["state"]
  assert set(state.params) == {"encoder"}  # no teacher, no head in the trained params.
  loaded, _ = workdirs.load_params(teacher)
  want, got = flat(loaded["encoder"]), flat(state.model_state["teacher"])
  assert got.keys() == want.keys()  # layer 0 = last: all 4 blocks and the final norm.
  for k in want:
    assert np.array_equal(want[k], got[k]), k  # bitwise after the jitted steps.
  losses = [h for h in out["history"] if "loss" in h]
  assert all(h["loss_qk"] > 0 and h["loss_vv"] > 0 for h in losses)
  assert all(h["loss"] == pytest.approx(h["loss_qk"] + h["loss_vv"], rel=1e-5) for h in losses)

  method = get_method(tiny_config(teacher))
  params, model_state = state.params, state.model_state
  batch, rng = _batch(), jax.random.PRNGKey(1)
  grad_fn = jax.jit(jax.grad(lambda p, ms: method.train_loss(p, ms, batch, rng, 0)[0],
                             argnums=(0, 1)))
  g_student, g_teacher = grad_fn(params, model_state)
  assert all(not np.any(x) for x in jax.tree.leaves(g_teacher))  # stop_gradient
  g = flat(g_student)
  for name in ("encoder/patch_embed/proj/kernel", "encoder/blocks_0/mlp/fc1/kernel",
               "encoder/blocks_3/attn/qkv/kernel", "encoder/blocks_3/norm1/scale"):
    assert np.abs(g[name]).max() > 0, name
  # The last block after q/k/v and the final norm are not reached: no gradient, no update.
  unused = [k for k in g if k.startswith(("encoder/blocks_3/mlp", "encoder/blocks_3/attn/proj",
                                          "encoder/blocks_3/norm2", "encoder/norm/"))]
  assert len(unused) == 10 and all(not np.any(g[k]) for k in unused)
  tx = method.optimizer(optax.constant_schedule(1e-2), params)
  ones = jax.tree.map(jnp.ones_like, params)
  updates = flat(tx.update(ones, tx.init(params), params)[0])
  assert all(not np.any(updates[k]) for k in unused)
  assert np.abs(updates["encoder/blocks_3/attn/qkv/kernel"]).min() > 0


def test_student_loads_into_a_linear_probe_without_the_teacher(distilled, digits_data_dir,
                                                               tmp_path):
  workdir, out = distilled
  # A copy whose teacher is gone: downstream tasks rebuild only the student.
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, "config.json")) as f:
    cfg = json.load(f)
  cfg["teacher"]["workdir"] = str(tmp_path / "deleted_teacher")
  with open(os.path.join(copy, "config.json"), "w") as f:
    json.dump(cfg, f)
  c = linprobe_config.get_config("digits")
  override(c, {"init_from": copy, "dataset.data_dir": digits_data_dir, "batch_size": 16})
  task = tasks.downstream_trainable(c)
  params, model_state = task.init_state(jax.random.PRNGKey(0), IMAGES)
  params, model_state = task.initial_weights(params, model_state)
  got = flat(model_state["frozen"]["encoder"])
  want = flat(out["state"].params["encoder"])
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
  feats = task.method.features(model_state["frozen"], jnp.ones((2, 16, 16, 3)))
  assert feats.shape == (2, 64)  # the mean of the patch tokens by default.


def test_chain_a_tinymim_student_is_the_next_teacher(distilled):
  workdir, out = distilled
  # Mu/4 student (4 heads) from the Nano/4 student (2 heads), relations at its block 2 of 4.
  method = get_method(tiny_config(workdir, **{"model.variant": "Mu/4", "teacher.layer": 2}))
  t = method.teacher
  assert (t.method, t.variant, t.num_heads, t.layer, t.depth) == ("tinymim", "Nano/4", 2, 2, 4)
  params, state = _ready(method)
  assert sorted(state["teacher"]) == ["blocks_0", "blocks_1", "cls_token", "norm", "patch_embed"]
  want = flat(out["state"].params["encoder"])
  for k, v in flat(state["teacher"]).items():
    assert np.array_equal(v, want[k]), k
  _, (m, _) = _loss(method)(params, state, _batch(), jax.random.PRNGKey(0), 0)
  assert float(m["loss_qk"]) > 0 and np.isfinite(float(m["loss"]))


def test_feature_and_cls_targets_and_a_bfloat16_teacher(teacher):
  targets = "relation,feature,cls"
  method = get_method(tiny_config(teacher, targets=targets))
  params, state = _ready(method)
  assert set(params) == {"encoder", "feature_head", "cls_head"}
  assert params["feature_head"]["kernel"].shape == (64, 128)  # student width -> teacher width
  assert method.unused_params() == ()  # the final tokens are trained too.
  batch, rng = _batch(), jax.random.PRNGKey(2)
  loss, (m, _) = _loss(method)(params, state, batch, rng, 0)
  assert set(m) == {"loss", "loss_qk", "loss_vv", "loss_feature", "loss_cls"}
  assert all(float(v) > 0 for v in m.values())
  assert float(loss) == pytest.approx(sum(float(m[k]) for k in m if k != "loss"), rel=1e-5)
  bf16 = get_method(tiny_config(teacher, targets=targets, **{"teacher.dtype": "bfloat16"}))
  _, s16 = _ready(bf16)
  assert {x.dtype for x in jax.tree.leaves(s16["teacher"])} == {jnp.dtype(jnp.bfloat16)}
  _, (m16, _) = _loss(bf16)(params, s16, batch, rng, 0)
  for k in m:
    np.testing.assert_allclose(float(m16[k]), float(m[k]), rtol=0.05, err_msg=k)


# ----------------------------------------------------------------------------- configs, errors


def test_paper_variants_need_a_teacher():
  for arg in ("vit_b16", "vit_s16", "vit_t16"):
    with pytest.raises(UserError, match="config.teacher.workdir=TEACHER_WORKDIR is required"):
      get_method(tinymim_config.get_config(arg))


def _fake_teacher(path, config="mae", **overrides):
  """A workdir with only a config.json (enough for the checks made before the checkpoint)."""
  c = (mae_config if config == "mae" else convmae_config).get_config()
  c.unlock()
  c.update_from_flattened_dict(overrides)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(c.to_json())
  return str(path)


@pytest.mark.parametrize("make,overrides,match", [
    (None, {"teacher.workdir": "/nonexistent/teacher"}, "does not exist"),
    (lambda p: _fake_teacher(p, image_size=32), {}, "pretrained at image_size 32"),
    (lambda p: _fake_teacher(p, image_size=16, **{"model.variant": "Mu/8"}), {},
     "8 px patches, the student 4 px"),
    (lambda p: _fake_teacher(p, image_size=16, **{"model.variant": "Ti/4"}), {},
     "width 64 does not split into the 3 heads"),
    (lambda p: _fake_teacher(p, "convmae"), {"image_size": 64}, "needs a ViT teacher"),
    (lambda p: _fake_teacher(p, image_size=16), {}, "no checkpoints in"),
    ("teacher", {"teacher.layer": 5}, r"teacher.layer=5 is outside 0..4"),
    ("teacher", {"teacher.step": 7}, r"teacher.step=7\): no checkpoint for step 7 .* has steps \[2\]"),
])
def test_bad_teacher(make, overrides, match, teacher, tmp_path):
  where = teacher if make == "teacher" else (make(tmp_path / "t") if make else "")
  method = get_method(tiny_config(where, **overrides))
  with pytest.raises(UserError, match=match) as e:
    method.teacher
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,match", [
    ({"teacher.dtype": "float16"}, "teacher.dtype must be one of"),
    ({"teacher.layer": -1}, "teacher.layer must be >= 0"),
    ({"targets": "relation,pixels"}, "config.targets='relation,pixels'"),
    ({"color_jitter": -0.1}, "color_jitter must be >= 0"),
])
def test_bad_config(overrides, match, teacher):
  with pytest.raises(UserError, match=match):
    get_method(tiny_config(teacher, **overrides))


def test_cli_teacher_error_is_one_line_and_leaves_the_workdir_alone(teacher, tmp_path,
                                                                    digits_data_dir):
  # Checked when the training state is built (after the workdir check, before anything is
  # written); the errors raised when the method is constructed take the path of every method's.
  wd = tmp_path / "existing"
  wd.mkdir()
  (wd / "notes.txt").write_text("keep me")
  before = snapshot(str(wd))
  r = run_cli("--config=configs/tinymim.py", f"--workdir={wd}", "--config.image_size=16",
           "--config.batch_size=16", "--config.total_steps=2",
           f"--config.dataset.data_dir={digits_data_dir}", f"--config.teacher.workdir={teacher}",
           "--config.teacher.layer=9",
           env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith("error: config.teacher.layer=9 is outside 0..4"), r.stderr
  assert snapshot(str(wd)) == before
