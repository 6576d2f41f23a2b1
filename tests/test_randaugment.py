"""RandAugment / RandomErasing (mae_jax.data.randaugment) against PIL and timm's rules.

Tolerances against PIL (measured with Pillow 13 on x86-64: every pixel op is bit-exact; bilinear
geometric ops differ by at most 1 level on at most 6% of the pixels):
  * integer ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, and Sharpness's
    SMOOTH filter): exact; the arithmetic is integer, or float64 in PIL's order.
  * blend ops (Color, Contrast, Brightness, Sharpness): PIL computes d + factor * (i - d) in
    float32 and truncates; so do we, so they are exact here, but a PIL build that contracts this
    into a fused multiply-add (e.g. clang on arm64) can land on the other side of an integer tie,
    hence 1 level on at most 1% of the pixels is allowed (rounding instead of truncating would
    break ~50%).
  * geometric ops: 1 level on at most 8% of the pixels. PIL truncates a float64 interpolation;
    ImageProjectiveTransformV3 interpolates in float32 with another formula, so values that are
    integers in exact arithmetic (common: translations of k/10 pixels) truncate either way. Where
    the fill goes is PIL's own in-bounds test, computed in float64.
"""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from mae_jax.data import randaugment as ra
from mae_jax.errors import UserError

FILL = ra.IMAGENET_FILL
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
BLEND = ("Color", "Contrast", "Brightness", "Sharpness")


def _images() -> list[np.ndarray]:
  """Small real-ish uint8 RGB images: gradient + noise, a low-contrast copy, an upscaled colored
  sklearn digit (non-square, 24 x 32) and odd-sized noise."""
  from sklearn.datasets import load_digits

  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:32, 0:32]
  grad = np.stack([xx * 8, yy * 8, (xx + yy) * 4], -1) + rng.normal(0, 20, (32, 32, 3))
  digit = np.kron(load_digits().images[3], np.ones((3, 4)))
  digit = np.stack([digit * 16, 255 - digit * 12, digit * 8 + 40], -1)
  digit = digit + rng.normal(0, 5, digit.shape)
  images = [grad, 60 + grad * 0.4, digit, rng.integers(0, 256, (17, 23, 3))]
  return [np.clip(im, 0, 255).astype(np.uint8) for im in images]


IMAGES = _images()


def _diff(ours, ref) -> np.ndarray:
  ours = np.asarray(ours)
  assert ours.dtype == np.uint8 and ours.shape == np.asarray(ref).shape
  return np.abs(ours.astype(int) - np.asarray(ref).astype(int))


def _assert_close(ours, ref, kind: str, what: str) -> None:
  d = _diff(ours, ref)
  if kind == "exact":
    assert d.max() == 0, f"{what}: {np.mean(d > 0):.2%} of pixels differ, max {d.max()}"
  else:
    share = {"blend": 0.01, "geometric": 0.08}[kind]
    assert d.max() <= 1 and np.mean(d > 0) <= share, (
        f"{what}: max diff {d.max()}, {np.mean(d > 0):.2%} of pixels differ")


# ----------------------------------------------------------------------------- PIL / timm reference


def _timm_arg(name: str, m: float, negate: bool):
  """timm auto_augment.py level -> argument rules (m on the 0..10 scale)."""
  f, sign = m / 10.0, (-1.0 if negate else 1.0)
  base = name.replace("Increasing", "")
  if name == "Rotate":
    return sign * f * 30.0
  if name in ("ShearX", "ShearY"):
    return sign * f * 0.3
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * f * 0.45
  if name == "Posterize":
    return int(f * 4)
  if name == "PosterizeIncreasing":
    return 4 - int(f * 4)
  if name == "Solarize":
    return min(256, int(f * 256))
  if name == "SolarizeIncreasing":
    return 256 - min(256, int(f * 256))
  if name == "SolarizeAdd":
    return min(128, int(f * 110))
  if base in BLEND and name.endswith("Increasing"):
    return max(0.1, 1.0 + sign * f * 0.9)
  if base in BLEND:
    return f * 1.8 + 0.1
  return None


