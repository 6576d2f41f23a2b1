"""config.compute: remat, scan, bfloat16 and FSDP change how a step runs, not what it computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import convmae as convmae_config
from mae_jax import tasks, train
from mae_jax.errors import UserError
from mae_jax.models.convvit import ConvMAEEncoder
from mae_jax import workdir as workdirs
from mae_jax.models.vit import Compute, ViT, cast_params, stack_blocks, unstack_blocks
from conftest import flat, small_config


def _run(tmp_path, data_dir, name, devices=1, allow_config_change=False, **overrides):
  # Two decoder blocks so that the decoder's blocks are scanned too.
  config = small_config(data_dir, **{"model.decoder_depth": 2, "total_steps": 3,
                                     "log_every_steps": 1, **overrides})
  return tasks.pretrain(config, str(tmp_path / name), devices=jax.devices()[:devices],
                        allow_config_change=allow_config_change)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_data_dir):
  return _run(tmp_path_factory.mktemp("ref"), digits_data_dir, "ref")


def test_remat_and_scan_keep_the_loss_trajectory_and_the_parameters(reference, tmp_path,
                                                                    digits_data_dir):
  out = _run(tmp_path, digits_data_dir, "run", **{"compute.remat": True, "compute.scan": True})
  want = [h["loss"] for h in reference["history"]]
  np.testing.assert_allclose([h["loss"] for h in out["history"]], want, rtol=1e-5)
  # The scan run trains its blocks stacked ([depth, ...] under 'blocks') ...
  stacked = out["state"].params
  assert "blocks" in stacked["encoder"] and "blocks_0" not in stacked["encoder"]
  assert stacked["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (4, 128, 512)
  # ... and its checkpoint reads back in the per-block layout everything else uses.
  loaded, _ = workdirs.load_params(str(tmp_path / "run"))
  ref, got = flat(reference["state"].params), flat(loaded)
  assert ref.keys() == got.keys()  # blocks_0, blocks_1, ... as an unrolled run's.
  assert flat(unstack_blocks(stacked)).keys() == ref.keys()
  for k in ref:
    # Adam turns float-rounding noise in near-zero gradients into steps of up to ~lr (<= 2.5e-4
    # here), so single entries may differ by a few lr; everything else agrees to rounding.
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-3, err_msg=k)
    assert np.mean(np.abs(got[k] - ref[k])) < 1e-5, k


@pytest.mark.parametrize("compute", [Compute(remat=True), Compute(scan=True),
                                     Compute(scan=True, remat=True)])
def test_remat_and_scan_give_the_unrolled_loss_and_gradients(compute):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  vit = ViT.from_variant("Mu/4")
  params = jax.jit(vit.init)(jax.random.PRNGKey(1), x)["params"]

  def loss(model):
    return jax.jit(jax.value_and_grad(
        lambda p: jnp.mean(model.apply({"params": p}, x)[:, 0] ** 3)))(params)

  (v0, g0), (v1, g1) = loss(vit), loss(vit.clone(compute=compute))
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  assert jax.tree.structure(g1) == jax.tree.structure(g0)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    # atol: float32 rounding of the largest gradients (~0.5), which remat sums in another order.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_stack_and_unstack_blocks_are_inverse_and_leave_other_blocks_alone():
  leaf = lambda i: {"kernel": jnp.full((2, 3), float(i))}  # noqa: E731
  tree = {"encoder": {"blocks_0": leaf(0), "blocks_1": leaf(1), "norm": leaf(9)},
          "convvit": {"blocks1_0": leaf(0), "blocks1_1": leaf(1), "blocks3_0": leaf(2),
                      "blocks3_1": leaf(3)},
          "decoder": {"blocks_0": leaf(5)}}  # one block: never scanned.
  s = stack_blocks(tree)
  assert set(s["encoder"]) == {"blocks", "norm"}
  assert s["encoder"]["blocks"]["kernel"].shape == (2, 2, 3)
  assert set(s["convvit"]) == {"blocks1_0", "blocks1_1", "blocks3"}  # conv stages unrolled.
  assert set(s["decoder"]) == {"blocks_0"}
  back = unstack_blocks(s)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)


def test_scan_with_drop_path_draws_per_block_and_matches_unrolled_gradients_without_it():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  vit = ViT.from_variant("Mu/4", drop_path_rate=0.3)
  params = jax.jit(vit.init)(jax.random.PRNGKey(1), x)["params"]
  scanned = vit.clone(compute=Compute(scan=True, remat=True))
  rngs = {"dropout": jax.random.PRNGKey(2)}
  a = scanned.apply({"params": params}, x, train=True, rngs=rngs)
  b = scanned.apply({"params": params}, x, train=False)
  assert not np.allclose(a, b)  # drop path acts in training.
  np.testing.assert_allclose(b, vit.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


def test_convmae_stage3_scan_matches_unrolled():
  enc = ConvMAEEncoder.from_variant("mu")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = jax.jit(lambda: enc.init(jax.random.PRNGKey(1), x))()["params"]
  want = enc.apply({"params": params}, x)
  got = enc.clone(compute=Compute(scan=True)).apply({"params": params}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_keeps_float32_state_and_a_close_loss(reference, tmp_path, digits_data_dir):
  out = _run(tmp_path, digits_data_dir, "bf16", **{"compute.dtype": "bfloat16"})
  state = out["state"]
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  first = reference["history"][0]["loss"]
  assert abs(out["history"][0]["loss"] - first) < 0.02 * first  # bf16 rounding only.
  tree = {"w": jnp.ones((2,), jnp.float32), "i": jnp.ones((2,), jnp.int32)}
  cast = cast_params(tree, "bfloat16")
  assert cast["w"].dtype == jnp.bfloat16 and cast["i"].dtype == jnp.int32


def test_fsdp_shards_state_and_matches_replicated(tmp_path, digits_data_dir, monkeypatch):
  # Mu/4's matrices are under the production threshold; shard everything of >= 1024 elements.
  monkeypatch.setattr(train, "FSDP_MIN_SIZE", 1024)
  rep = _run(tmp_path, digits_data_dir, "rep", devices=2, total_steps=2)
  out = _run(tmp_path, digits_data_dir, "fsdp", devices=2, total_steps=2,
             **{"compute.fsdp": True})
  np.testing.assert_allclose([h["loss"] for h in out["history"]],
                             [h["loss"] for h in rep["history"]], rtol=1e-5)
  kernel = out["state"].params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # [128, 512]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "data")
  assert kernel.addressable_shards[0].data.shape == (128, 512 // 2)
  moments = [x for path, x in jax.tree_util.tree_flatten_with_path(out["state"].opt_state)[0]
             if "encoder/blocks_0/mlp/fc1/kernel" in "/".join(
                 str(getattr(k, "key", getattr(k, "name", ""))) for k in path)]
  assert len(moments) == 2  # Adam's mu and nu, sharded like their parameter.
  assert all(m.sharding.spec == kernel.sharding.spec for m in moments)
  # Resuming (with a longer schedule) restores the sharded state from the Orbax checkpoint.
  again = _run(tmp_path, digits_data_dir, "fsdp", devices=2, allow_config_change=True,
               **{"compute.fsdp": True, "total_steps": 3})
  assert [h["step"] for h in again["history"]] == [3]


def test_bad_compute_dtype(digits_data_dir, tmp_path):
  with pytest.raises(UserError, match="config.compute.dtype"):
    _run(tmp_path, digits_data_dir, "bad", **{"compute.dtype": "float16"})
  assert not (tmp_path / "bad").exists()
  assert "compute" in convmae_config.get_config()
