"""RandAugment and RandomErasing for the fine-tuning pipeline, as stateless TensorFlow ops.

Semantics follow timm (`timm/data/auto_augment.py`: op lists, magnitude sampling, level -> argument
rules; `timm/data/random_erasing.py`: RandomErasing with count 1), and each op's pixel arithmetic
follows PIL (`ImageOps`, `ImageEnhance`, `Image.transform` / `Image.rotate`), which timm calls.
Everything is a pure function of (image, seed): no Python randomness, no `tf.py_function`, so the
ops run per example inside `tf.data.Dataset.map` in graph mode, and a seed gives one result.

RandAugment works on uint8 [H, W, 3] images (before `pipeline._normalize`); RandomErasing on the
normalized float32 [H, W, C] image (after it), as in timm's transform order.

Known deviations from timm (see `randaugment` and the geometric ops):
  * Rotate/Shear/Translate resample with PIL's BILINEAR filter only. timm picks BILINEAR or BICUBIC
    at random (or the `interpolation` hparam, 'bicubic' in the MAE fine-tuning recipe);
    `ImageProjectiveTransformV3` has no bicubic mode.
  * 'inc0' selects the non-increasing op list (timm's parser tests `bool('0')`, which is True).
  * PosterizeIncreasing at magnitude 10 keeps 0 bits, a black image, as PIL's posterize did;
    recent Pillow (13 here) refuses bits < 1, so timm fails there; newer timm keeps >= 1 bit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from mae_jax.errors import UserError

# timm create_transform: img_mean = round(255 * ImageNet mean) = (124, 116, 104).
IMAGENET_FILL = (124, 116, 104)
# timm auto_augment.py _LEVEL_DENOM: magnitude m maps to the fraction m / 10 of each op's range.
LEVEL_DENOM = 10.0

# timm auto_augment.py _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS, in timm's order.
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

Number = Union[int, float, tf.Tensor]
Fill = Sequence[int]

# The ops are plain TensorFlow with no tensor-dependent Python control flow: AutoGraph (which
# tf.data.Dataset.map and tf.function apply by default) has nothing to convert, and converting every
# helper made building a RandAugment map function take several times longer.
_no_autograph = tf.autograph.experimental.do_not_convert


# ----------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed timm RandAugment config string ('rand-m9-mstd0.5-inc1')."""
  magnitude: int = 10          # m: timm default _LEVEL_DENOM.
  num_layers: int = 2          # n: ops applied per image.
  magnitude_std: float = 0.0   # mstd: gauss noise on m; inf (mstd > 100) = uniform(0, m).
  magnitude_max: int = 10      # mmax: m is clipped to [0, mmax].
  increasing: bool = False     # inc: the *Increasing op list.
  prob: float = 0.5            # p: probability that each chosen op is applied.

  @property
  def op_names(self) -> tuple[str, ...]:
    return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


_SPEC_KEYS = {  # key -> (field, parse); parse raises ValueError on a bad value.
    "m": ("magnitude", lambda v: _nonneg(int(v))),
    "n": ("num_layers", lambda v: _nonneg(int(v))),
    "mstd": ("magnitude_std", lambda v: math.inf if _nonneg(float(v)) > 100 else float(v)),
    "mmax": ("magnitude_max", lambda v: _positive(int(v))),
    "inc": ("increasing", lambda v: v == "1" if v in ("0", "1") else _bad()),
    "p": ("prob", lambda v: float(v) if 0.0 <= float(v) <= 1.0 else _bad()),
}


def _bad():
  raise ValueError


def _nonneg(v):
  return v if v >= 0 else _bad()


def _positive(v):
  return v if v > 0 else _bad()


