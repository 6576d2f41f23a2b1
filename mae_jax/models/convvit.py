"""ConvMAE's hybrid convolution + transformer encoder (Gao et al. 2022), Flax Linen, NHWC.

Follows the official Alpha-VL/ConvMAE code (`models_convmae.py`, `models_convvit.py`,
`vision_transformer.py`):

  stage 1  patch_embed1 (conv 4x4 stride 4 -> LayerNorm -> GELU), blocks1_i (conv blocks), 1/4 res.
  stage 2  patch_embed2 (conv 2x2 stride 2 -> LayerNorm -> GELU), blocks2_i (conv blocks), 1/8 res.
  stage 3  patch_embed3 (conv 2x2 stride 2 -> LayerNorm -> GELU), flatten, patch_embed4 (Dense),
           + fixed 2-D sin-cos position embedding (no cls token), blocks3_i (ViT blocks), norm.

`ConvMAEEncoder` (pretraining) draws nothing itself: it takes the MAE mask of the stage-3 grid
(one token per 16x16 pixels), masks the depthwise-conv input of every conv block with that mask
upsampled x4 / x2 (masked convolution, so visible positions never see masked pixels), encodes
only the kept stage-3 tokens, and fuses the stage-1/2 maps into them through
`stage{1,2}_output_decode` (strided convs onto the stage-3 grid), added after blocks3 and before
`norm`. `ConvViT` is the fine-tuning model: the same parameters without masking and without the
stage decoders (as the official fine-tuning model), average-pooled, with an optional head.

Numerics: LayerNorm eps 1e-5 in the conv blocks and patch embeddings (the official code builds
those with torch's default), 1e-6 in blocks3 and `norm`; exact (erf) GELU everywhere.
Inits as the official pretraining model: Linear layers xavier-uniform with zero bias,
patch_embed3's kernel xavier-uniform over its flattened [C*p*p, D] view (the official
`initialize_weights` re-initializes only that one patch embedding); every other conv keeps
PyTorch's default Conv2d init, reproduced here: kernel and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))
with fan_in = in_channels / groups * k * k. The official model is square-224 only; here every
grid is computed from the input, so any height and width that are multiples of 16 work.
Parameter names map one-to-one onto the official state_dict (`blocks1.0.attn` ->
`blocks1_0/attn`); the official `pos_embed` is a fixed sin-cos buffer, computed here, not stored.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.masking import upsample_mask
from mae_jax.models.vit import (Compute, DropPath, dense_init, gather_tokens, gelu, patch_init,
                                run_blocks, sincos_2d)

# name -> (stage widths, stage depths, heads of the stage-3 blocks); MLP ratio 4 in all stages.
SIZES = {
    "mu": ((32, 64, 128), (1, 1, 2), 4),  # CPU demo size, not from the paper.
    "base": ((256, 384, 768), (2, 2, 11), 12),  # official convmae_convvit_base_patch16.
}
STRIDES = (4, 2, 2)  # patch sizes of patch_embed1..3.
PATCH_SIZE = 16  # pixels per stage-3 token (4 * 2 * 2): the MAE patch of mask and loss.
STAGE_DECODERS = ("stage1_output_decode", "stage2_output_decode")


@dataclasses.dataclass(frozen=True)
class ConvViTSize:
  widths: tuple[int, int, int]
  depths: tuple[int, int, int]
  num_heads: int


def get_size(name: str) -> ConvViTSize:
  """'base' -> ConvViTSize((256, 384, 768), (2, 2, 11), 12). ValueError for unknown names."""
  if name not in SIZES:
    raise ValueError(f"unknown ConvViT size {name!r}; one of {sorted(SIZES)}")
  return ConvViTSize(*SIZES[name])


# PyTorch's default Conv2d kernel init (kaiming_uniform, a=sqrt(5)) is U(+-1/sqrt(fan_in)).
conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv_bias_init(fan_in: int):
  """PyTorch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in**-0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def patch_conv(features: int, patch: int, name: str, *, in_features: int,
               kernel_init=conv_kernel_init) -> nn.Conv:
  """Non-overlapping patch x patch conv, stride patch, with bias and PyTorch-default init."""
  return nn.Conv(features, (patch, patch), strides=(patch, patch), padding="VALID",
                 kernel_init=kernel_init, bias_init=conv_bias_init(in_features * patch * patch),
                 name=name)


