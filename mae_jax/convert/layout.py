"""Our Flax parameter trees <-> PyTorch state_dicts (timm ViT, official MAE, official ConvMAE).

The names follow the official releases (facebookresearch/mae `models_mae.py`, Alpha-VL/ConvMAE
`models_convmae.py`, timm's `VisionTransformer`): our modules are already named
like theirs, so a name is the tree path joined with '.', with `blocks_3` -> `blocks.3` (a torch
ModuleList), `kernel`/`scale` -> `weight`, and the MAE decoder's own names prefixed as the
official model has them at the top level (`embed` -> `decoder_embed`, `blocks_i` ->
`decoder_blocks.i`, `norm` -> `decoder_norm`, `pred` -> `decoder_pred`; `mask_token` stays).
Arrays: a Dense kernel [in, out] is the transposed torch Linear weight [out, in]; every 4-D
kernel (patch embeddings, stage decoders, ConvMAE's depthwise [k, k, 1, C] and pointwise
[1, 1, in, out] kernels) is HWIO and torch's is OIHW. Nothing else changes, so a conversion
there and back is bitwise exact.

The fixed sin-cos position embeddings are constants of our models but buffers in the official
state_dicts: an export writes `pos_embed` [1, (1 +) N, D] and `decoder_pos_embed`, an import
checks them against the constant and drops them. A learned `pos_embed` (fine-tuned or timm
supervised models) is an ordinary parameter both ways.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np
from flax import traverse_util

from mae_jax.errors import UserError
from mae_jax.workdir import describe_mismatch
from mae_jax.models import convvit, vit

Params = Any
StateDict = dict[str, np.ndarray]

DENSE, CONV, COPY = "dense", "conv", "copy"
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# The MAE decoder's params -> the official top-level names (models_mae.py).
_DECODER = {"embed": "decoder_embed", "norm": "decoder_norm", "pred": "decoder_pred",
            "mask_token": "mask_token"}
SINCOS_ATOL = 1e-5  # an imported buffer within this of our constant is that constant.


class ConversionError(UserError):
  """Names or shapes of a state_dict that do not fit the model (one line, names listed)."""


def _module_name(part: str) -> str:
  """'blocks_3' -> 'blocks.3', 'blocks1_0' -> 'blocks1.0' (Flax list names -> ModuleList)."""
  m = re.fullmatch(r"(.+)_(\d+)", part)
  return f"{m.group(1)}.{m.group(2)}" if m else part


def torch_name(path: tuple[str, ...]) -> str:
  """('encoder', 'blocks_0', 'attn', 'qkv', 'kernel') -> 'blocks.0.attn.qkv.weight'.

  A path starting with 'encoder' or 'decoder' is from a pretraining tree (MAE / ConvMAE), any
  other from an encoder or classifier tree (ViT, ConvViT), whose names need no prefix.
  """
  parts = list(path)
  if parts[0] == "encoder":
    parts = parts[1:]
  elif parts[0] == "decoder":
    first = parts[1]
    m = re.fullmatch(r"blocks_(\d+)", first)
    if m:
      head = f"decoder_blocks.{m.group(1)}"
    elif first in _DECODER:
      head = _DECODER[first]
    else:
      raise ValueError(f"no official name for decoder parameter {'/'.join(path)}")
    parts = [head] + parts[2:]
  if len(parts) > 1 and parts[-1] in _LEAF:
    parts[-1] = _LEAF[parts[-1]]
  return ".".join(_module_name(p) for p in parts)


def kind_of(path: tuple[str, ...], ndim: int) -> str:
  if path[-1] == "kernel":
    if ndim == 2:
      return DENSE
    if ndim == 4:
      return CONV
    raise ValueError(f"unexpected {ndim}-D kernel {'/'.join(path)}")
  return COPY


def to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  """Our array -> the torch layout: Dense [in, out] -> [out, in]; HWIO -> OIHW."""
  if kind == DENSE:
    x = x.T
  elif kind == CONV:
    x = x.transpose(3, 2, 0, 1)
  return np.ascontiguousarray(x)


def from_torch(x: np.ndarray, kind: str) -> np.ndarray:
  """Inverse of `to_torch`."""
  if kind == DENSE:
    x = x.T
  elif kind == CONV:
    x = x.transpose(2, 3, 1, 0)
  return np.ascontiguousarray(x)


def torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  shape = tuple(shape)
  if kind == DENSE:
    return shape[::-1]
  if kind == CONV:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def spec(params: Params) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
  """torch name -> (our path, kind, our shape) for every array of `params` (arrays or shapes)."""
  out = {}
  for path, x in traverse_util.flatten_dict(params).items():
    name = torch_name(path)
    if name in out:
      raise ValueError(f"{'/'.join(path)} and {'/'.join(out[name][0])} both map to {name}")
    out[name] = (path, kind_of(path, len(x.shape)), tuple(x.shape))
  return out


# ----------------------------------------------------------------------------- constants


def _encoder(params: Params) -> Params:
  return params["encoder"] if "encoder" in params else params


def encoder_width(encoder: Params) -> int:
  """D of the tokens a position embedding is added to: ViT's width, ConvMAE's stage 3."""
  if "cls_token" in encoder:
    return encoder["cls_token"].shape[-1]
  if "patch_embed4" in encoder:
    return encoder["patch_embed4"]["kernel"].shape[-1]
  if "patch_embed" in encoder:
    return encoder["patch_embed"]["proj"]["kernel"].shape[-1]
  raise ValueError(f"not a ViT or ConvMAE encoder tree: top-level names {sorted(encoder)}")


def constants(params: Params, grid: tuple[int, int]) -> StateDict:
  """The sin-cos buffers of the official state_dict that our tree computes instead of storing.

  `pos_embed` [1, (1 +) h*w, D] unless the encoder has a learned one, and with a decoder
  `decoder_pos_embed` [1, (1 +) h*w, Dd]; a cls row (zeros) where the encoder has a cls token.
  """
  enc = _encoder(params)
  has_cls = "cls_token" in enc
  out = {}
  if "pos_embed" not in enc:
    out["pos_embed"] = vit.sincos_2d(encoder_width(enc), *grid, cls_token=has_cls)[None]
  if "decoder" in params:
    width = params["decoder"]["embed"]["kernel"].shape[-1]
    out["decoder_pos_embed"] = vit.sincos_2d(width, *grid, cls_token=has_cls)[None]
  return out


# ----------------------------------------------------------------------------- both ways


def export_state_dict(params: Params, grid: tuple[int, int]) -> StateDict:
  """Our tree (numpy or jax arrays) -> the official / timm state_dict, float32 as stored.

  `params`: a pretraining tree {'encoder', 'decoder'} (official MAE / ConvMAE layout), or an
  encoder or classifier tree (timm's ViT layout, official ConvViT). `grid`: the patch grid
  (h, w) the sin-cos buffers are written for (image size / patch size).
  """
  out = {}
  flat = traverse_util.flatten_dict(params)
  for name, (path, kind, _) in spec(params).items():
    out[name] = to_torch(np.asarray(flat[path]), kind)
  for name, value in constants(params, grid).items():
    out[name] = value
  return out


def import_state_dict(state_dict: Mapping[str, np.ndarray], abstract: Params,
                      grid: tuple[int, int], ignore: tuple[str, ...] = (),
                      where: str = "state_dict") -> Params:
  """A state_dict -> a tree with `abstract`'s structure, shapes and dtypes (the inverse of
  `export_state_dict`).

  Names of `ignore` (and sin-cos buffers equal to our constants) are skipped; any other name
  the tree lacks, a parameter the state_dict lacks, or a shape that differs raises one
  ConversionError listing them all. A buffer that is not our constant is an error too: our
  pretraining models cannot hold a learned position embedding there.
  """
  expected = spec(abstract)
  consts = constants(abstract, grid)  # reads shapes only.
  want = {name: torch_shape(shape, kind) for name, (_, kind, shape) in expected.items()}
  have = {name: tuple(v.shape) for name, v in state_dict.items()
          if name not in consts and name not in ignore}
  not_sincos = []
  for name, value in consts.items():
    if name not in state_dict:
      continue  # a buffer, not a parameter: ours is computed.
    got = state_dict[name]
    want[name], have[name] = value.shape, tuple(got.shape)
    if tuple(got.shape) == value.shape and not np.allclose(
        np.asarray(got, np.float64), value, rtol=0, atol=SINCOS_ATOL):
      not_sincos.append(name)
  problem = describe_mismatch(want, have, limit=12)
  problems = [problem] if problem else []
  if not_sincos:
    problems.append(f"{', '.join(not_sincos)} not the fixed sin-cos embedding (a learned one "
                    "cannot be kept in this model)")
  if problems:
    raise ConversionError(f"{where} does not fit the model: {'; '.join(problems)}")
  flat_abstract = traverse_util.flatten_dict(abstract)
  flat = {}
  for name, (path, kind, _) in expected.items():
    flat[path] = from_torch(np.asarray(state_dict[name]), kind).astype(
        flat_abstract[path].dtype, copy=False)
  return traverse_util.unflatten_dict(flat)


def is_sincos(value: np.ndarray, width: int, grid: tuple[int, int], cls_token: bool) -> bool:
  """Whether an imported [1, (1 +) N, D] position embedding is our fixed sin-cos constant."""
  want = vit.sincos_2d(width, *grid, cls_token=cls_token)[None]
  return (tuple(value.shape) == want.shape and
          np.allclose(np.asarray(value, np.float64), want, rtol=0, atol=SINCOS_ATOL))


# ----------------------------------------------------------------------------- architectures


def block_count(names, prefix: str) -> int:
  """Blocks `prefix.{i}.*` in a state_dict; ConversionError unless numbered 0..n-1."""
  ids = {int(m.group(1)) for n in names if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", n))}
  if ids and ids != set(range(len(ids))):
    raise ConversionError(f"{prefix}.* are numbered {sorted(ids)}, not 0..{len(ids) - 1}")
  return len(ids)


def vit_timm_name(variant: str) -> Optional[str]:
  """The timm model name of a ViT size ('B/16' -> 'vit_base_patch16_224'), None if timm has none."""
  names = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}
  known = {("Ti", 16), ("S", 8), ("S", 16), ("S", 32), ("B", 8), ("B", 16), ("B", 32),
           ("L", 14), ("L", 16), ("L", 32), ("H", 14)}
  name, patch = variant.split("/")
  if (name, int(patch)) not in known:
    return None
  return f"vit_{names[name]}_patch{patch}_224"


def infer_vit_variant(state_dict: Mapping[str, np.ndarray], variant: Optional[str] = None) -> str:
  """'B/16' from a timm / official MAE state_dict: width and patch from patch_embed.proj,
  depth from the blocks, heads from vit.SIZES. `variant` overrides (shapes are checked later)."""
  if variant:
    try:
      vit.parse_variant(variant)
    except ValueError as e:
      raise UserError(f"--variant: {e}") from None
    return variant
  w = state_dict["patch_embed.proj.weight"]
  if len(w.shape) != 4 or w.shape[2] != w.shape[3] or w.shape[1] != 3:
    raise UserError(f"unknown architecture: patch_embed.proj.weight has shape {list(w.shape)}, "
                    "not [D, 3, p, p]")
  width, patch = w.shape[0], w.shape[2]
  depth = block_count(state_dict, "blocks")
  for name, (w_, d_, _) in vit.SIZES.items():
    if (w_, d_) == (width, depth):
      return f"{name}/{patch}"
  sizes = ", ".join(f"{n} {w_}x{d_}" for n, (w_, d_, _) in vit.SIZES.items())
  raise UserError(f"unknown architecture: a ViT of width {width}, depth {depth}, patch {patch} "
                  f"is none of mae_jax.models.vit.SIZES (width x depth: {sizes}); pass "
                  "--variant=NAME/PATCH to force one")


def infer_convvit_size(state_dict: Mapping[str, np.ndarray], variant: Optional[str] = None) -> str:
  """'base' from an official ConvMAE / ConvViT state_dict (stage widths and depths)."""
  if variant:
    try:
      convvit.get_size(variant)
    except ValueError as e:
      raise UserError(f"--variant: {e}") from None
    return variant
  try:
    widths = tuple(int(state_dict[f"patch_embed{s}.proj.weight"].shape[0]) for s in (1, 2, 3))
  except KeyError as e:
    raise UserError(f"unknown architecture: a ConvMAE state_dict needs {e.args[0]}") from None
  depths = tuple(block_count(state_dict, f"blocks{s}") for s in (1, 2, 3))
  for name, (w_, d_, _) in convvit.SIZES.items():
    if (tuple(w_), tuple(d_)) == (widths, depths):
      return name
  sizes = ", ".join(f"{n} widths {list(w_)} depths {list(d_)}"
                    for n, (w_, d_, _) in convvit.SIZES.items())
  raise UserError(f"unknown architecture: a ConvMAE with widths {list(widths)}, depths "
                  f"{list(depths)} is none of mae_jax.models.convvit.SIZES ({sizes}); pass "
                  "--variant=NAME to force one")


def square_grid(num_patches: int, what: str) -> int:
  """The side of a square grid of `num_patches` positions (a count alone cannot tell the sides of
  a non-square grid: UserError asking for --image_size)."""
  g = int(round(num_patches**0.5))
  if g * g != num_patches:
    raise UserError(f"{what} has {num_patches} patch positions, not a square grid; pass "
                    "--image_size=H,W")
  return g