def parse_randaugment(spec: str) -> RandAugmentSpec:
  """Parses timm's `rand_augment_transform` config string: 'rand' then '-KEYVALUE' sections with
  keys m (int), n (int), mstd (float; > 100 means uniform magnitude), mmax (int), inc (0/1),
  p (float in [0, 1]). UserError (one line) for anything else."""
  usage = "expected e.g. 'rand-m9-mstd0.5-inc1' (keys m, n, mstd, mmax, inc, p)"
  parts = spec.strip().split("-")
  if parts[0] != "rand":
    raise UserError(f"bad RandAugment spec {spec!r}: must start with 'rand'; {usage}")
  values = {}
  for part in parts[1:]:
    match = re.fullmatch(r"([a-z]+)(\d.*)", part)  # timm splits each section at its first digit.
    if match is None:
      raise UserError(f"bad RandAugment spec {spec!r}: section {part!r} is not KEY+NUMBER; {usage}")
    key, value = match.groups()
    if key not in _SPEC_KEYS:
      raise UserError(f"bad RandAugment spec {spec!r}: unknown key {key!r}; {usage}")
    field, parse = _SPEC_KEYS[key]
    try:
      values[field] = parse(value)
    except ValueError:
      raise UserError(f"bad RandAugment spec {spec!r}: bad value {value!r} for {key!r}; "
                      f"{usage}") from None
  return RandAugmentSpec(**values)


# ----------------------------------------------------------------------------- helpers