class PointwiseConv(nn.Module):
  """A 1x1 conv (kernel [1, 1, C, D] as nn.Conv's, bias, PyTorch-default init) as a matmul.

  The same function as nn.Conv with a 1x1 kernel, but XLA's CPU backend runs a dot several
  times faster than a 1x1 convolution (about 7x forward + backward at the demo's sizes).
  """
  features: int

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", conv_kernel_init, (1, 1, fan_in, self.features))
    bias = self.param("bias", conv_bias_init(fan_in), (self.features,))
    return jnp.einsum("...c,cd->...d", x, kernel[0, 0].astype(x.dtype)) + bias.astype(x.dtype)


DWCONV_IMPLS = ("conv", "shifts")


class DepthwiseConv(nn.Module):
  """k x k depthwise conv, stride 1, zero padding k // 2, bias; kernel [k, k, 1, C] as nn.Conv's.

  impl 'conv': lax.conv_general_dilated with feature_group_count = C (the accelerator path).
  impl 'shifts': the sum of k*k shifted, per-channel-scaled copies of the zero-padded input, the
  same function up to float summation order; XLA's CPU backend runs it (forward + backward)
  about 3.5x faster than its grouped convolution at the demo's sizes.
  """
  kernel_size: int = 5
  impl: str = "conv"

  @nn.compact
  def __call__(self, x):
    if self.impl not in DWCONV_IMPLS:
      raise ValueError(f"unknown depthwise conv impl {self.impl!r}; one of {DWCONV_IMPLS}")
    k, c = self.kernel_size, x.shape[-1]
    pad = k // 2
    kernel = self.param("kernel", conv_kernel_init, (k, k, 1, c)).astype(x.dtype)
    bias = self.param("bias", conv_bias_init(k * k), (c,)).astype(x.dtype)
    if self.impl == "conv":
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad), (pad, pad)],
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=c)
    else:
      h, w = x.shape[1:3]
      xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      y = sum(xp[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k))
    return y + bias


class ConvPatchEmbed(nn.Module):
  """p x p stride-p conv -> LayerNorm(eps 1e-5) -> GELU: [B, H, W, C] -> [B, H/p, W/p, D]."""
  width: int
  patch_size: int
  xavier: bool = False  # the official code re-inits only patch_embed3 like a Linear layer.

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = patch_conv(self.width, p, "proj", in_features=x.shape[-1],
                   kernel_init=patch_init if self.xavier else conv_kernel_init)(x)
    x = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
    return gelu(x)


class ConvMlp(nn.Module):
  """1x1 conv -> exact GELU -> 1x1 conv (official `CMlp`)."""
  hidden: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = PointwiseConv(self.hidden, name="fc1")(x)
    x = gelu(x)
    return PointwiseConv(d, name="fc2")(x)


class CBlock(nn.Module):
  """Conv block: x + conv2(dwconv5x5(visible * conv1(LN(x)))), then x + mlp(LN(x)).

  `visible` [B, H, W, 1] (1 = visible) zeroes masked positions at the depthwise conv's input
  only, so the output at a visible position depends on visible positions alone.
  The depthwise conv is named `attn`, as in the official code.
  """
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dwconv_impl: str = "conv"  # see DepthwiseConv.

  @nn.compact
  def __call__(self, x, visible: Optional[jax.Array] = None, deterministic: bool = True):
    d = x.shape[-1]
    y = nn.LayerNorm(epsilon=1e-5, name="norm1")(x)
    y = PointwiseConv(d, name="conv1")(y)
    if visible is not None:
      y = y * visible.astype(y.dtype)
    y = DepthwiseConv(5, self.dwconv_impl, name="attn")(y)
    y = PointwiseConv(d, name="conv2")(y)
    x = x + DropPath(self.drop_path)(y, deterministic)
    y = nn.LayerNorm(epsilon=1e-5, name="norm2")(x)
    y = ConvMlp(int(d * self.mlp_ratio), name="mlp")(y)
    return x + DropPath(self.drop_path)(y, deterministic)


