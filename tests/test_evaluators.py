"""The evaluator factory (config.evals), moved-key errors, and the README's example evaluator."""

import os
import re
import types

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, run_cli, small_config
from mae_jax import configlib, data, evaluators, train
from mae_jax.errors import UserError
from mae_jax.evaluators import feature_spread
from mae_jax.methods import get_method


def _ctx(config, trainable, total_steps=10):
  return evaluators.Context(config=config, trainable=trainable,
                            source=data.get_source(config.dataset),
                            mesh=train.make_mesh(jax.devices()[:1]), total_steps=total_steps,
                            steps_per_epoch=46)


def test_factory_builds_what_is_on_and_resolves_every_epochs(digits_data_dir):
  config = small_config(digits_data_dir, **{"evals.knn.every_steps": 3,
                                             "evals.heldout.every_steps": 0})
  built = evaluators.build(config, _ctx(config, get_method(config)))
  assert [e.name for e in built] == ["knn"]  # heldout is off (every_steps 0).
  assert [s for s in range(1, 11) if built[0].due(s)] == [3, 6, 9, 10]
  config.unlock()
  config.evals.spread = dict(type="feature_spread", every_epochs=0.5)
  spread = evaluators.build(config, _ctx(config, get_method(config)))[-1]
  assert spread.name == "spread" and spread.every_steps == 23  # half of 46 steps per epoch.


def test_factory_rejects_unknown_types_keys_and_best_metrics(digits_data_dir):
  config = small_config(digits_data_dir)
  config.unlock()
  config.evals.bad = dict(type="nope", every_steps=1)
  with pytest.raises(UserError, match="unknown type 'nope'"):
    evaluators.check_config(config)
  config.evals.bad = dict(type="knn", every_steps=1, kk=3)
  with pytest.raises(UserError, match=r"config.evals.bad \(knn\): unknown key\(s\) kk"):
    evaluators.check_config(config)
  del config.evals["bad"]
  config.best_metric = "knn/top1"  # knn is off: nothing would ever be best.
  with pytest.raises(UserError, match="best_metric='knn/top1'"):
    evaluators.check_config(config)
  config.evals.knn.every_steps = 2
  evaluators.check_config(config)


def test_moved_keys_name_their_new_place(tmp_path):
  c = small_config("unused")
  c.unlock()
  c.monitor = dict(every_steps=5)
  with pytest.raises(UserError, match=r"config.monitor has moved to config.evals.heldout"):
    configlib.check_legacy_keys(c)
  r = run_cli(f"--config={REPO}/configs/mae.py", f"--workdir={tmp_path / 'wd'}",
              "--config.knn.every_steps=10")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: config.knn.every_steps has moved to config.evals.knn.every_steps (with k, "
      "temperature, pool, batch_size)"]
  assert not os.path.exists(tmp_path / "wd")


def test_feature_spread_is_positive_for_an_encoder_and_zero_for_a_collapsed_one(digits_data_dir):
  config = small_config(digits_data_dir)
  method = get_method(config)
  params = method.init_params(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  cfg = types.SimpleNamespace(every_steps=5, batches=1)
  state = types.SimpleNamespace(params=params)
  spread = feature_spread.Evaluator(cfg, _ctx(config, method)).run(state)["std"]
  assert 0.001 < spread < 1.0
  collapsed = types.SimpleNamespace(features=lambda p, x: jnp.ones((x.shape[0], 8)))
  assert feature_spread.Evaluator(cfg, _ctx(config, collapsed)).run(state)["std"] < 1e-6


def test_readme_shows_the_example_evaluator_as_shipped():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  with open(feature_spread.__file__) as f:
    source = f.read()
  blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
  assert source in blocks
  assert 'c.evals.spread = dict(type="feature_spread", every_steps=500, batches=2)\n' in blocks
