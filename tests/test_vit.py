"""ViT encoder: parameter counts, sin-cos position embedding, init, masking invariance, the
stages `__call__` composes, position-embedding resampling."""

try:  # before anything that imports TensorFlow (see conftest.py)
  import torch
except ImportError:
  torch = None

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mae_jax.models import vit


def count_params(module, image_size):
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, 3)))
  return sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("variant,image_size,expected", [
    # timm's vit_*_patch16_224 with num_classes=0, minus pos_embed (ours is a constant):
    # 5,524,416 + 197*192 etc.
    ("Ti/16", 224, 5_524_416 - 197 * 192),
    ("S/16", 224, 21_665_664 - 197 * 384),
    ("B/16", 224, 85_798_656 - 197 * 768),
    ("L/16", 224, 303_301_632 - 197 * 1024),
    ("H/14", 224, 630_764_800 - 257 * 1280),
])
def test_param_counts_match_timm(variant, image_size, expected):
  assert count_params(vit.ViT.from_variant(variant), image_size) == expected


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown ViT variant"):
    vit.parse_variant("Q/16")


def test_sincos_matches_official_formula():
  """Reference values written out from the official get_2d_sincos_pos_embed definition."""
  dim, gh, gw = 16, 3, 4
  emb = vit.sincos_2d(dim, gh, gw, cls_token=True)
  assert emb.shape == (1 + gh * gw, dim)
  np.testing.assert_array_equal(emb[0], 0)
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
  for i in range(gh):
    for j in range(gw):
      row = emb[1 + i * gw + j]
      np.testing.assert_allclose(row[: dim // 4], np.sin(j * omega), rtol=1e-6)  # column first
      np.testing.assert_allclose(row[dim // 4: dim // 2], np.cos(j * omega), rtol=1e-6)
      np.testing.assert_allclose(row[dim // 2: 3 * dim // 4], np.sin(i * omega), rtol=1e-6)
      np.testing.assert_allclose(row[3 * dim // 4:], np.cos(i * omega), rtol=1e-6)


def test_init_statistics():
  """xavier-uniform fans of the official init, incl. the flattened patch-embedding kernel."""
  model = vit.ViT(width=256, depth=1, num_heads=4, patch_size=16)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  k = params["patch_embed"]["proj"]["kernel"]  # [16, 16, 3, 256]
  bound = np.sqrt(6 / (16 * 16 * 3 + 256))
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
  qkv = params["blocks_0"]["attn"]["qkv"]["kernel"]  # [256, 768]
  bound = np.sqrt(6 / (256 + 768))
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.95 * bound
  np.testing.assert_allclose(np.std(params["cls_token"]), 0.02, rtol=0.3)
  assert np.all(params["blocks_0"]["attn"]["qkv"]["bias"] == 0)
  assert np.all(params["norm"]["scale"] == 1)


def test_gelu_is_exact_and_layernorm_eps():
  """The block uses erf GELU (torch default) and LayerNorm eps 1e-6."""
  block = vit.Block(num_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 8))
  params = block.init(jax.random.PRNGKey(0), x)["params"]

  def ref(x):
    def ln(x, p):
      mu = x.mean(-1, keepdims=True)
      var = ((x - mu) ** 2).mean(-1, keepdims=True)
      return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]
    y = ln(x, params["norm1"])
    a = params["attn"]
    qkv = (y @ a["qkv"]["kernel"] + a["qkv"]["bias"]).reshape(1, 3, 3, 2, 4)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    s = np.exp(s - s.max(-1, keepdims=True))
    s = s / s.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", s, v).reshape(1, 3, 8)
    x = x + o @ a["proj"]["kernel"] + a["proj"]["bias"]
    y = ln(x, params["norm2"])
    m = params["mlp"]
    h = y @ m["fc1"]["kernel"] + m["fc1"]["bias"]
    from scipy.special import erf
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    return x + h @ m["fc2"]["kernel"] + m["fc2"]["bias"]

  got = block.apply({"params": params}, x)
  np.testing.assert_allclose(got, ref(np.asarray(x, np.float64)), rtol=1e-5, atol=1e-5)


def test_encoder_ignores_masked_pixels():
  """With ids_keep, changing pixels of the dropped patches changes nothing."""
  model = vit.ViT(width=32, depth=2, num_heads=2, patch_size=4)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(1), images)["params"]
  ids_keep = jnp.array([[0, 5, 10, 15], [3, 2, 1, 12]], jnp.int32)
  out = model.apply({"params": params}, images, ids_keep)
  # Patch (row 0, col 1) = index 1 is masked for example 0 and kept for example 1.
  changed = images.at[:, 0:4, 4:8, :].add(100.0)
  out2 = model.apply({"params": params}, changed, ids_keep)
  np.testing.assert_array_equal(out[0], out2[0])
  assert not np.allclose(out[1], out2[1])


def _composed(model: vit.ViT, images, ids_keep=None, train: bool = False):
  """`ViT.__call__` written out with the public stages (what SimMIM and DropPos do)."""
  x = model.embed_patches(images)
  pos = model.position_embedding(model.grid(images.shape[1:3]))
  patch_pos = jnp.broadcast_to(pos[:, 1:], x.shape).astype(x.dtype)
  if ids_keep is not None:
    x, patch_pos = vit.gather_tokens(x, ids_keep), vit.gather_tokens(patch_pos, ids_keep)
  return model.encode(model.prepend_cls(x + patch_pos, pos), train)


@pytest.mark.parametrize("kwargs", [
    {},
    {"global_pool": "token", "num_classes": 5, "drop_path_rate": 0.2},
    {"global_pool": "avg", "num_classes": 5, "learnable_pos_embed": True},
    {"compute": vit.Compute(dtype="bfloat16", remat=True)},
])
def test_call_is_the_composition_of_the_stages(kwargs):
  model = vit.ViT(width=32, depth=2, num_heads=2, patch_size=4, **kwargs)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 12, 3))
  ids_keep = jnp.array([[0, 5, 10], [3, 2, 11]], jnp.int32)
  # Initialized through the stages: the same names and values (cls_token's init RNG follows the
  # order of the parameters, pos_embed first).
  params = model.init(jax.random.PRNGKey(1), images)["params"]
  staged = model.init(jax.random.PRNGKey(1), images, method=_composed)["params"]
  assert ("pos_embed" in params) == bool(kwargs.get("learnable_pos_embed"))
  flat, flat_staged = (traverse_util.flatten_dict(t, sep="/") for t in (params, staged))
  assert flat.keys() == flat_staged.keys()
  for k in flat:
    np.testing.assert_array_equal(flat[k], flat_staged[k], err_msg=k)
  variables = {"params": vit.cast_params(params, model.compute.dtype)}
  rngs = {"dropout": jax.random.PRNGKey(2)}
  for ids in ([None] if model.num_classes else [None, ids_keep]):
    for train in (False, True):
      want = model.apply(variables, images, ids, train=train, rngs=rngs)
      got = model.apply(variables, images, ids, train=train, rngs=rngs, method=_composed)
      assert want.dtype == model.compute.jnp_dtype
      np.testing.assert_array_equal(got, want)


def test_stages_shapes_and_scan_over_stacked_blocks():
  model = vit.ViT(width=32, depth=3, num_heads=2, patch_size=4, drop_path_rate=0.1)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 12, 3))
  params = model.init(jax.random.PRNGKey(1), images)["params"]
  bound = model.bind({"params": params})
  assert bound.embed_patches(images).shape == (2, 6, 32)
  pos = bound.position_embedding((2, 3))
  np.testing.assert_array_equal(pos, vit.sincos_2d(32, 2, 3, cls_token=True)[None])
  assert bound.prepend_cls(jnp.zeros((2, 4, 32)), pos).shape == (2, 5, 32)
  # compute.scan runs the blocks over the stacked layout of a scan run's training state.
  scanned = model.clone(compute=vit.Compute(scan=True))
  want = model.apply({"params": params}, images)
  got = scanned.apply({"params": vit.stack_blocks(params)}, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("old,new,extra", [((4, 4), (6, 8), 1), ((5, 3), (2, 4), 0),
                                           ((3, 3), (3, 3), 2)])
def test_resample_pos_embed_is_torch_bicubic(old, new, extra):
  """As the official MAE interpolate_pos_embed: F.interpolate(bicubic, align_corners=False) on the
  grid tokens, the extra (cls) tokens kept."""
  pos = np.random.default_rng(0).standard_normal((1, extra + old[0] * old[1], 8)).astype(np.float32)
  got = vit.resample_pos_embed(pos, old, new, extra)
  assert got.shape == (1, extra + new[0] * new[1], 8) and got.dtype == np.float32
  np.testing.assert_array_equal(got[:, :extra], pos[:, :extra])
  grid = torch.tensor(pos[:, extra:]).reshape(1, *old, 8).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=new, mode="bicubic", align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
  np.testing.assert_allclose(got[:, extra:], ref, atol=1e-5)


def test_resample_pos_embed_rejects_a_grid_that_does_not_fit():
  with pytest.raises(ValueError, match="17 grid tokens, not 4x4"):
    vit.resample_pos_embed(np.zeros((1, 18, 8)), (4, 4), (6, 6), 1)


def test_fused_attention_equals_the_written_out_product():
  """The training path (jax.nn.dot_product_attention) and the path that keeps the probabilities
  (analysis, TinyMIM) compute the same attention, forward and backward, to float32 rounding; and
  the written-out probabilities are a softmax (rows sum to 1)."""
  module = vit.Attention(num_heads=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 17, 64))
  params = module.init(jax.random.PRNGKey(0), x)

  def fused(p, x):
    return module.apply(p, x)

  def written_out(p, x):
    out, inter = module.apply(p, x, mutable=["intermediates"])
    return out, inter["intermediates"]["attention"][0]

  out_written, probs = written_out(params, x)
  np.testing.assert_allclose(fused(params, x), out_written, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  assert probs.shape == (3, 4, 17, 17)
  g_fused = jax.grad(lambda p: jnp.sum(fused(p, x) ** 2))(params)
  g_written = jax.grad(lambda p: jnp.sum(written_out(p, x)[0] ** 2))(params)
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_written)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_attention_implementation_choice():
  # 'auto': cuDNN on a GPU with 16-bit activations, blocked on a CPU, else XLA's; explicit
  # choices are kept.
  backend = jax.default_backend()
  other = {"cpu": "blocked"}.get(backend, "xla")
  assert vit.attention_implementation("auto", jnp.float32) == other
  assert vit.attention_implementation("auto", jnp.bfloat16) == (
      "cudnn" if backend == "gpu" else other)
  assert vit.attention_implementation("xla", jnp.bfloat16) == "xla"
  assert vit.attention_implementation("cudnn", jnp.float32) == "cudnn"


@pytest.mark.parametrize("batch,tokens,heads", [(6, 17, 4), (5, 9, 2), (1, 65, 4)])
def test_blocked_attention_equals_xla_forward_and_backward(batch, tokens, heads, monkeypatch):
  """Blocks of examples (here of 2 or 3, and an odd batch of single examples) with the
  probabilities recomputed in the backward pass: XLA's attention to float32 rounding."""
  monkeypatch.setattr(vit, "BLOCK_BYTES", 2 * heads * tokens * tokens * 4)
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (batch, tokens, heads, 8))
             for i in range(3))
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(vit.blocked_attention(q, k, v), xla(q, k, v), rtol=1e-5,
                             atol=1e-6)
  loss = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(loss(vit.blocked_attention), loss(xla)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cudnn_request_off_gpu_falls_back_to_xla():
  # Asking for cuDNN where it cannot run (a CPU, float32) gives the XLA result, not an error.
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU the cuDNN path runs for real")
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 32))
  a = vit.Attention(num_heads=2, implementation="cudnn")
  b = vit.Attention(num_heads=2, implementation="xla")
  params = a.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(a.apply(params, x), b.apply(params, x))


def test_blocked_attention_on_a_sharded_batch_needs_no_collectives(monkeypatch):
  """Strided blocks: with the batch sharded over 8 devices and the block count dividing each
  device's share, every device works on every block and no example crosses devices."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py emulates them on CPU)")
  heads, tokens = 2, 9
  monkeypatch.setattr(vit, "BLOCK_BYTES", 8 * heads * tokens * tokens * 4)  # 2 blocks of 8
  sharding = NamedSharding(Mesh(np.array(devices[:8]), ("data",)), P("data"))
  q, k, v = (jax.device_put(jax.random.normal(jax.random.PRNGKey(i), (16, tokens, heads, 8)),
                            sharding) for i in range(3))
  f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(vit.blocked_attention(q, k, v) ** 2),
                       argnums=(0, 1, 2)), out_shardings=sharding)
  text = f.lower(q, k, v).compile().as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in text, collective
  want = jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v) ** 2),
                  argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(f(q, k, v), want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
