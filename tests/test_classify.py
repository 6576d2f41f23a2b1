"""Fine-tuning, partial fine-tuning and linear probing (mae_jax.evaluate: finetune, linprobe,
classifier) and the classification evaluator."""

import json
import os
import subprocess
import sys
import types

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import tasks
from mae_jax.errors import UserError
from mae_jax import workdir as workdirs
from mae_jax.evaluate import classifier, finetune
from mae_jax.models.vit import ViT, resample_pos_embed, sincos_2d
from conftest import REPO, flat, small_config, task_config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, digits_data_dir):
  """A 2-step MAE pretraining workdir (Mu/4 at 16 px) with real Orbax checkpoints."""
  workdir = str(tmp_path_factory.mktemp("pre"))
  tasks.pretrain(small_config(digits_data_dir, total_steps=2), workdir, devices=jax.devices()[:2])
  return workdir


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_trains_only_the_head_and_keeps_the_encoder_bitwise(pretrained,
                                                                         digits_data_dir,
                                                                         tmp_path):
  config = task_config("linprobe", pretrained, digits_data_dir)
  out = tasks.run(config, str(tmp_path / "lp"), devices=jax.devices()[:2])
  assert config.image_size == 16  # 0 = the pretraining run's.
  state = out["state"]
  assert set(state.params) == {"head"}  # the only trained parameters.
  loaded, _ = workdirs.load_params(pretrained)
  # Bitwise, names and dtypes included: the probe never touched it.
  chex.assert_trees_all_equal(jax.device_get(loaded["encoder"]),
                              jax.device_get(state.model_state["frozen"]["encoder"]),
                              strict=True)
  stats = state.model_state["batch_stats"]["bn"]
  assert not np.allclose(stats["mean"], 0.0)  # running statistics were updated.
  evals = [h for h in out["history"] if "classification/top1" in h]
  last = evals[-1]
  assert 0.0 <= last["classification/top1"] <= last["classification/top5"] <= 1.0
  assert last["classification/loss"] > 0