def _pil_op(name: str, image: np.ndarray, arg) -> np.ndarray:
  """What timm's op `name` does with PIL, geometric ops with resample=BILINEAR."""
  img = Image.fromarray(image)
  base = name.replace("Increasing", "")
  affine = lambda coeffs: img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                        fillcolor=FILL)
  if base == "Posterize" and arg == 0:  # Pillow 13 refuses 0 bits; older: mask 0, black.
    out = Image.new("RGB", img.size)
  else:
    out = {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Equalize": lambda: ImageOps.equalize(img),
        "Invert": lambda: ImageOps.invert(img),
        "Posterize": lambda: img if arg >= 8 else ImageOps.posterize(img, arg),
        "Solarize": lambda: ImageOps.solarize(img, arg),
        "SolarizeAdd": lambda: img.point([min(255, i + arg) if i < 128 else i
                                          for i in range(256)] * 3),
        "Color": lambda: ImageEnhance.Color(img).enhance(arg),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(arg),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(arg),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(arg),
        "Rotate": lambda: img.rotate(arg, resample=Image.BILINEAR, fillcolor=FILL),
        "ShearX": lambda: affine((1, arg, 0, 0, 1, 0)),
        "ShearY": lambda: affine((1, 0, 0, arg, 1, 0)),
        "TranslateXRel": lambda: affine((1, 0, arg * img.size[0], 0, 1, 0)),
        "TranslateYRel": lambda: affine((1, 0, 0, 0, 1, arg * img.size[1])),
    }[base]()
  return np.asarray(out)


def _kind(name: str) -> str:
  base = name.replace("Increasing", "")
  return "geometric" if base in GEOMETRIC else "blend" if base in BLEND else "exact"


# ----------------------------------------------------------------------------- spec parsing


@pytest.mark.parametrize("text, expected", [
    ("rand-m9-mstd0.5-inc1", ra.RandAugmentSpec(9, 2, 0.5, 10, True, 0.5)),
    ("rand", ra.RandAugmentSpec(10, 2, 0.0, 10, False, 0.5)),
    ("rand-n3-m7-mmax15-p0.3-inc0", ra.RandAugmentSpec(7, 3, 0.0, 15, False, 0.3)),
    ("rand-m9-mstd101", ra.RandAugmentSpec(9, 2, math.inf, 10, False, 0.5)),
])
def test_parse_randaugment(text, expected):
  spec = ra.parse_randaugment(text)
  assert spec == expected
  assert spec.op_names == (ra.RAND_INCREASING_TRANSFORMS if expected.increasing
                           else ra.RAND_TRANSFORMS)
  assert len(spec.op_names) == 15 and spec.op_names[4] in ("Posterize", "PosterizeIncreasing")


@pytest.mark.parametrize("text", [
    "", "rnd-m9", "m9-n2", "rand-m", "rand-x9", "rand-m9.5", "rand-m9-", "rand--m9", "rand-p1.5",
    "rand-inc2", "rand-mmax0", "rand-w0", "rand-mstd-1", "rand-n2x", "rand-M9"])
def test_parse_randaugment_rejects_malformed(text):
  with pytest.raises(UserError) as info:
    ra.parse_randaugment(text)
  message = str(info.value)
  assert "\n" not in message and repr(text) in message and "rand-m9-mstd0.5-inc1" in message


# ----------------------------------------------------------------------------- ops vs PIL


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_pixel_ops_match_pil(index):
  image = IMAGES[index]
  cases = [("AutoContrast", ra.auto_contrast, None), ("Equalize", ra.equalize, None),
           ("Invert", ra.invert, None)]
  cases += [("Posterize", ra.posterize, bits) for bits in range(9)]
  cases += [("Solarize", ra.solarize, t) for t in (0, 1, 26, 128, 200, 256)]
  cases += [("SolarizeAdd", ra.solarize_add, add) for add in (0, 11, 55, 110, 128)]
  factors = [0.0, 0.1, 0.5, 1.0, 1.9] + list(np.random.default_rng(index).uniform(0.1, 1.9, 4))
  for name, op in (("Color", ra.color), ("Contrast", ra.contrast),
                   ("Brightness", ra.brightness), ("Sharpness", ra.sharpness)):
    cases += [(name, op, f) for f in factors]
  for name, op, arg in cases:
    ours = op(image) if arg is None else op(image, arg)
    _assert_close(ours, _pil_op(name, image, arg), _kind(name), f"{name}({arg})")