class _ConvViTStages(nn.Module):
  """Fields and stage code shared by ConvMAEEncoder and ConvViT, so both name parameters alike.

  The helpers below create submodules and are called only from the subclasses' compact
  `__call__`, so their parameters sit at the top level of the module (`blocks1_0`, ...).
  """
  widths: tuple[int, int, int]
  depths: tuple[int, int, int]
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dwconv_impl: str = "conv"  # 'shifts' is faster on CPU; see DepthwiseConv.
  # A trainable `pos_embed` [1, h*w, w3] initialized with the sin-cos values (fine-tuning, as the
  # official ConvViT); False: the fixed sin-cos constant (pretraining).
  learnable_pos_embed: bool = False
  compute: Compute = Compute()  # dtype, remat, scan (scan and remat: stage-3 blocks).

  @classmethod
  def from_variant(cls, name: str, **kwargs):
    s = get_size(name)
    return cls(widths=s.widths, depths=s.depths, num_heads=s.num_heads, **kwargs)

  @staticmethod
  def grid(image_hw) -> tuple[int, int]:
    """The stage-3 token grid of an image: (H / 16, W / 16)."""
    h, w = image_hw
    if h % PATCH_SIZE or w % PATCH_SIZE:
      raise ValueError(f"ConvViT needs image sides that are multiples of {PATCH_SIZE}, "
                       f"got {h}x{w}")
    return h // PATCH_SIZE, w // PATCH_SIZE

  def _drop_path_rates(self) -> list[float]:
    # One linear ramp over all blocks of the three stages, as the official ConvViT.
    return [float(r) for r in np.linspace(0.0, self.drop_path_rate, sum(self.depths))]

  def _conv_stages(self, images, visible1, visible2, train):
    """Stages 1-2 and the stage-3 embedding.

    Returns (tokens [B, h*w, w3] with position embedding, stage-1 map [B, 4h, 4w, w1],
    stage-2 map [B, 2h, 2w, w2]); both maps are also sown as intermediates 'stage1'/'stage2'.
    """
    rates = self._drop_path_rates()
    maps = []
    x = images.astype(self.compute.jnp_dtype)
    for s, visible in enumerate((visible1, visible2)):
      x = ConvPatchEmbed(self.widths[s], STRIDES[s], name=f"patch_embed{s + 1}")(x)
      for i in range(self.depths[s]):
        x = CBlock(self.mlp_ratio, rates.pop(0), self.dwconv_impl, name=f"blocks{s + 1}_{i}")(
            x, visible, deterministic=not train)
      self.sow("intermediates", f"stage{s + 1}", x)
      maps.append(x)
    x = ConvPatchEmbed(self.widths[2], STRIDES[2], xavier=True, name="patch_embed3")(x)
    b, gh, gw, d = x.shape
    x = nn.Dense(d, kernel_init=dense_init, name="patch_embed4")(x.reshape(b, gh * gw, d))
    pos = sincos_2d(d, gh, gw, cls_token=False)[None]  # [1, h*w, w3]
    if self.learnable_pos_embed:
      pos = self.param("pos_embed", lambda *_: jnp.asarray(pos), None)
    x = x + pos.astype(x.dtype)
    return x, maps[0], maps[1]

  def _blocks3(self, x, train):
    rates = self._drop_path_rates()[self.depths[0] + self.depths[1]:]
    return run_blocks(self, x, prefix="blocks3", num_heads=self.num_heads,
                      mlp_ratio=self.mlp_ratio, rates=rates, train=train, compute=self.compute)