def test_linear_probe_computes_no_gradient_for_the_encoder(pretrained, digits_data_dir):
  # The backward pass adds exactly one matmul (the head kernel's gradient) to the forward one:
  # none of the encoder's matmuls is differentiated.
  task = tasks.downstream_trainable(task_config("linprobe", pretrained, digits_data_dir))
  params, model_state = task.init_state(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  batch = {"image": jnp.zeros((4, 16, 16, 3)), "label": jnp.arange(4)}
  step = jnp.zeros((), jnp.int32)

  def count_matmuls(fn):
    jaxpr = jax.make_jaxpr(fn)(params, model_state, batch, jax.random.PRNGKey(1), step)
    def walk(j):
      n = 0
      for eqn in j.eqns:
        n += eqn.primitive.name == "dot_general"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          n += walk(sub)
      return n
    return walk(jaxpr.jaxpr)

  forward = count_matmuls(task.train_loss)
  both = count_matmuls(jax.value_and_grad(task.train_loss, has_aux=True))
  assert forward > 10 and both == forward + 1


# ----------------------------------------------------------------------------- fine-tuning


def test_finetune_starts_from_the_pretrained_encoder(pretrained, digits_data_dir):
  task = tasks.downstream_trainable(task_config("finetune", pretrained, digits_data_dir))
  params, model_state = task.init_state(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  assert model_state == {}  # full fine-tuning: everything trains.
  params, _ = task.initial_weights(params, model_state)
  loaded, _ = workdirs.load_params(pretrained)
  enc, got = flat(loaded["encoder"]), flat(params)
  for k, v in enc.items():
    if k.startswith("norm/"):
      assert k not in got  # average pooling uses a fresh fc_norm; the pretrained norm is dropped.
    else:
      assert np.array_equal(v, got[k]), k
  np.testing.assert_array_equal(got["pos_embed"], sincos_2d(128, 4, 4, cls_token=True)[None])
  assert got["fc_norm/scale"].tolist() == [1.0] * 128
  assert got["head/kernel"].shape == (128, 10) and np.abs(got["head/kernel"]).max() < 2e-4


def test_partial_finetune_trains_the_last_blocks_only(pretrained, digits_data_dir, tmp_path):
  config = task_config("finetune", pretrained, digits_data_dir,
                        **{"classifier.train_blocks": 1, "dataset.randaugment": "",
                           "dataset.reprob": 0.0})
  out = tasks.run(config, str(tmp_path / "pft"), devices=jax.devices()[:2])
  state = out["state"]
  assert set(state.params) == {"blocks_3", "fc_norm", "head"}  # Mu has 4 blocks.
  frozen = flat(state.model_state["frozen"])
  loaded = flat(workdirs.load_params(pretrained)[0]["encoder"])
  for k, v in frozen.items():
    if k == "pos_embed":
      np.testing.assert_array_equal(v, sincos_2d(128, 4, 4, cls_token=True)[None])
    else:
      assert np.array_equal(v, loaded[k]), k
  assert not np.array_equal(np.asarray(state.params["blocks_3"]["mlp"]["fc1"]["kernel"]),
                            loaded["blocks_3/mlp/fc1/kernel"])
  # The fine-tuned classifier loads back whole (trainable + frozen) from the workdir.
  model, params, info = finetune.load_classifier(str(tmp_path / "pft"))
  assert info["num_classes"] == 10 and info["step"] == 3
  logits = model.apply({"params": params}, jnp.zeros((2, 16, 16, 3)))
  assert logits.shape == (2, 10)


def test_finetune_cli_writes_summary_and_keeps_best(pretrained, digits_data_dir, tmp_path):
  workdir = tmp_path / "ft"
  cmd = [sys.executable, "-m", "mae_jax.main", "--config=configs/finetune.py",
         f"--workdir={workdir}", f"--config.init_from={pretrained}",
         f"--config.dataset.data_dir={digits_data_dir}", "--config.batch_size=32",
         "--config.total_steps=4", "--config.evals.classification.every_steps=2",
         "--config.evals.classification.batch_size=100", "--config.classifier.pool=cls"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((workdir / "finetune.json").read_text())
  best = summary["best"]
  assert summary["metric"] == "classification/top1" and summary["last"]["step"] == 4
  assert 0 <= best["classification/top1"] <= 1
  assert best["classification/top1"] >= summary["last"]["classification/top1"]
  assert sorted(os.listdir(workdir / "best")) == [str(best["step"])]
  assert "step 2 | classification top1" in proc.stdout
  # Bad input: one line, exit 2, the workdir untouched.
  before = sorted(os.listdir(workdir))
  for flag, msg in [("--config.classifier.pool=max", "pool"),
                    ("--config.init_from=/nonexistent", "config.json"),
                    ("--config.classifier.train_blocks=9", "train_blocks"),
                    ("--config.eval_every_steps=2", "config.evals.classification.every_steps"),
                    ("--config.classifier.eval_batch_size=8",
                     "config.evals.classification.batch_size")]:
    bad = subprocess.run(cmd + [flag], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and msg in lines[0], bad.stderr[-800:]
  assert sorted(os.listdir(workdir)) == before


# ----------------------------------------------------------------------------- weights


def test_load_encoder_into_reports_what_does_not_fit():
  model = ViT.from_variant("Mu/4", global_pool="avg", num_classes=3, learnable_pos_embed=True)
  fresh = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  encoder = ViT.from_variant("Mu/4").init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))
  encoder = dict(encoder["params"])
  pre = types.SimpleNamespace(grid=(4, 4), task_grid=(4, 4), has_cls=True)
  ok = classifier.load_encoder_into(fresh, encoder, pre, where="ckpt")
  assert np.array_equal(ok["blocks_0"]["attn"]["qkv"]["kernel"],
                        encoder["blocks_0"]["attn"]["qkv"]["kernel"])
  wide = ViT.from_variant("Ti/4").init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(UserError, match=r"shapes differ .*cls_token \(1, 1, 192\) vs \(1, 1, 128\)"):
    classifier.load_encoder_into(fresh, dict(wide["params"]), pre, where="ckpt")
  del encoder["blocks_2"]
  encoder["extra_thing"] = {"w": np.zeros(3)}
  with pytest.raises(UserError, match=r"ckpt does not fit the classifier: 12 missing: blocks_2/"
                                      r".*; 1 unexpected: extra_thing/w"):
    classifier.load_encoder_into(fresh, encoder, pre, where="ckpt")


def test_pos_embed_is_interpolated_to_a_new_grid():
  pos = sincos_2d(16, 4, 4, cls_token=True)[None]
  same = resample_pos_embed(pos, (4, 4), (4, 4), 1)
  np.testing.assert_allclose(same, pos, atol=1e-6)  # bicubic at the sample points is exact.
  up = resample_pos_embed(pos, (4, 4), (6, 8), 1)
  assert up.shape == (1, 1 + 48, 16) and np.array_equal(up[:, 0], pos[:, 0])
  torch = pytest.importorskip("torch")
  grid = torch.tensor(pos[:, 1:]).reshape(1, 4, 4, 16).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(1, 48, 16).numpy()
  np.testing.assert_allclose(up[:, 1:], ref, atol=1e-5)  # the official interpolate_pos_embed.


def test_finetune_at_a_larger_resolution_interpolates_the_pretraining_grid(pretrained,
                                                                           digits_data_dir):
  task = tasks.downstream_trainable(task_config("finetune", pretrained, digits_data_dir,
                                               image_size=24))
  params, state = task.init_state(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))
  params, _ = task.initial_weights(params, state)
  want = resample_pos_embed(sincos_2d(128, 4, 4, cls_token=True)[None], (4, 4), (6, 6), 1)
  np.testing.assert_allclose(np.asarray(params["pos_embed"]), want, atol=1e-6)


def test_finetune_weight_decay_skips_tokens_and_vectors():
  params = {"cls_token": jnp.zeros((1, 1, 4)), "pos_embed": jnp.zeros((1, 5, 4)),
            "blocks_0": {"k": jnp.zeros((4, 4)), "b": jnp.zeros((4,))}}
  mask = finetune.finetune_decay_mask(params)
  assert mask == {"cls_token": False, "pos_embed": False, "blocks_0": {"k": True, "b": False}}


def test_pretraining_helps_verdict():
  from mae_jax.evaluate.pretraining_helps import verdict
  ok, lines = verdict({"knn": {"pretrained": 0.9, "random": 0.8},
                       "linprobe": {"pretrained": 0.7, "random": 0.6},
                       "finetune": {"pretrained": 0.5, "random": 0.6}})  # fine-tuning informs only.
  assert ok and len(lines) == 4
  assert not verdict({"knn": {"pretrained": 0.9, "random": 0.8},
                      "linprobe": {"pretrained": 0.6, "random": 0.6}})[0]
