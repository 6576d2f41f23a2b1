"""The training loop end to end on the embedded digits: devices, resume, CLI, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, SMALL, run_cli, small_config, snapshot
from mae_jax import tasks, train
from mae_jax.errors import UserError


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_one_and_eight_devices_agree(tmp_path, digits_data_dir):
  assert len(jax.devices()) == 8
  one = tasks.pretrain(small_config(digits_data_dir), str(tmp_path / "one"),
                       devices=jax.devices()[:1])
  eight = tasks.pretrain(small_config(digits_data_dir), str(tmp_path / "eight"))
  assert [h["step"] for h in one["history"]] == [2, 4]
  np.testing.assert_allclose([h["loss"] for h in one["history"]],
                             [h["loss"] for h in eight["history"]], rtol=2e-5)
  # Adam divides by sqrt(v): where a gradient is ~0 (some biases), float noise of another
  # reduction order can flip an update's sign. Bound the difference by a small fraction of the
  # distance the parameters travelled (4 steps at lr <= 3e-4 move a parameter up to ~1e-3).
  for a, b in zip(_leaves(one["state"].params), _leaves(eight["state"].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
  assert len(eight["state"].params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"].sharding
             .device_set) == 8


def test_gradient_accumulation_equals_the_big_batch_step():
  # A loss that ignores the RNG: 4 micro-batches must give the 1-batch update, metrics included.
  # The model state counts the micro-batches it saw (it is threaded through them).
  def loss_fn(params, model_state, batch, rng, step):
    del rng, step
    err = batch["x"] @ params["w"] + params["b"] - batch["y"]
    loss = jnp.mean(err**2)
    return loss, ({"loss": loss}, {"seen": model_state["seen"] + batch["x"].shape[0]})

  tx = optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.05)
  sched = lambda step: 1e-2  # noqa: E731
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                           model_state={"seen": jnp.zeros((), jnp.int32)})
  batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (8, 3)),
           "y": jax.random.normal(jax.random.PRNGKey(2), (8, 2))}
  s1, m1 = jax.jit(train.make_train_step(loss_fn, tx, sched, 1))(state, batch)
  s4, m4 = jax.jit(train.make_train_step(loss_fn, tx, sched, 4))(state, batch)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-6)
  for a, b in zip(_leaves(s1.params), _leaves(s4.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(s4.step) == 1
  assert int(s1.model_state["seen"]) == int(s4.model_state["seen"]) == 8


def test_grad_accum_config_trains(tmp_path, digits_data_dir):
  out = tasks.pretrain(small_config(digits_data_dir, grad_accum_steps=2), str(tmp_path / "acc"),
                       devices=jax.devices()[:2])
  assert int(out["state"].step) == 4 and all(np.isfinite(h["loss"]) for h in out["history"])


def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, digits_data_dir):
  cfg = dict(total_steps=6)
  straight = tasks.pretrain(small_config(digits_data_dir, **cfg), str(tmp_path / "a"),
                            devices=jax.devices()[:2])
  wd = str(tmp_path / "b")
  first = tasks.pretrain(small_config(digits_data_dir, **cfg), wd, devices=jax.devices()[:2],
                         stop_at_step=3)
  assert int(first["state"].step) == 3
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "3"]
  resumed = tasks.pretrain(small_config(digits_data_dir, **cfg), wd, devices=jax.devices()[:2])
  assert int(resumed["state"].step) == 6
  for a, b in zip(_leaves(straight["state"]), _leaves(resumed["state"])):
    np.testing.assert_array_equal(a, b)
  records = train.read_metrics(wd)
  assert [r["step"] for r in records if "loss" in r] == [2, 3, 4, 6]
  # Running again after the end does nothing and keeps the state.
  again = tasks.pretrain(small_config(digits_data_dir, **cfg), wd, devices=jax.devices()[:2])
  assert again["history"] == [] and int(again["state"].step) == 6


def test_checkpoint_of_another_model_is_a_user_error(tmp_path, digits_data_dir):
  wd = str(tmp_path / "wd")
  tasks.pretrain(small_config(digits_data_dir, total_steps=2), wd, devices=jax.devices()[:1])
  before = snapshot(wd)
  other = small_config(digits_data_dir, total_steps=2, **{"model.variant": "Mu/8"},
                       image_size=32)
  # The run record refuses first, listing what differs; allowed, the shapes still cannot fit.
  with pytest.raises(UserError, match=r"trained with another config \(image_size: 16 -> 32; "
                     r"model.variant: 'Mu/4' -> 'Mu/8'\)"):
    tasks.pretrain(other, wd, devices=jax.devices()[:1])
  with pytest.raises(UserError, match="does not match this config"):
    tasks.pretrain(other, wd, devices=jax.devices()[:1], allow_config_change=True)
  assert snapshot(wd) == before


def test_cli_pretrains_on_the_embedded_default(tmp_path, digits_data_dir):
  wd = str(tmp_path / "wd")
  # A relative workdir, as in the README's quick start (Orbax itself needs absolute paths).
  r = run_cli(f"--config={REPO}/configs/mae.py", "--workdir=wd", *SMALL, "--config.total_steps=4",
           f"--config.dataset.data_dir={digits_data_dir}", "--config.mask_ratio=0.5",
           env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "step 4/4" in r.stdout and "loss" in r.stdout
  records = train.read_metrics(wd)
  assert [rec["step"] for rec in records if "loss" in rec] == [2, 4]
  assert all(np.isfinite(rec["loss"]) for rec in records if "loss" in rec)
  # Every logged record says how long its steps waited for input (seconds per step).
  assert all(rec["input_wait_s"] >= 0 for rec in records if "loss" in rec)
  with open(os.path.join(wd, "config.json")) as f:
    saved = json.load(f)
  assert saved["mask_ratio"] == 0.5 and saved["image_size"] == 16
  assert os.listdir(os.path.join(wd, "tensorboard"))
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["4"]


BAD_INPUTS = [
    (["--config.nope=1"], "unknown config key 'nope'"),
    (["--config.model.nope=1"], "unknown config key 'nope'"),
    (["--config.image_size=30"], "image_size=30 is not divisible by the patch size"),
    (["--config.mask_ratio=1.0"], "mask_ratio must be in (0, 1)"),
    (["--config.mask_ratio=0"], "mask_ratio must be in (0, 1)"),
    (["--config.batch_size=36"], "not divisible by the 8 devices"),
    (["--config.dataset.name=imagenet_typo"], "unknown dataset 'imagenet_typo'"),
    (["--config.dataset.name=folder", "--config.dataset.folder=/nonexistent/images"],
     "does not exist"),
    (["--config=configs/mae.py:vit_x99"], "vit_x99"),
    (["--config=configs/nomethod.py"], "nomethod.py"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[a[0] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_the_workdir_alone(tmp_path, digits_data_dir, args,
                                                            message):
  wd = tmp_path / "existing"
  wd.mkdir()
  (wd / "notes.txt").write_text("keep me")
  before = snapshot(str(wd))
  config = [a for a in args if a.startswith("--config=")] or ["--config=configs/mae.py"]
  rest = [a for a in args if not a.startswith("--config=")]
  r = run_cli(*config, f"--workdir={wd}", *SMALL, "--config.total_steps=2",
           f"--config.dataset.data_dir={digits_data_dir}", *rest,
           env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert message in lines[0]
  assert "Traceback" not in r.stderr
  assert snapshot(str(wd)) == before


def test_unwritable_workdir(tmp_path, digits_data_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  r = run_cli("--config=configs/mae.py", f"--workdir={blocker}/run", *SMALL,
           f"--config.dataset.data_dir={digits_data_dir}")
  assert r.returncode == 2
  assert r.stderr.strip().startswith("error: workdir") and "not writable" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  assert blocker.read_text() == "x"


def test_prefetch_close_stops_the_thread_and_closes_the_iterator():
  closed = []

  def endless():
    try:
      i = 0
      while True:
        yield i
        i += 1
    finally:
      closed.append(True)

  p = train.Prefetch(endless(), 2)
  assert [next(p) for _ in range(3)] == [0, 1, 2]
  p.close()
  assert not p._thread.is_alive() and closed == [True]


def test_a_slow_input_is_logged_and_warned_about_once(tmp_path, digits_data_dir, monkeypatch,
                                                     capsys):
  """Input that takes 0.3 s a batch, for a step of a few milliseconds: input_wait_s shows about
  0.3 s per step from the second interval on, and one line says the run is input-bound."""
  import time
  real = train.data.train_batches

  def slow(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i >= 3:  # the first batches come before and during compilation
        time.sleep(0.3)
      yield batch

  monkeypatch.setattr(train.data, "train_batches", slow)
  config = small_config(digits_data_dir, total_steps=8, log_every_steps=2,
                        checkpoint_every_steps=8)
  config.dataset.prefetch = 1
  out = tasks.pretrain(config, str(tmp_path / "wd"), devices=jax.devices()[:1])
  waits = [h["input_wait_s"] for h in out["history"] if "loss" in h]
  assert len(waits) == 4 and all(w >= 0 for w in waits)
  assert all(0.2 < w < 0.6 for w in waits[2:]), waits
  printed = capsys.readouterr().out
  assert printed.count("warning: input-bound") == 1, printed


def test_a_lone_stall_is_logged_but_not_called_input_bound(tmp_path, digits_data_dir,
                                                           monkeypatch, capsys):
  """One batch of an interval late by 0.5 s (a new epoch filling its shuffle buffer, say):
  input_wait_s shows it, the warning does not come."""
  import time
  real = train.data.train_batches

  def one_stall(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 6:
        time.sleep(0.5)
      yield batch

  monkeypatch.setattr(train.data, "train_batches", one_stall)
  config = small_config(digits_data_dir, total_steps=12, log_every_steps=4,
                        checkpoint_every_steps=12)
  out = tasks.pretrain(config, str(tmp_path / "wd"), devices=jax.devices()[:1])
  waits = [h["input_wait_s"] for h in out["history"] if "loss" in h]
  assert len(waits) == 3 and max(waits[1:]) > 0.05, waits  # 0.5 s over 4 steps, after 4
  assert "input-bound" not in capsys.readouterr().out