def _hw(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  shape = tf.shape(image)
  return shape[0], shape[1]


def _keep_shape(out: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
  out.set_shape(image.shape)
  return out


def _lut(image: tf.Tensor, lut: tf.Tensor) -> tf.Tensor:
  """PIL Image.point: `lut` int [256] (all bands) or [C, 256] (per band), values clipped to uint8
  as PIL's point() does."""
  lut = tf.clip_by_value(tf.cast(lut, tf.int32), 0, 255)
  index = tf.cast(image, tf.int32)
  if lut.shape.rank == 2:
    index = index + 256 * tf.range(tf.shape(lut)[0])
    lut = tf.reshape(lut, [-1])
  return _keep_shape(tf.cast(tf.gather(lut, index), tf.uint8), image)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: Number) -> tf.Tensor:
  """PIL Image.blend(degenerate, image, factor) (libImaging/Blend.c): float32
  `d + factor * (i - d)`, clipped to [0, 255] and truncated (not rounded) to uint8."""
  alpha = tf.cast(factor, tf.float32)
  d = tf.cast(degenerate, tf.int32)
  diff = tf.cast(tf.cast(image, tf.int32) - d, tf.float32)
  out = tf.cast(d, tf.float32) + alpha * diff
  out = tf.floor(tf.clip_by_value(out, 0.0, 255.0))
  return _keep_shape(tf.cast(out, tf.uint8), image)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL convert('L') (libImaging/Convert.c): ITU-R 601-2 luma L = R*299/1000 + G*587/1000 +
  B*114/1000 in PIL's 16-bit fixed point, (19595 R + 38470 G + 7471 B + 0x8000) >> 16; int32."""
  x = tf.cast(image, tf.int32)
  weighted = x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000
  return tf.bitwise.right_shift(weighted, 16)


# ----------------------------------------------------------------------------- pixel ops


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.autocontrast (cutoff 0): per channel, lut[v] = int(v * scale + offset) with
  scale = 255 / (hi - lo), offset = -lo * scale in float64; identity where hi <= lo."""
  x = tf.cast(image, tf.float64)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = 255.0 / tf.where(hi > lo, hi - lo, 1.0)
  offset = -lo * scale
  out = tf.clip_by_value(tf.floor(x * scale + offset), 0.0, 255.0)  # values >= 0: floor == int().
  out = tf.where(hi > lo, out, x)
  return _keep_shape(tf.cast(out, tf.uint8), image)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.equalize: per channel, step = (count - count of the top non-empty bin) // 255,
  lut[i] = (step // 2 + sum(hist[:i])) // step (clipped to 255); identity when step == 0."""
  channels = image.shape[-1] or 3
  index = tf.cast(image, tf.int32) + 256 * tf.range(channels)
  hist = tf.math.bincount(tf.reshape(index, [-1]), minlength=256 * channels,
                          maxlength=256 * channels, dtype=tf.int32)
  hist = tf.reshape(hist, [channels, 256])
  bins = tf.range(256)
  top = tf.reduce_max(tf.where(hist > 0, bins, -1), axis=1)
  top_count = tf.gather(hist, tf.maximum(top, 0), batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - top_count) // 255
  below = tf.cumsum(hist, axis=1, exclusive=True)
  lut = (step[:, None] // 2 + below) // tf.maximum(step, 1)[:, None]
  lut = tf.where(step[:, None] > 0, lut, bins[None, :])
  return _lut(image, lut)


def invert(image: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.invert: 255 - v."""
  return 255 - tf.convert_to_tensor(image)


def posterize(image: tf.Tensor, bits: Number) -> tf.Tensor:
  """PIL ImageOps.posterize: keep the top `bits` bits (v & ~(2**(8 - bits) - 1)); timm's posterize
  returns the image unchanged for bits >= 8."""
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = 256 - tf.bitwise.left_shift(1, 8 - bits)
  return tf.bitwise.bitwise_and(image, tf.cast(mask, tf.uint8))


def solarize(image: tf.Tensor, threshold: Number) -> tf.Tensor:
  """PIL ImageOps.solarize: v if v < threshold else 255 - v."""
  below = tf.cast(image, tf.int32) < tf.cast(threshold, tf.int32)
  return tf.where(below, image, 255 - image)


def solarize_add(image: tf.Tensor, add: Number, threshold: Number = 128) -> tf.Tensor:
  """timm auto_augment.py solarize_add: min(255, v + add) if v < threshold else v."""
  x = tf.cast(image, tf.int32)
  out = tf.where(x < tf.cast(threshold, tf.int32), tf.minimum(x + tf.cast(add, tf.int32), 255), x)
  return _keep_shape(tf.cast(out, tf.uint8), image)


def color(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """PIL ImageEnhance.Color: blend with the grayscale ('L') image."""
  gray = tf.broadcast_to(_grayscale(image)[..., None], tf.shape(image))
  return _blend(gray, image, factor)


def contrast(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """PIL ImageEnhance.Contrast: blend with a constant image of int(mean(L) + 0.5)."""
  gray = tf.cast(_grayscale(image), tf.float64)
  mean = tf.floor(tf.reduce_mean(gray) + 0.5)
  return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.int32)), image, factor)


def brightness(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """PIL ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def _smooth(image: tf.Tensor) -> tf.Tensor:
  """PIL ImageFilter.SMOOTH (libImaging/Filter.c, 3x3): kernel [[1,1,1],[1,5,1],[1,1,1]] / 13,
  + 0.5, truncated, with the one-pixel border copied unchanged.

  PIL sums in float32; with S the integer weighted sum, S / 13 + 0.5 is never within float error
  of an integer (2S = 13 (2k - 1) has no solution), so the exact (2S + 13) // 26 equals PIL's
  result. S (< 2**24) comes exact from a float32 convolution in any summation order.
  """
  x = tf.cast(image, tf.float32)
  channels = image.shape[-1] or 3
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  padded = tf.pad(x, [[1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")[None]  # border: discarded.
  total = tf.cast(tf.nn.depthwise_conv2d(padded, kernel, [1, 1, 1, 1], "VALID")[0], tf.int32)
  smooth = (2 * total + 13) // 26
  h, w = _hw(image)
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  inner = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
  return _keep_shape(tf.cast(tf.where(inner[..., None], smooth, tf.cast(image, tf.int32)),
                             tf.uint8), image)


def sharpness(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image."""
  return _blend(_smooth(image), image, factor)


# ----------------------------------------------------------------------------- geometric ops


# PIL affine data (a, b, c, d, e, f) -> ImageProjectiveTransformV3's 8 numbers in pixel-index
# coordinates (index = point - 0.5): (a, b, c + (a + b - 1) / 2, d, e, f + (d + e - 1) / 2, 0, 0).
_TO_INDEX = np.array([[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0.5, 0.5, 1, 0, 0, 0],
                      [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0.5, 0.5, 1],
                      [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
_TO_INDEX_BIAS = np.array([0, 0, -0.5, 0, 0, -0.5, 0, 0])


def _affine(image: tf.Tensor, coeffs: tf.Tensor, fill: Fill) -> tf.Tensor:
  """PIL Image.transform(size, AFFINE, coeffs, BILINEAR, fillcolor=fill), `coeffs` float64 [6].

  PIL samples output pixel (x, y) at source point (a X + b Y + c, d X + e Y + f), X = x + 0.5,
  Y = y + 0.5 (libImaging/Geometry.c); a point outside [0, W) x [0, H) gets `fill`, one inside is
  interpolated with edge-clamped neighbours and truncated. Here ImageProjectiveTransformV3 does the
  interpolation in pixel-index coordinates (edge-clamped by fill_mode NEAREST) and PIL's in-bounds
  test, computed in float64, places the fill.
  """
  h, w = _hw(image)
  transform = tf.linalg.matvec(tf.constant(_TO_INDEX), coeffs) + _TO_INDEX_BIAS
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=tf.cast(transform, tf.float32)[None],
      output_shape=tf.stack([h, w]), fill_value=tf.constant(0.0, tf.float32),
      interpolation="BILINEAR", fill_mode="NEAREST")[0]
  a, b, c, d, e, f = tf.unstack(coeffs)
  size_x, size_y = tf.cast(w, tf.float64), tf.cast(h, tf.float64)
  xs = tf.range(size_x, dtype=tf.float64)[None, :] + 0.5
  ys = tf.range(size_y, dtype=tf.float64)[:, None] + 0.5
  u = a * xs + b * ys + c
  v = d * xs + e * ys + f
  inside = (u >= 0.0) & (u < size_x) & (v >= 0.0) & (v < size_y)
  out = tf.where(inside[..., None], tf.floor(tf.clip_by_value(out, 0.0, 255.0)),
                 tf.constant(fill, tf.float32))
  return _keep_shape(tf.cast(out, tf.uint8), image)


def _along(index: int, value: Number) -> tf.Tensor:
  """The identity affine (1, 0, 0, 0, 1, 0) with coefficient `index` set to `value`."""
  identity = tf.constant([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], tf.float64)
  return tf.tensor_scatter_nd_update(identity, [[index]], tf.reshape(
      tf.cast(value, tf.float64), [1]))


def _rotate_coeffs(degrees: Number, h: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
  """PIL Image.rotate: counter-clockwise about the centre (W / 2, H / 2); the source point is
  R(-angle) (point - centre) + centre."""
  angle = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx = tf.cast(w, tf.float64) / 2.0
  cy = tf.cast(h, tf.float64) / 2.0
  return tf.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy])


# Each geometric op as PIL affine data, (argument, H, W) -> [6] (timm auto_augment.py).
_GEOMETRIC = {
    "Rotate": _rotate_coeffs,
    "ShearX": lambda factor, h, w: _along(1, factor),      # (1, factor, 0, 0, 1, 0)
    "ShearY": lambda factor, h, w: _along(3, factor),      # (1, 0, 0, factor, 1, 0)
    "TranslateXRel": lambda pct, h, w: _along(2, tf.cast(pct, tf.float64) * tf.cast(w, tf.float64)),
    "TranslateYRel": lambda pct, h, w: _along(5, tf.cast(pct, tf.float64) * tf.cast(h, tf.float64)),
}


def _geometric(name: str, image: tf.Tensor, arg: Number, fill: Fill) -> tf.Tensor:
  image = tf.convert_to_tensor(image)
  return _affine(image, _GEOMETRIC[name](arg, *_hw(image)), fill)


def rotate(image: tf.Tensor, degrees: Number, fill: Fill = IMAGENET_FILL) -> tf.Tensor:
  """timm rotate = PIL Image.rotate(degrees, BILINEAR, fillcolor=fill), about the centre."""
  return _geometric("Rotate", image, degrees, fill)


def shear_x(image: tf.Tensor, factor: Number, fill: Fill = IMAGENET_FILL) -> tf.Tensor:
  """timm shear_x: PIL affine (1, factor, 0, 0, 1, 0), about the origin (top-left corner)."""
  return _geometric("ShearX", image, factor, fill)


def shear_y(image: tf.Tensor, factor: Number, fill: Fill = IMAGENET_FILL) -> tf.Tensor:
  """timm shear_y: PIL affine (1, 0, 0, factor, 1, 0)."""
  return _geometric("ShearY", image, factor, fill)


def translate_x_rel(image: tf.Tensor, pct: Number, fill: Fill = IMAGENET_FILL) -> tf.Tensor:
  """timm translate_x_rel: PIL affine (1, 0, pct * W, 0, 1, 0) (content moves left for pct > 0)."""
  return _geometric("TranslateXRel", image, pct, fill)


def translate_y_rel(image: tf.Tensor, pct: Number, fill: Fill = IMAGENET_FILL) -> tf.Tensor:
  """timm translate_y_rel: PIL affine (1, 0, 0, 0, 1, pct * H)."""
  return _geometric("TranslateYRel", image, pct, fill)


# ----------------------------------------------------------------------------- level -> argument
# timm auto_augment.py LEVEL_TO_ARG, in float64 as Python computes them; `negate` is timm's
# _randomly_negate draw (a bool, or a bool tensor).


def _fraction(m: tf.Tensor) -> tf.Tensor:
  return tf.cast(m, tf.float64) / LEVEL_DENOM


def _signed(v: tf.Tensor, negate) -> tf.Tensor:
  return tf.where(tf.cast(negate, tf.bool), -v, v)


def _int(v: tf.Tensor) -> tf.Tensor:  # Python int() of a non-negative float.
  return tf.cast(tf.floor(v), tf.int32)


def _rotate_arg(m, negate):  # [-30, 30] degrees.
  return _signed(_fraction(m) * 30.0, negate)


def _shear_arg(m, negate):  # [-0.3, 0.3].
  return _signed(_fraction(m) * 0.3, negate)


def _translate_rel_arg(m, negate):  # [-0.45, 0.45] of the size (timm translate_pct default).
  return _signed(_fraction(m) * 0.45, negate)


def _enhance_arg(m, negate):  # [0.1, 1.9].
  del negate
  return _fraction(m) * 1.8 + 0.1


def _enhance_increasing_arg(m, negate):  # 1 +- [0, 0.9], kept >= 0.1.
  return tf.maximum(1.0 + _signed(_fraction(m) * 0.9, negate), 0.1)


def _posterize_arg(m, negate):  # bits kept, [0, 4].
  del negate
  return _int(_fraction(m) * 4.0)


def _posterize_increasing_arg(m, negate):  # bits kept, [4, 0]; >= 0 also when mmax > 10.
  return tf.maximum(4 - _posterize_arg(m, negate), 0)


def _solarize_arg(m, negate):  # threshold, [0, 256].
  del negate
  return tf.minimum(_int(_fraction(m) * 256.0), 256)


def _solarize_increasing_arg(m, negate):  # threshold, [256, 0].
  return 256 - _solarize_arg(m, negate)


def _solarize_add_arg(m, negate):  # added value, [0, 110] (timm caps it at 128 for m > 10).
  del negate
  return tf.minimum(_int(_fraction(m) * 110.0), 128)


# name -> (op, level -> argument or None, takes fill)
_OPS: dict[str, tuple[Callable, Optional[Callable], bool]] = {
    "AutoContrast": (auto_contrast, None, False),
    "Equalize": (equalize, None, False),
    "Invert": (invert, None, False),
    "Rotate": (rotate, _rotate_arg, True),
    "Posterize": (posterize, _posterize_arg, False),
    "PosterizeIncreasing": (posterize, _posterize_increasing_arg, False),
    "Solarize": (solarize, _solarize_arg, False),
    "SolarizeIncreasing": (solarize, _solarize_increasing_arg, False),
    "SolarizeAdd": (solarize_add, _solarize_add_arg, False),
    "Color": (color, _enhance_arg, False),
    "ColorIncreasing": (color, _enhance_increasing_arg, False),
    "Contrast": (contrast, _enhance_arg, False),
    "ContrastIncreasing": (contrast, _enhance_increasing_arg, False),
    "Brightness": (brightness, _enhance_arg, False),
    "BrightnessIncreasing": (brightness, _enhance_increasing_arg, False),
    "Sharpness": (sharpness, _enhance_arg, False),
    "SharpnessIncreasing": (sharpness, _enhance_increasing_arg, False),
    "ShearX": (shear_x, _shear_arg, True),
    "ShearY": (shear_y, _shear_arg, True),
    "TranslateXRel": (translate_x_rel, _translate_rel_arg, True),
    "TranslateYRel": (translate_y_rel, _translate_rel_arg, True),
}


def level_to_arg(name: str, magnitude: Number, negate=False) -> Optional[tf.Tensor]:
  """The argument timm's op `name` gets at `magnitude` (None for argument-free ops)."""
  level_fn = _OPS[name][1]
  return None if level_fn is None else level_fn(magnitude, negate)


@_no_autograph
def apply_op(name: str, image: tf.Tensor, magnitude: Number, negate=False,
             fill: Fill = IMAGENET_FILL) -> tf.Tensor:
  """timm AugmentOp `name` at a given (already sampled and clipped) magnitude, always applied."""
  op, level_fn, takes_fill = _OPS[name]
  image = tf.convert_to_tensor(image)
  args = () if level_fn is None else (level_fn(magnitude, negate),)
  kwargs = {"fill": fill} if takes_fill else {}
  return _keep_shape(op(image, *args, **kwargs), image)


# ----------------------------------------------------------------------------- RandAugment


@_no_autograph
def randaugment_plan(seed: tf.Tensor, spec: RandAugmentSpec) -> dict[str, tf.Tensor]:
  """The random draws of one `randaugment` call, each [num_layers]: op index into
  `spec.op_names`, whether it is applied, its magnitude and its sign draw.

  timm RandAugment: ops chosen uniformly with replacement (np.random.choice); AugmentOp: applied
  unless random() > p; magnitude gauss(m, mstd) (uniform(0, m) for mstd inf), clipped to
  [0, mmax]; _randomly_negate: negative when random() > 0.5.
  """
  n = spec.num_layers
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
  op = tf.random.stateless_uniform([n], seeds[0], 0, len(spec.op_names), dtype=tf.int32)
  if spec.prob >= 1.0:
    applied = tf.ones([n], tf.bool)
  else:
    applied = tf.random.stateless_uniform([n], seeds[1], dtype=tf.float64) <= spec.prob
  m = tf.fill([n], tf.constant(float(spec.magnitude), tf.float64))
  if spec.magnitude_std == math.inf:
    m = m * tf.random.stateless_uniform([n], seeds[2], dtype=tf.float64)
  elif spec.magnitude_std > 0:
    m = m + spec.magnitude_std * tf.random.stateless_normal([n], seeds[2], dtype=tf.float64)
  m = tf.clip_by_value(m, 0.0, float(spec.magnitude_max))
  negate = tf.random.stateless_uniform([n], seeds[3], dtype=tf.float64) > 0.5
  return {"op": op, "applied": applied, "magnitude": m, "negate": negate}


@_no_autograph
def randaugment(image: tf.Tensor, seed: tf.Tensor, spec: Union[RandAugmentSpec, str],
                fill: Fill = IMAGENET_FILL) -> tf.Tensor:
  """timm `rand_augment_transform(spec)` on a uint8 [H, W, 3] image, as a pure function of the
  [2] int64 `seed`. Geometric ops resample bilinearly (timm: random bilinear/bicubic) and fill
  with `fill` (timm: img_mean).

  Each layer is one tf.switch_case: a branch per pixel op, one shared branch for the five
  geometric ops (their affine data gathered by op, then one warp: a smaller graph, same result),
  and an identity branch for an op not applied.
  """
  if isinstance(spec, str):
    spec = parse_randaugment(spec)
  image = tf.convert_to_tensor(image)
  names = spec.op_names
  geometric = [n for n in names if n in _GEOMETRIC]
  pixel = [n for n in names if n not in _GEOMETRIC]
  # op index -> branch index (pixel ops first, then the shared warp, then identity).
  branch_of = [pixel.index(n) if n in pixel else len(pixel) for n in names]
  warp_of = [geometric.index(n) if n in geometric else 0 for n in names]
  plan = randaugment_plan(seed, spec)
  h, w = _hw(image)
  for i in range(spec.num_layers):
    op, m, negate = plan["op"][i], plan["magnitude"][i], plan["negate"][i]
    index = tf.where(plan["applied"][i], tf.gather(branch_of, op), len(pixel) + 1)

    def warp(x=image, op=op, m=m, negate=negate):
      coeffs = tf.stack([_GEOMETRIC[n](_OPS[n][1](m, negate), h, w) for n in geometric])
      return _affine(x, tf.gather(coeffs, tf.gather(warp_of, op)), fill)

    branches = [(lambda n=n, x=image: apply_op(n, x, m, negate)) for n in pixel]
    branches += [warp, lambda x=image: tf.identity(x)]
    image = _keep_shape(tf.switch_case(index, branches), image)
  return image


# ----------------------------------------------------------------------------- RandomErasing


@_no_autograph
def random_erasing(image: tf.Tensor, seed: tf.Tensor, prob: float, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3,
                   max_aspect: Optional[float] = None, mode: str = "pixel",
                   max_attempts: int = 10) -> tf.Tensor:
  """timm RandomErasing (count 1) on a normalized float [H, W, C] image.

  With probability `prob` (erase unless random() > prob): up to `max_attempts` proposals, area =
  U(min_area, max_area) * H * W, aspect = exp(U(log min_aspect, log max_aspect)), h = round(
  sqrt(area * aspect)), w = round(sqrt(area / aspect)) (round half to even, as Python's round);
  the first with h < H and w < W is placed at top = randint(0, H - h), left = randint(0, W - w)
  (inclusive) and filled with per-pixel N(0, 1) ('pixel'), one N(0, 1) per channel ('rand') or
  0 ('const'). All proposals are drawn at once; the box is a mask, so shapes stay static.
  """
  if mode not in ("pixel", "rand", "const"):
    raise UserError(f"random erasing mode must be 'pixel', 'rand' or 'const', not {mode!r}")
  image = tf.convert_to_tensor(image)
  if prob <= 0:
    return image
  max_aspect = max_aspect or 1.0 / min_aspect
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float64)
  w = tf.cast(shape[1], tf.float64)
  erase = tf.random.stateless_uniform([], seeds[0], dtype=tf.float64) <= prob
  area = tf.random.stateless_uniform([max_attempts], seeds[1], min_area, max_area,
                                     dtype=tf.float64) * h * w
  aspect = tf.exp(tf.random.stateless_uniform(
      [max_attempts], seeds[2], math.log(min_aspect), math.log(max_aspect), dtype=tf.float64))
  box_h = tf.round(tf.sqrt(area * aspect))
  box_w = tf.round(tf.sqrt(area / aspect))
  fits = (box_w < w) & (box_h < h)
  first = tf.argmax(tf.cast(fits, tf.int32))
  box_h, box_w = box_h[first], box_w[first]
  u = tf.random.stateless_uniform([2], seeds[3], dtype=tf.float64)
  top = tf.floor(u[0] * (h - box_h + 1.0))
  left = tf.floor(u[1] * (w - box_w + 1.0))
  rows = tf.cast(tf.range(shape[0]), tf.float64)[:, None]
  cols = tf.cast(tf.range(shape[1]), tf.float64)[None, :]
  box = ((rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w) &
         erase & tf.reduce_any(fits))
  if mode == "pixel":
    values = tf.random.stateless_normal(shape, seeds[4], dtype=image.dtype)
  elif mode == "rand":
    values = tf.broadcast_to(tf.random.stateless_normal(shape[2:], seeds[4], dtype=image.dtype),
                             shape)
  else:
    values = tf.zeros_like(image)
  return _keep_shape(tf.where(box[..., None], values, image), image)
