"""SplitMask: the A/B split, InfoNCE, each branch sees its half only, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import splitmask as splitmask_config
from mae_jax import masking, optim, train
from mae_jax.errors import UserError
from mae_jax.methods import get_method, mae, splitmask
from mae_jax.models.vit import ViT


def tiny_config(**overrides):
  """16 px, Mu/4: 4x4 = 16 patches, 8 per half; decoder 64 wide x 1 block."""
  c = splitmask_config.get_config("tiny")
  c.unlock()
  c.update(image_size=16)
  c.model.decoder_depth = 1
  c.update_from_flattened_dict(overrides)
  return c


def test_info_nce_hand_computed():
  x_a = jnp.array([[2.0, 0.0], [0.0, 3.0]])  # norms differ: the similarity is the cosine
  x_b = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  loss, acc = splitmask.info_nce(x_a, x_b, temperature=1.0)
  # Row i: logits [1, 0] (positive first) -> -log(e / (e + 1)) = log(1 + 1/e), both rows.
  assert float(loss) == pytest.approx(np.log(1 + np.exp(-1)), rel=1e-6)
  assert float(acc) == 1.0
  # Swapped partners: the positive has cosine 0, the negative 1; tau 0.5 -> log(1 + e^2).
  loss, acc = splitmask.info_nce(x_a, x_b[::-1], temperature=0.5)
  assert float(loss) == pytest.approx(np.log(1 + np.exp(2)), rel=1e-6)
  assert float(acc) == 0.0


@pytest.mark.parametrize("kind,grid", [("random", (4, 4)), ("random", (3, 3)), ("block", (8, 8))])
def test_split_partitions_the_patches(kind, grid):
  b, length = 4, grid[0] * grid[1]
  s = splitmask.split_patches(kind, jax.random.PRNGKey(0), b, grid)
  n_a = length // 2
  assert s.ids_a.shape == (b, n_a) and s.ids_b.shape == (b, length - n_a)
  for i in range(b):
    a, bb = set(np.asarray(s.ids_a[i]).tolist()), set(np.asarray(s.ids_b[i]).tolist())
    assert len(a) == n_a and a.isdisjoint(bb) and a | bb == set(range(length))
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(s.in_a[i])), sorted(a))
  # Each branch's ids_restore puts its own half first, so the decoder's unshuffle of
  # [own tokens, fill] lands every own token on its patch.
  patch_ids = jnp.arange(length)[None, :, None].repeat(b, 0)
  for ids, restore in ((s.ids_a, s.restore_a), (s.ids_b, s.restore_b)):
    own = jnp.take_along_axis(patch_ids, ids[:, :, None], axis=1)
    fill = -jnp.ones((b, length - ids.shape[1], 1), jnp.int32)
    placed = np.asarray(masking.unshuffle(jnp.concatenate([own, fill], axis=1), restore))[..., 0]
    in_half = np.zeros((b, length), bool)
    np.put_along_axis(in_half, np.asarray(ids), True, axis=1)
    np.testing.assert_array_equal(placed[in_half], np.nonzero(in_half)[1])
    assert np.all(placed[~in_half] == -1)
  assert len({tuple(r) for r in np.asarray(s.in_a)}) == b


def test_params_tree_and_encoder_is_a_plain_vit():
  c = tiny_config()
  images = jnp.zeros((1, 16, 16, 3))
  params = jax.eval_shape(get_method(c).init_params, jax.random.PRNGKey(0), images)
  assert set(params) == {"encoder", "decoder", "head"}
  vit = jax.eval_shape(ViT.from_variant(c.model.variant).init, jax.random.PRNGKey(0),
                       images)["params"]
  assert jax.tree.structure(params["encoder"]) == jax.tree.structure(vit)
  assert jax.tree.map(lambda a: a.shape, params["encoder"]) == jax.tree.map(lambda a: a.shape, vit)


def _updater(devices):
  """(method, init, jitted train step, batch sharding) of mae_jax.train on a mesh over `devices`:
  tiny_config() with a 32-wide decoder, global batch 16, AdamW, warmup + cosine over 30 steps."""
  c = tiny_config(batch_size=16, warmup_epochs=0.0)
  c.model.decoder_width = 32
  mesh = train.make_mesh(devices)
  plan = train.Plan(steps_per_epoch=1, total_steps=30, warmup_steps=2,
                    peak_lr=optim.scaled_lr(c.optimizer.base_lr, c.batch_size))
  method = get_method(c, plan.total_steps)
  update = train.build_update(c, mesh, plan, method)
  init = jax.jit(update.init_state, out_shardings=NamedSharding(mesh, P()))
  return method, lambda: init(jax.random.PRNGKey(0)), update.step, NamedSharding(mesh, P("data"))


@pytest.fixture(scope="module")
def one_device():
  return _updater(jax.devices()[:1])


@pytest.fixture(scope="module")
def fixed_batch():
  return {"image": jax.random.normal(jax.random.PRNGKey(0), (16, 16, 16, 3))}


def _run(updater, batch, steps):
  method, init, step_fn, sharding = updater
  state, batch = init(), jax.device_put(batch, sharding)
  history = []
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
    history.append(jax.device_get(metrics))
  return method, state, history


def test_each_branch_sees_only_its_half(one_device):
  method, init, _, _ = one_device
  params = init().params
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  split = method.split(jax.random.PRNGKey(2), 2)
  in_b = mae.unpatchify(jnp.repeat((1 - split.in_a)[:, :, None], 48, axis=2), 4, (4, 4))
  noisy_b = images + in_b * jax.random.normal(jax.random.PRNGKey(3), images.shape)
  both = jax.tree.map(lambda x: jnp.tile(x, (2,) + (1,) * (x.ndim - 1)), split)
  (pred_a, desc_a), (pred_b, _) = jax.jit(method.model.apply)(
      {"params": params}, jnp.concatenate([images, noisy_b]), both)
  np.testing.assert_allclose(pred_a[2:], pred_a[:2], atol=1e-5)  # A's branch never sees B
  np.testing.assert_allclose(desc_a[2:], desc_a[:2], atol=1e-5)
  assert not np.allclose(pred_b[2:], pred_b[:2], atol=1e-3)


def test_loss_goes_down_on_a_fixed_batch(one_device, fixed_batch):
  method, state, history = _run(one_device, fixed_batch, 25)
  first, last = history[0], history[-1]
  assert first["loss"] == pytest.approx(first["recon"] + first["nce"], rel=1e-5)
  assert last["loss"] < 0.7 * first["loss"], [float(h["loss"]) for h in history]
  assert last["nce"] < first["nce"] and last["recon"] < first["recon"]
  assert method.features(state.params, fixed_batch["image"]).shape == (16, 128)


@pytest.mark.parametrize("overrides,match", [
    ({"nce_temperature": 0.0}, "nce_temperature must be positive"),
    ({"nce_weight": -1.0}, "nce_weight must be >= 0"),
    ({"image_size": 18}, "not divisible by the patch size"),
    ({"model.decoder_heads": 3}, "decoder_width=64 must be divisible"),
])
def test_bad_config(overrides, match):
  with pytest.raises(UserError, match=match):
    get_method(tiny_config(**overrides))