@pytest.mark.parametrize("index", [0, 2, 3])
def test_geometric_ops_match_pil_bilinear(index):
  image = IMAGES[index]
  cases = [("Rotate", ra.rotate, a) for a in (0.0, 3.0, -17.0, 30.0, -30.0)]
  cases += [(n, op, s) for n, op in (("ShearX", ra.shear_x), ("ShearY", ra.shear_y))
            for s in (0.3, -0.3, 0.11)]
  cases += [(n, op, p) for n, op in (("TranslateXRel", ra.translate_x_rel),
                                     ("TranslateYRel", ra.translate_y_rel))
            for p in (0.45, -0.45, 0.123)]
  for name, op, arg in cases:
    _assert_close(op(image, arg, FILL), _pil_op(name, image, arg), "geometric", f"{name}({arg})")
  # The fill lands where PIL puts it: a shift by a whole quarter is exact, fill included.
  ours = ra.translate_x_rel(image, 0.25, (1, 2, 3)).numpy()
  ref = np.asarray(Image.fromarray(image).transform(
      image.shape[1::-1], Image.AFFINE, (1, 0, image.shape[1] / 4, 0, 1, 0),
      resample=Image.BILINEAR, fillcolor=(1, 2, 3)))
  np.testing.assert_array_equal(ours, ref)
  assert (ours[:, -image.shape[1] // 4:] == [1, 2, 3]).all()


@pytest.mark.parametrize("names", [ra.RAND_TRANSFORMS, ra.RAND_INCREASING_TRANSFORMS[4:11]],
                         ids=["plain", "increasing"])
def test_apply_op_follows_timm_levels(names):
  image = IMAGES[2]
  for name in names:
    for m in (0.0, 4.3, 10.0):
      for negate in (False, True) if name in GEOMETRIC or "Increasing" in name else (False,):
        expected = _timm_arg(name, m, negate)
        arg = ra.level_to_arg(name, tf.constant(m, tf.float64), negate)
        if expected is None:
          assert arg is None
        else:
          assert np.isclose(arg.numpy(), expected, rtol=0, atol=1e-12), (name, m, negate)
        ours = ra.apply_op(name, tf.constant(image), m, negate, FILL)
        _assert_close(ours, _pil_op(name, image, expected), _kind(name), f"{name} m={m}")


def test_float_ops_inside_tf_data_match_eager_and_pil():
  """Graph mode (tf.data map, Grappler on) gives the eager results bit for bit for the ops with
  float arithmetic (the integer ones cannot change)."""
  image = IMAGES[0]
  names = ("AutoContrast", "Color", "ContrastIncreasing", "Brightness", "SharpnessIncreasing",
           "Rotate", "TranslateYRel")
  ds = tf.data.Dataset.from_tensors(image).map(
      lambda x: tuple(ra.apply_op(n, x, 7.3, True, FILL) for n in names))
  for name, graph in zip(names, next(ds.as_numpy_iterator())):
    eager = ra.apply_op(name, image, 7.3, True, FILL).numpy()
    np.testing.assert_array_equal(graph, eager, err_msg=name)
    _assert_close(graph, _pil_op(name, image, _timm_arg(name, 7.3, True)), _kind(name), name)


# ----------------------------------------------------------------------------- RandAugment


def _seeds(n: int, key: int = 0) -> tf.Tensor:
  return tf.random.experimental.stateless_split(tf.constant([key, 12345], tf.int64), n)


def test_randaugment_deterministic_and_seed_dependent():
  image = IMAGES[0]
  spec = ra.parse_randaugment("rand-m9-mstd0.5-inc1")
  seeds = _seeds(8)
  outs = [ra.randaugment(tf.constant(image), s, spec).numpy() for s in seeds]
  for s, out in zip(seeds[:3], outs):
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(ra.randaugment(image, s, "rand-m9-mstd0.5-inc1").numpy(), out)
  distinct = {out.tobytes() for out in outs}
  assert len(distinct) >= 6
  assert any(not np.array_equal(out, image) for out in outs)
  # No op applied -> the image itself.
  for text in ("rand-p0", "rand-n0"):
    np.testing.assert_array_equal(ra.randaugment(image, seeds[0], text).numpy(), image)


def test_randaugment_in_tf_data_graph_mode():
  image = IMAGES[2]
  spec = ra.parse_randaugment("rand-m9-mstd0.5-inc1")
  seeds = _seeds(6, key=3)
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: ra.randaugment(tf.constant(image), s, spec), num_parallel_calls=2,
      deterministic=True)
  assert ds.element_spec == tf.TensorSpec(image.shape, tf.uint8)
  for s, graph in zip(seeds, ds.as_numpy_iterator()):
    np.testing.assert_array_equal(graph, ra.randaugment(image, s, spec).numpy())


def test_randaugment_plan_follows_timm_sampling():
  """Ops uniform with replacement, applied with probability p, magnitude gauss(m, mstd) clipped to
  [0, mmax] (uniform(0, m) for mstd > 100), sign negative half of the time."""
  def plans(text, n=4000):  # one call with n layers: n independent draws of each kind.
    spec = dataclasses.replace(ra.parse_randaugment(text), num_layers=n)
    return {k: v.numpy() for k, v in ra.randaugment_plan(tf.constant([7, 8], tf.int64),
                                                          spec).items()}

  p = plans("rand-m9-mstd0.5-inc1")
  counts = np.bincount(p["op"], minlength=15)
  assert counts.size == 15 and counts.min() > 0.045 * 4000 and counts.max() < 0.09 * 4000
  assert abs(p["applied"].mean() - 0.5) < 0.03 and abs(p["negate"].mean() - 0.5) < 0.03
  m = p["magnitude"]
  assert m.min() >= 0 and m.max() == 10.0 and abs(m.mean() - 9.0) < 0.04
  assert 0.44 < m.std() < 0.52  # N(9, 0.5) clipped at 10.
  p = plans("rand-m8-mstd101-p0.2-mmax20")
  assert abs(p["magnitude"].mean() - 4.0) < 0.15 and p["magnitude"].max() <= 8.0
  assert abs(p["applied"].mean() - 0.2) < 0.03
  p = plans("rand-m14-mmax12", n=10)
  assert (p["magnitude"] == 12.0).all()


@pytest.mark.parametrize("text", ["rand-m9-mstd0.5-inc1-p0.8", "rand-m7-mstd1-n3"])
def test_randaugment_applies_its_plan_like_timm(text):
  """randaugment == timm's chain of PIL ops for the plan's draws (op, applied, magnitude, sign);
  a wrong op would change most pixels, interpolation ties change a few by 1 level."""
  spec = ra.parse_randaugment(text)
  image = IMAGES[0]
  for seed in _seeds(16, key=11):
    plan = {k: v.numpy() for k, v in ra.randaugment_plan(seed, spec).items()}
    ref = image
    for op, applied, m, negate in zip(plan["op"], plan["applied"], plan["magnitude"],
                                      plan["negate"]):
      if applied:
        name = spec.op_names[op]
        ref = _pil_op(name, ref, _timm_arg(name, float(m), bool(negate)))
    d = _diff(ra.randaugment(image, seed, spec), ref)
    assert d.mean() < 0.5 and np.mean(d > 1) < 0.02, (plan, d.max(), np.mean(d > 0))


# ----------------------------------------------------------------------------- RandomErasing


def _erased_box(out: np.ndarray, before: np.ndarray):
  """(top, left, h, w) of the changed pixels, checking they form one filled rectangle."""
  changed = np.any(out != before, axis=-1)
  if not changed.any():
    return None
  rows, cols = np.nonzero(changed.any(1))[0], np.nonzero(changed.any(0))[0]
  top, left, h, w = rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
  assert changed[top:top + h, left:left + w].all() and changed.sum() == h * w
  return top, left, h, w


def test_random_erasing_prob0_is_identity():
  image = tf.random.stateless_normal([16, 20, 3], [1, 2])
  for s in _seeds(4):
    np.testing.assert_array_equal(ra.random_erasing(image, s, 0.0).numpy(), image.numpy())


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_random_erasing_one_box(mode):
  shape = (40, 56, 3)
  image = np.full(shape, 5.0, np.float32)  # no N(0, 1) draw or zero equals 5.
  boxes = set()
  for s in _seeds(8, key=5):
    out = ra.random_erasing(tf.constant(image), s, 1.0, mode=mode).numpy()
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_array_equal(ra.random_erasing(image, s, 1.0, mode=mode).numpy(), out)
    top, left, h, w = _erased_box(out, image)
    boxes.add((top, left, h, w))
    # area = U(0.02, 1/3) * H * W before h and w are rounded (each by at most 0.5).
    slack = 0.5 * (h + w + 1) + 0.25
    area = shape[0] * shape[1]
    assert 0.02 * area - slack <= h * w <= area / 3 + slack
    box = out[top:top + h, left:left + w]
    if mode == "const":
      assert (box == 0).all()
    elif mode == "rand":
      assert (box == box[:1, :1]).all() and len(np.unique(box)) == 3
    else:
      assert len(np.unique(box)) > 0.99 * box.size  # float32 N(0, 1) draws rarely collide.
  assert len(boxes) >= 7


def test_random_erasing_statistics_in_tf_data():
  """prob 0.5 erases about half the images; boxes keep aspect ratios within (0.3, 1/0.3) up to
  rounding; pixel values are N(0, 1)."""
  shape = (48, 48, 3)
  image = tf.fill(shape, 5.0)
  ds = tf.data.Dataset.from_tensor_slices(_seeds(400, key=9)).map(
      lambda s: ra.random_erasing(image, s, 0.5))
  boxes, values = [], []
  for out in ds.as_numpy_iterator():
    box = _erased_box(out, image.numpy())
    if box is not None:
      boxes.append(box)
      values.append(out[box[0]:box[0] + box[2], box[1]:box[1] + box[3]].ravel())
  assert 0.43 < len(boxes) / 400 < 0.57
  h, w = np.array([box[2:] for box in boxes], float).T
  # Before rounding (by at most 0.5 each) the aspect ratio was in [0.3, 1 / 0.3].
  assert ((h + 0.5) / (w - 0.5) >= 0.3).all() and ((h - 0.5) / (w + 0.5) <= 1 / 0.3).all()
  ratios = h / w
  assert ratios.min() < 0.5 and ratios.max() > 2.0
  values = np.concatenate(values)
  assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02
