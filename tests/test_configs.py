"""Every shipped pretraining recipe builds: its config passes validation, its method constructs, and
its training loss traces at the recipe's own image size (abstractly: no weights are allocated).

The small variants train in other tests; this keeps the ImageNet-scale ones (ViT-B to ViT-H,
ConvMAE-Base) from breaking unnoticed, since nothing else in the suite runs them.
"""

import importlib

import jax
import jax.numpy as jnp
import pytest

from mae_jax import configlib
from mae_jax.methods import get_method
from mae_jax.models.vit import cast_params, stack_blocks


def _variants(name):
  module = importlib.import_module(f"configs.{name}")
  names = list(module.VARIANTS)
  return [(name, v) for v in (["tiny"] if "tiny" not in names else []) + names]


CASES = [case for name in ("mae", "simmim", "splitmask", "droppos", "convmae")
         for case in _variants(name)]

# MAE's official models (models_mae.py) at these sizes: timm's ViT encoder (patch and token
# embedding, blocks, final norm; no head), a Linear into the decoder width, a mask token, timm
# Blocks of the decoder width, a LayerNorm and a Linear to pixels. The decoder is the same for all
# three: 512 wide, 8 blocks, 16 heads.
MAE_TIMM_ENCODERS = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224",
                     "vit_h14": "vit_huge_patch14_224"}
OFFICIAL_DECODER = (512, 8, 16)


def _abstract_params(config, batch: int):
  """The method of `config` and its parameter shapes at the config's image size (nothing is
  allocated), with the abstract images they were made from."""
  method = get_method(config)
  size = config.image_size
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return method, jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images), images


def _official_mae_count(variant) -> int:
  """Trainable parameters of the official MAE model, counted on timm modules (meta tensors, so
  nothing is allocated). The sin-cos position embeddings are frozen there and constants here."""
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  from timm.models.vision_transformer import Block

  width, depth, heads = OFFICIAL_DECODER
  with torch.device("meta"):
    encoder = timm.create_model(MAE_TIMM_ENCODERS[variant], num_classes=0)
    d, p = encoder.embed_dim, encoder.patch_embed.patch_size[0]
    decoder = torch.nn.ModuleList(
        [torch.nn.Linear(d, width)] + [Block(width, heads, 4.0, qkv_bias=True) for _ in range(depth)]
        + [torch.nn.LayerNorm(width), torch.nn.Linear(width, p * p * 3)])
  count = sum(t.numel() for n, t in encoder.named_parameters() if n != "pos_embed")
  return count + sum(t.numel() for t in decoder.parameters()) + width  # + the mask token.


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}:{v}" for n, v in CASES])
def test_every_pretraining_recipe_builds_and_its_loss_traces(name, variant):
  config = importlib.import_module(f"configs.{name}").get_config(variant)
  configlib.validate_common(config, 1)
  method, params, images = _abstract_params(config, 2)
  loss, _ = jax.eval_shape(method.train_loss, params, {}, {"image": images},
                           jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))
  assert loss.shape == () and loss.dtype == jnp.float32
  # The same recipe with the memory and speed options on (scan over stacked blocks, remat,
  # bfloat16): the loss still traces, and stays a float32 scalar.
  with config.unlocked():
    config.compute.update(scan=True, remat=True, dtype="bfloat16")
  method = get_method(config)
  stacked = jax.eval_shape(stack_blocks, params)
  loss, _ = jax.eval_shape(lambda p, *args: method.train_loss(cast_params(p, "bfloat16"), *args),
                           stacked, {}, {"image": images}, jax.random.PRNGKey(1),
                           jnp.zeros((), jnp.int32))
  assert loss.shape == () and loss.dtype == jnp.float32


@pytest.mark.parametrize("variant", sorted(MAE_TIMM_ENCODERS))
def test_mae_recipes_have_the_official_parameter_count(variant):
  _, params, _ = _abstract_params(importlib.import_module("configs.mae").get_config(variant), 1)
  assert sum(x.size for x in jax.tree.leaves(params)) == _official_mae_count(variant)