class ConvMAEEncoder(_ConvViTStages):
  """ConvMAE's pretraining encoder (official `MaskedAutoencoderConvViT.forward_encoder`).

  `__call__(images, ids_keep, mask)`: images [B, H, W, 3]; ids_keep [B, N_vis] and mask [B, h*w]
  (1 = masked, patch order) from `masking.random_mask` on the stage-3 grid (h, w) = (H/16, W/16).
  Returns the final-normed visible tokens [B, N_vis, w3] in ids_keep order. With
  ids_keep = mask = None every position is visible and all h*w tokens are returned.
  """

  @nn.compact
  def __call__(self, images, ids_keep: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None, train: bool = False):
    if (ids_keep is None) != (mask is None):
      raise ValueError("ConvMAEEncoder needs both ids_keep and mask, or neither")
    gh, gw = self.grid(images.shape[1:3])
    visible1 = visible2 = None
    if mask is not None:
      visible = 1.0 - mask.astype(images.dtype)  # [B, h*w]
      visible1 = upsample_mask(visible, (gh, gw), 4)  # [B, 4h, 4w, 1]
      visible2 = upsample_mask(visible, (gh, gw), 2)  # [B, 2h, 2w, 1]
    x, stage1, stage2 = self._conv_stages(images, visible1, visible2, train)
    w1, w2, w3 = self.widths
    # Multi-scale fusion: stage-1/2 maps onto the stage-3 grid, one token per 16x16 pixels.
    fused = (patch_conv(w3, 4, STAGE_DECODERS[0], in_features=w1)(stage1) +
             patch_conv(w3, 2, STAGE_DECODERS[1], in_features=w2)(stage2))
    fused = fused.reshape(fused.shape[0], gh * gw, w3)  # [B, h*w, w3]
    if ids_keep is not None:
      x = gather_tokens(x, ids_keep)  # [B, N_vis, w3]
      fused = gather_tokens(fused, ids_keep)
    x = self._blocks3(x, train)
    return nn.LayerNorm(epsilon=1e-6, name="norm")(x + fused)


class ConvViT(_ConvViTStages):
  """ConvViT for classification (official `models_convvit.ConvViT`): no mask, no stage decoders.

  `__call__(images)` -> [B, num_classes] logits, or pooled features [B, w3] if num_classes == 0.
  global_pool=True (the official fine-tuning default): mean over the stage-3 tokens of blocks3's
  output, then `fc_norm` (a fresh LayerNorm; the pretrained `norm` goes unused, as in the official
  load). global_pool=False: the pretrained `norm`, then the mean; the official code takes token
  0 there (its linear probe's default), a leftover of cls-token ViTs: ConvViT has no cls token,
  so we average instead. The head is initialized normal(head_init_std), bias 0 (official
  fine-tuning re-initializes it with std 2e-5, linear probing with 0.01). Parameters are those of
  ConvMAEEncoder minus the stage decoders (and `norm` <-> `fc_norm`); see `from_pretraining`.
  With learnable_pos_embed (fine-tuning) the position embedding is a trainable `pos_embed`
  initialized with the sin-cos values, as the official fine-tuning model loads them.
  """
  num_classes: int = 0
  global_pool: bool = True
  head_init_std: float = 2e-5

  @nn.compact
  def __call__(self, images, train: bool = False):
    self.grid(images.shape[1:3])  # checks the image size.
    x, _, _ = self._conv_stages(images, None, None, train)
    x = self._blocks3(x, train)  # [B, h*w, w3]
    if self.global_pool:
      x = nn.LayerNorm(epsilon=1e-6, name="fc_norm")(x.mean(axis=1))
    else:
      x = nn.LayerNorm(epsilon=1e-6, name="norm")(x).mean(axis=1)
    if self.num_classes:
      x = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(self.head_init_std),
                   name="head")(x)
    return x


def from_pretraining(params: dict, encoder_params: dict) -> dict:
  """ConvViT params with every entry shared with a ConvMAE encoder taken from `encoder_params`.

  `params`: a freshly initialized ConvViT's params; `encoder_params`: the pretraining
  `params['encoder']`. As the official (strict=False) load: the stage decoders (and `norm` with
  global_pool) are left out, `head` and `fc_norm` keep their fresh values, and so does a
  learnable `pos_embed` the encoder lacks (its sin-cos init is the pretraining constant).
  ValueError if any other ConvViT parameter is missing from `encoder_params` or has another shape.
  """
  fresh = {"head", "fc_norm"} | ({"pos_embed"} - set(encoder_params))
  missing = sorted(set(params) - fresh - set(encoder_params))
  if missing:
    raise ValueError(f"pretrained encoder lacks {missing}")
  out = dict(params)
  for name in sorted(set(params) - fresh):
    want = jax.tree.map(lambda x: x.shape, params[name])
    got = jax.tree.map(lambda x: x.shape, encoder_params[name])
    if want != got:
      raise ValueError(f"pretrained {name} has shapes {got}, this ConvViT needs {want}")
    out[name] = encoder_params[name]
  return out
