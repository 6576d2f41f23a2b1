"""Layer-wise learning-rate decay for fine-tuning (the BEiT / MAE / ConvMAE rule).

Each parameter gets a layer id; its lr is multiplied by decay ** (num_layers - id), where
num_layers = depth + 1 (the id of everything after the last block). Layer id functions take the
parameter's key path as a tuple of strings (a leading "params" collection key is ignored); bind
the depth with `functools.partial`, e.g. `functools.partial(vit_layer_id, depth=12)`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from mae_jax import optim

LayerIdFn = Callable[[tuple[str, ...]], int]


def _top_name(path: tuple[str, ...]) -> str:
  path = tuple(path)
  if len(path) > 1 and path[0] == "params":
    path = path[1:]
  return path[0] if path else ""


def vit_layer_id(path: tuple[str, ...], depth: int) -> int:
  """Layer id of a ViT parameter (official MAE `util/lr_decay.get_layer_id_for_vit`).

  cls_token, pos_embed, patch_embed/* -> 0; blocks_{i}/* -> i + 1; anything else (norm,
  fc_norm, head) -> depth + 1.
  """
  name = _top_name(path)
  if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
    return 0
  if name.startswith("blocks_"):
    return int(name[len("blocks_"):]) + 1
  return depth + 1


def convvit_layer_id(path: tuple[str, ...], depths: Sequence[int]) -> int:
  """Layer id of a ConvViT parameter, with `depths` = (d1, d2, d3) the blocks per stage.

  The rule of the official ConvMAE fine-tuning code (Alpha-VL/ConvMAE `util/lr_decay.py`):
  the decay counts only the stage-3 ViT blocks. pos_embed and every patch embedding
  (patch_embed1..4) -> 0; the conv blocks of stages 1 and 2 (blocks1_*, blocks2_*) -> 0 too;
  blocks3_{i} -> i + 1; anything else (norm, fc_norm, head) -> d3 + 1. Use it with
  num_layers = d3 + 1.
  """
  depth3 = depths[2]
  name = _top_name(path)
  if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
    return 0
  if name.startswith("blocks1_") or name.startswith("blocks2_"):
    return 0
  if name.startswith("blocks3_"):
    return int(name[len("blocks3_"):]) + 1
  return depth3 + 1


def _path_names(key_path) -> tuple[str, ...]:
  """('blocks_0', 'attn', 'qkv', 'kernel') from a jax key path (Flax names hold no '/')."""
  return tuple(jax.tree_util.keystr(key_path, simple=True, separator="/").split("/"))


def layer_scales(params, layer_id_fn: LayerIdFn, decay: float, num_layers: int):
  """Pytree like `params` holding the Python float decay ** (num_layers - layer_id(path))."""
  def scale(key_path, _):
    layer_id = layer_id_fn(_path_names(key_path))
    if not 0 <= layer_id <= num_layers:
      raise ValueError(f"layer id {layer_id} of {_path_names(key_path)} is outside "
                       f"[0, {num_layers}]")
    return float(decay ** (num_layers - layer_id))
  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layer(scales) -> optax.GradientTransformation:
  """Stateless transformation multiplying each update by its entry of `scales` (same tree)."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(lambda u, s: u * jnp.asarray(s, dtype=u.dtype), updates, scales)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def adamw_layer_decay(schedule: optax.Schedule, opt_cfg, params, layer_id_fn: LayerIdFn,
                      decay: float, num_layers: int,
                      mask=optim.decay_mask) -> optax.GradientTransformation:
  """`mae_jax.optim.adamw` (b1, b2, weight decay off for 1-D params, optional clipping) followed
  by the layer scale, so each parameter's effective lr is lr * scale.

  The scale comes after the whole AdamW chain, so the decoupled weight decay term is scaled too:
  the official code sets a per-group lr = lr * lr_scale, and torch's AdamW multiplies the decay
  by that group lr. `mask` says where weight decay applies.
  """
  scales = layer_scales(params, layer_id_fn, decay, num_layers)
  return optax.chain(optim.adamw(schedule, opt_cfg, mask), scale_by_layer(scales))
