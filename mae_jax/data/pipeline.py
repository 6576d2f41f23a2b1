"""tf.data pipelines for pretraining and evaluation, one process's share at a time.

Sources: any tensorflow-datasets image dataset by name (`config.dataset.name`, with
`config.dataset.data_dir`, local or gs://), `'folder'` (a folder of the user's own images), or
`'mae_jax_digits'` (the embedded default, prepared on first use from scikit-learn's bundled digits).

Training stream (`train_batches`): PyTorch-style epochs. Every epoch, each process reads its own
equal share of the split (tfds even splits / every n-th file), shuffles the *encoded* examples with
a seed derived from (seed, epoch, process), drops the last incomplete batch, and only then decodes
and augments. Augmentation is stateless: example i of epoch e gets its own random seed, so the
stream is a pure function of (seed, epoch, position) and resuming at step s skips the first
s * batch encoded examples without decoding them; a resumed run sees exactly the images an
uninterrupted run would have seen.

Bad files: a folder's file headers are checked when it is opened; `verify_images` decodes every
file up front and `skip_bad_images` leaves unreadable ones out. A file that fails to decode in a
running stream is found again (the order is a pure function of the seed) and named in the error.

Augmentation (the official MAE pretraining recipe): RandomResizedCrop with torchvision's sampling
(area fraction uniform in (crop_min_scale, 1), log-uniform aspect ratio in (3/4, 4/3), 10 tries,
centre-crop fallback), bicubic resize to image_size (S x S, or H x W), horizontal flip,
normalization by mean/std. The pretraining stream stops before the normalization and yields uint8
pixels: a quarter of the bytes to batch and copy to the devices, and no float work on the host;
the train step normalizes them (`normalize_on_device`: the same operations, to float32
rounding). The fine-tuning stream (RandAugment, random erasing on normalized pixels) yields
float32. Grayscale and palette images become RGB. TensorFlow is hidden from accelerators: it
never grabs GPU memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import importlib
import math
import os
import re
import time
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import tensorflow as tf

from mae_jax.configlib import image_hw
from mae_jax.data.randaugment import parse_randaugment, randaugment, random_erasing
from mae_jax.errors import UserError, first_line

try:  # The input pipeline runs on the host CPU; leave accelerators to JAX.
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialized (e.g. by the caller); nothing to hide then.
  pass

DIGITS = "mae_jax_digits"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"))
# Local folders up to this many files have every file's header checked when the source is opened.
_MAGIC_CHECK_LIMIT = 200_000
# Eval resize: shorter side to image_size / crop_pct, then a centre crop (224 -> 256 -> 224); for
# (H, W) the smallest aspect-preserving resize covering (H, W) / crop_pct, then (H, W).
EVAL_CROP_PCT = 0.875
# Errors of a running tf.data iterator that mean an unreadable or missing file.
_READ_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
                tf.errors.PermissionDeniedError)
# Unreadable files listed by name in the verify / skip messages.
_LISTED = 5

# (split, process_index, process_count, drop_remainder, shuffle_seed) -> dataset of
# {'image': encoded bytes, 'label': int64}, this process's share of the split.
Reader = Callable[[str, int, int, bool, Optional[int]], tf.data.Dataset]


@dataclasses.dataclass
class Source:
  """A dataset found and ready to read. `num_classes` is 0 for unlabeled folders."""
  name: str
  num_classes: int
  splits: tuple[str, ...]
  count_fn: Callable[[str, int, int, bool], int]
  reader: Reader
  # (split, process_index, process_count, drop_remainder) -> the files `reader` reads, in its
  # order; folder sources only (it names the file of a decode error).
  paths_fn: Optional[Callable[[str, int, int, bool], list[str]]] = None

  def check_split(self, split: str) -> None:
    base = split.split("[")[0]
    if base not in self.splits:
      raise UserError(f"dataset {self.name} has no split {base!r}; it has {list(self.splits)}")

  def num_examples(self, split: str, process_index: int = 0, process_count: int = 1,
                   drop_remainder: bool = True) -> int:
    self.check_split(split)
    return self.count_fn(split, process_index, process_count, drop_remainder)


# ----------------------------------------------------------------------------- sources


def get_source(d) -> Source:
  """The source named by a `config.dataset` block; UserError if it cannot be read."""
  if d.name == "folder":
    return _folder_source(d.folder, d.val_fraction, verify=bool(d.get("verify_images", False)),
                          skip_bad=bool(d.get("skip_bad_images", False)))
  return _tfds_source(d.name, d.data_dir)


@contextlib.contextmanager
def _file_lock(path: str):
  """Holds an exclusive flock on `path` (created if missing); a no-op for remote paths."""
  if "://" in path:
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_digits(builder) -> None:
  """Prepares the embedded digits once: one process of a multi-process run, under a file lock
  beside the dataset so that independent runs on one machine do not race either."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # process_count() without jax.distributed would start JAX's backend here, which must come
  # after jax.distributed.initialize; an uninitialized process is alone anyway.
  multi = jax.distributed.is_initialized() and jax.process_count() > 1
  info = os.path.join(builder.data_dir, "dataset_info.json")
  if (not multi or jax.process_index() == 0) and not tf.io.gfile.exists(info):
    root = os.path.dirname(os.path.dirname(builder.data_dir))  # DATA_DIR/name/version
    with _file_lock(os.path.join(root, f"{DIGITS}.lock")):
      if not tf.io.gfile.exists(info):  # another run may have prepared it while we waited.
        print(f"preparing {DIGITS} in {builder.data_dir} (first use)", flush=True)
        tfds.disable_progress_bar()
        builder.download_and_prepare()
  if multi:  # every process, prepared or not, so none reads before process 0 is done.
    multihost_utils.sync_global_devices(f"{DIGITS} prepared")


def _tfds_source(name: str, data_dir: str) -> Source:
  import tensorflow_datasets as tfds

  if name == DIGITS:
    importlib.import_module("mae_jax.data.digits")  # registers the builder with tfds.
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"unknown dataset {name!r}: not a tensorflow-datasets name, "
                    f"{DIGITS!r} or 'folder'") from None
  except (ValueError, tf.errors.OpError) as e:
    raise UserError(f"cannot open dataset {name!r}: {first_line(e)}") from None
  prepared = tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))
  if name == DIGITS:  # The embedded default prepares itself: no download, a few seconds.
    _prepare_digits(builder)
    if not prepared:  # read what is on disk now, maybe written by another process.
      builder = tfds.builder(name, data_dir=data_dir or None)
  elif not prepared:
    raise UserError(
        f"dataset {name} is not prepared in {builder.data_dir}; prepare it with "
        f"`tfds build {name} --data_dir=DIR` (ImageNet needs --manual_dir with the tar files) "
        f"and pass --config.dataset.data_dir=DIR")
  if "image" not in builder.info.features:
    raise UserError(f"dataset {name} has no 'image' feature; it has "
                    f"{sorted(builder.info.features.keys())}")
  label = builder.info.features["label"] if "label" in builder.info.features else None
  num_classes = int(getattr(label, "num_classes", 0) or 0)

  def shard(split, process_index, process_count, drop_remainder):
    if process_count == 1:
      return split
    return tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]

  def count(split, process_index, process_count, drop_remainder):
    return int(builder.info.splits[shard(split, process_index, process_count,
                                         drop_remainder)].num_examples)

  def reader(split, process_index, process_count, drop_remainder, shuffle_seed):
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
    ds = builder.as_dataset(split=shard(split, process_index, process_count, drop_remainder),
                            shuffle_files=shuffle_seed is not None, read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})
    has_label = "label" in builder.info.features
    return ds.map(lambda ex: {"image": ex["image"],
                              "label": tf.cast(ex["label"], tf.int64) if has_label
                              else tf.constant(-1, tf.int64)})

  return Source(name, num_classes, tuple(builder.info.splits.keys()), count, reader)


def _image_kind(path: str) -> Optional[str]:
  with open(path, "rb") as f:
    head = f.read(8)
  for magic, kind in _MAGIC:
    if head.startswith(magic):
      return kind
  return None


def _list_images(directory: str) -> tuple[list[str], list[str]]:
  """(image files directly in `directory`, sub-directories), both sorted."""
  files, dirs = [], []
  for entry in sorted(tf.io.gfile.listdir(directory)):
    entry = entry.rstrip("/")
    path = os.path.join(directory, entry)
    if tf.io.gfile.isdir(path):
      dirs.append(entry)
    elif entry.lower().endswith(IMAGE_EXTENSIONS) and not entry.startswith("."):
      files.append(path)
  return files, dirs


def _scan(directory: str, classes: Optional[list[str]] = None) -> tuple[list, list, list[str]]:
  """(paths, labels, class names) of a flat folder (labels -1) or one with class sub-folders."""
  files, dirs = _list_images(directory)
  class_dirs = [d for d in dirs if _list_images(os.path.join(directory, d))[0]]
  if files and class_dirs:
    raise UserError(f"{directory} mixes images and class sub-folders ({class_dirs[0]}/); "
                    "use one layout")
  if files:
    return files, [-1] * len(files), []
  classes = classes if classes is not None else class_dirs
  paths, labels = [], []
  for name in class_dirs:
    if name not in classes:
      raise UserError(f"class folder {os.path.join(directory, name)} has no counterpart in the "
                      "training classes")
    sub = _list_images(os.path.join(directory, name))[0]
    paths += sub
    labels += [classes.index(name)] * len(sub)
  return paths, labels, classes


def _check_headers(paths: list[str]) -> None:
  if not paths or "://" in paths[0] or len(paths) > _MAGIC_CHECK_LIMIT:
    return  # remote or huge: decode errors are reported when the stream reaches them.
  for p in paths:
    try:
      kind = _image_kind(p)
    except OSError as e:
      raise UserError(f"cannot read image {p}: {e.strerror}") from None
    if kind is None:
      raise UserError(f"unreadable image {p}: not a JPEG, PNG, GIF or BMP file")


def _reason(e: BaseException) -> str:
  """A TensorFlow error's first line without its function-node prefix and op suffix."""
  text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", first_line(e))
  return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text) or type(e).__name__


def _decode_error(path: str, check: Optional[Callable] = None) -> Optional[str]:
  """Why reading `path` and `check(data)` (default: decoding it) fails, eagerly; None if not."""
  try:
    data = tf.io.read_file(path)
    if check is None:
      _decode(data)
    else:
      check(data)
  except tf.errors.OpError as e:
    return _reason(e)
  return None


def _undecodable(paths: list[str]) -> list[int]:
  """Indices of the files that cannot be read and decoded, in order; decoded in parallel."""
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string)).enumerate()
  # The shape makes each decode run without keeping the pixels; failures are dropped, and the
  # indices that never come back are the bad files.
  ds = ds.map(lambda i, p: (i, tf.shape(_decode(tf.io.read_file(p)))),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors().map(lambda i, _: i).batch(4096)
  ok = np.zeros(len(paths), bool)
  for indices in ds.as_numpy_iterator():
    ok[indices] = True
  return np.flatnonzero(~ok).tolist()


def _listing(folder: str, paths: list[str]) -> str:
  shown = ", ".join(os.path.relpath(p, folder) for p in paths[:_LISTED])
  return shown + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


def _verified(folder: str, splits: list[tuple[list, list]], skip_bad: bool) -> list[tuple]:
  """`splits` ([(paths, labels)]) after decoding every file: unreadable files left out with
  `skip_bad`, else a UserError naming them."""
  paths = [p for split_paths, _ in splits for p in split_paths]
  start = time.perf_counter()
  bad = [paths[i] for i in _undecodable(paths)]
  print(f"checked {len(paths)} images of folder {folder} in {time.perf_counter() - start:.1f}s",
        flush=True)
  if not bad:
    return splits
  if not skip_bad:
    why = _decode_error(bad[0])
    raise UserError(
        f"{len(bad)} of {len(paths)} images in folder {folder} cannot be decoded: "
        f"{_listing(folder, bad)}{f' (first: {why})' if why else ''}; remove them, or set "
        "config.dataset.skip_bad_images=True to skip unreadable files")
  print(f"skipped {len(bad)} unreadable images of {len(paths)} in folder {folder}: "
        f"{_listing(folder, bad)}", flush=True)
  drop = set(bad)
  return [([p for p in ps if p not in drop], [l for p, l in zip(ps, ls) if p not in drop])
          for ps, ls in splits]


def _folder_source(folder: str, val_fraction: float, verify: bool = False,
                   skip_bad: bool = False) -> Source:
  if not folder:
    raise UserError("config.dataset.name='folder' needs config.dataset.folder=PATH")
  if not tf.io.gfile.isdir(folder):
    raise UserError(f"image folder {folder} does not exist or is not a directory")
  _, dirs = _list_images(folder)
  val_dir = next((d for d in ("validation", "val") if d in dirs), None)
  if "train" in dirs and val_dir:
    tr_paths, tr_labels, classes = _scan(os.path.join(folder, "train"))
    va_paths, va_labels, _ = _scan(os.path.join(folder, val_dir), classes or None)
    if not classes:
      va_labels = [-1] * len(va_paths)
  else:
    paths, labels, classes = _scan(folder)
    k = round(1 / val_fraction) if val_fraction > 0 else 0
    held = [k > 0 and i % k == 0 for i in range(len(paths))]
    tr_paths = [p for p, h in zip(paths, held) if not h]
    tr_labels = [l for l, h in zip(labels, held) if not h]
    va_paths = [p for p, h in zip(paths, held) if h]
    va_labels = [l for l, h in zip(labels, held) if h]
  if not tr_paths:
    raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
  if verify or skip_bad:
    (tr_paths, tr_labels), (va_paths, va_labels) = _verified(
        folder, [(tr_paths, tr_labels), (va_paths, va_labels)], skip_bad)
    if not tr_paths:
      raise UserError(f"none of the training images in folder {folder} can be decoded")
  else:
    _check_headers(tr_paths + va_paths)
  table = {"train": (tr_paths, tr_labels)}
  if va_paths:
    table["validation"] = (va_paths, va_labels)

  def share(split, process_index, process_count, drop_remainder):
    split = "validation" if split == "val" else split
    paths, labels = table[split]
    paths, labels = paths[process_index::process_count], labels[process_index::process_count]
    if drop_remainder:
      n = len(table[split][0]) // process_count
      paths, labels = paths[:n], labels[:n]
    return paths, labels

  def count(split, process_index, process_count, drop_remainder):
    return len(share(split, process_index, process_count, drop_remainder)[0])

  def reader(split, process_index, process_count, drop_remainder, shuffle_seed):
    del shuffle_seed  # The file list is shuffled whole by the caller.
    paths, labels = share(split, process_index, process_count, drop_remainder)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int64)))
    return ds.map(lambda p, l: {"image": tf.io.read_file(p), "label": l},
                  num_parallel_calls=tf.data.AUTOTUNE)

  def paths_fn(split, process_index, process_count, drop_remainder):
    return share(split, process_index, process_count, drop_remainder)[0]

  splits = tuple(table) + (("val",) if "validation" in table else ())  # 'val' aliases validation.
  return Source(f"folder {folder}", len(classes), splits, count, reader, paths_fn)


# ----------------------------------------------------------------------------- transforms


def _decode(data: tf.Tensor, window: Optional[Callable] = None) -> tf.Tensor:
  """Decodes to uint8 RGB [h, w, 3]; `window(shape) -> (top, left, h, w)` crops (fused for JPEG)."""

  def jpeg():
    if window is None:
      return tf.io.decode_jpeg(data, channels=3)
    shape = tf.io.extract_jpeg_shape(data)
    return tf.io.decode_and_crop_jpeg(data, tf.stack(window(shape)), channels=3)

  def other():
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    if window is None:
      return image
    top, left, h, w = window(tf.shape(image))
    return image[top:top + h, left:left + w]

  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def random_resized_crop_window(shape: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float],
                               ratio: tuple[float, float] = (3 / 4, 4 / 3),
                               attempts: int = 10) -> tuple[tf.Tensor, ...]:
  """torchvision's RandomResizedCrop.get_params as stateless TF ops: (top, left, height, width).

  All `attempts` proposals are drawn at once; the first that fits is used, else the centre crop
  with the aspect ratio clamped into `ratio`.
  """
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  area = h * w * tf.random.stateless_uniform([attempts], seeds[0], scale[0], scale[1])
  log_r = tf.random.stateless_uniform([attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1]))
  r = tf.exp(log_r)
  cw = tf.round(tf.sqrt(area * r))
  ch = tf.round(tf.sqrt(area / r))
  fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first proposal that fits.
  # Fallback: the whole image, or its centre with the aspect ratio clamped into `ratio`.
  in_ratio = w / h
  fb_w = tf.where(in_ratio < ratio[0], w, tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  any_fit = tf.reduce_any(fits)
  crop_w = tf.where(any_fit, cw[first], fb_w)
  crop_h = tf.where(any_fit, ch[first], fb_h)
  u = tf.random.stateless_uniform([2], seeds[2], 0.0, 1.0)
  top = tf.where(any_fit, tf.floor(u[0] * (h - crop_h + 1)), tf.round((h - crop_h) / 2))
  left = tf.where(any_fit, tf.floor(u[1] * (w - crop_w + 1)), tf.round((w - crop_w) / 2))
  return tuple(tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w))


def _normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def normalize_on_device(images, mean, std):
  """uint8 pixels [..., 3] -> float32 normalized by mean / std (jax.numpy, inside the train
  step): the operations of the host's `_normalize` (and torchvision's ToTensor + Normalize).
  XLA:CPU divides through a reciprocal, so a value can differ from the host's in its last bit."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = images.astype(jnp.float32) / jnp.float32(255.0)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _resize(image: tf.Tensor, size) -> tf.Tensor:
  image = tf.image.resize(image, size, method="bicubic", antialias=False)
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def _train_transform(d, image_size, base_seed: int, epoch: int):
  """RandomResizedCrop to image_size (an int S or (H, W): torchvision's crop window does not
  depend on the output size, only the final resize does) + flip (pretraining); with
  dataset.randaugment / dataset.reprob (the fine-tuning recipe) also RandAugment after the flip
  and random erasing after normalization, in timm's `create_transform` order."""
  out_hw = list(image_hw(image_size))
  spec = parse_randaugment(d.randaugment) if d.get("randaugment") else None
  reprob = float(d.get("reprob", 0.0))

  def fn(index, ex):
    seed = tf.stack([tf.constant(base_seed, tf.int64),
                     tf.constant(epoch, tf.int64) * (1 << 32) + index])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = _decode(ex["image"], lambda shape: random_resized_crop_window(
        shape, crop_seed, (d.crop_min_scale, 1.0)))
    image = tf.cast(_resize(image, out_hw), tf.uint8)  # rounded and clipped: exact.
    if d.hflip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if spec is None and reprob == 0:  # pretraining: uint8, normalized in the train step.
      return {"image": image, "label": tf.cast(ex["label"], tf.int32)}
    # Seeds of the fine-tuning augmentations come from their own branch, so the crop and flip
    # are the same with or without them.
    ra_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, 1), 2))
    if spec is not None:
      image = randaugment(image, ra_seed, spec)
    image = _normalize(image, d.mean, d.std)
    if reprob > 0:
      image = random_erasing(image, erase_seed, reprob)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}
  return fn


def eval_transform(data: tf.Tensor, image_size, mean, std) -> tf.Tensor:
  """Resize (bicubic), centre crop to image_size, normalize.

  An int S: the shorter side to int(S / 0.875), then the S x S centre (torchvision
  Resize(int) + CenterCrop, the official MAE eval). (H, W): the smallest aspect-preserving
  resize that covers (int(H / 0.875), int(W / 0.875)), then the H x W centre (timm's
  `transforms_imagenet_eval` for a non-square size: ResizeKeepRatio + CenterCrop). For H == W
  the two are the same computation.
  """
  out_h, out_w = image_hw(image_size)
  image = _decode(data)
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  target_h, target_w = float(int(out_h / EVAL_CROP_PCT)), float(int(out_w / EVAL_CROP_PCT))
  if target_h == target_w:
    scale = target_h / tf.minimum(h, w)
  else:
    scale = tf.maximum(target_h / h, target_w / w)
  new_h = tf.cast(tf.maximum(tf.floor(h * scale), out_h), tf.int32)
  new_w = tf.cast(tf.maximum(tf.floor(w * scale), out_w), tf.int32)
  image = _resize(image, tf.stack([new_h, new_w]))
  top = tf.cast(tf.round(tf.cast(new_h - out_h, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - out_w, tf.float32) / 2), tf.int32)
  image = image[top:top + out_h, left:left + out_w]
  image.set_shape([out_h, out_w, 3])
  return _normalize(image, mean, std)


# ----------------------------------------------------------------------------- streams


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise UserError(f"global batch {global_batch_size} is not divisible by the "
                    f"{process_count} processes")
  return global_batch_size // process_count


def steps_per_epoch(source: Source, split: str, global_batch_size: int,
                    process_count: int = 1) -> int:
  """Optimizer steps in one pass over the split (last incomplete batch dropped)."""
  local = _local_batch(global_batch_size, process_count)
  n = source.num_examples(split, 0, process_count, drop_remainder=True)
  if n < local:
    raise UserError(f"dataset {source.name} split {split} has {n} examples per process, fewer "
                    f"than one batch of {local}; lower config.batch_size")
  return n // local


def _seed(*parts: int) -> int:
  x = 0
  for p in parts:
    x = (x * 1_000_003 + int(p)) % (2**31 - 1)
  return x


def _first_failure(candidates: Iterable[tuple[int, str]],
                   check: Callable[[int, tf.Tensor], object]) -> Optional[tuple[str, str]]:
  """(path, reason) of the first (position, path) whose file fails `check(position, data)`."""
  for position, path in candidates:
    reason = _decode_error(path, functools.partial(check, position))
    if reason is not None:
      return path, reason
  return None


def _iterate(ds: tf.data.Dataset, source: Source, split: str,
             locate: Optional[Callable[[int], Optional[tuple[str, str]]]] = None
             ) -> Iterator[dict]:
  """`ds` as numpy; a read error becomes a UserError naming the file `locate(batches yielded)`
  finds, when it finds one."""
  done = 0
  try:
    for batch in ds.as_numpy_iterator():
      yield batch
      done += 1
  except GeneratorExit:  # closed by the consumer (or at interpreter exit): nothing to report.
    return
  except _READ_ERRORS as e:
    # Batches come out in order and an error stops the one being built, so the culprit is in
    # batch `done`; decoding its files again one by one finds it.
    found = locate(done) if locate is not None else None
    if found is None:
      raise UserError(f"cannot read an image of {source.name} split {split}: "
                      f"{_reason(e)}") from None
    path, reason = found
    raise UserError(f"cannot read an image of {source.name} split {split}: {path} ({reason}); "
                    "remove the file, or set config.dataset.skip_bad_images=True to skip "
                    "unreadable files") from None


def _epoch_order(ds: tf.data.Dataset, d, n: int, epoch_seed: int,
                 size: int) -> tf.data.Dataset:
  """(position, element) of one training epoch: `ds` shuffled, its first `size` elements. The
  order depends only on the seed and `n`, so the file list replays it."""
  ds = ds.shuffle(min(d.shuffle_buffer, n), seed=epoch_seed, reshuffle_each_iteration=False)
  return ds.enumerate().take(size)


def _locate_train(source: Source, d, split: str, process_index: int, process_count: int,
                  n: int, epoch_seed: int, size: int, start: int, local: int, transform,
                  done: int) -> Optional[tuple[str, str]]:
  """The bad file in batch `done` of a training stream that began at position `start`."""
  if source.paths_fn is None:
    return None
  paths = source.paths_fn(split, process_index, process_count, True)
  order = _epoch_order(tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string)), d, n,
                       epoch_seed, size)
  window = order.skip(start + done * local).take(local)
  label = tf.constant(-1, tf.int64)
  return _first_failure(
      ((int(i), p.decode()) for i, p in window.as_numpy_iterator()),
      lambda i, data: transform(tf.constant(i, tf.int64), {"image": data, "label": label}))


def train_batches(source: Source, d, *, split: str, image_size, global_batch_size: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Endless {'image': [b, H, W, 3], 'label': int32 [b]} for this process, from step
  `start_step` on (b = global_batch_size / process_count; image_size an int S = (S, S) or
  (H, W)). Images are uint8 pixels for pretraining (the train step normalizes them with
  `normalize_on_device`), float32 normalized with dataset.randaugment or dataset.reprob."""
  local = _local_batch(global_batch_size, process_count)
  spe = steps_per_epoch(source, split, global_batch_size, process_count)
  n = source.num_examples(split, process_index, process_count, drop_remainder=True)
  epoch, offset = divmod(start_step, spe)
  while True:
    epoch_seed = _seed(seed, epoch, process_index)
    ds = source.reader(split, process_index, process_count, True, epoch_seed)
    ds = _epoch_order(ds, d, n, epoch_seed, spe * local).skip(offset * local)  # before decoding.
    transform = _train_transform(d, image_size, _seed(seed, process_index, 7), epoch)
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(2)
    locate = functools.partial(_locate_train, source, d, split, process_index, process_count, n,
                               epoch_seed, spe * local, offset * local, local, transform)
    yield from _iterate(ds, source, split, locate)
    epoch, offset = epoch + 1, 0


def eval_steps(source: Source, split: str, global_batch_size: int, process_count: int = 1) -> int:
  """Batches in one evaluation pass; the same on every process (short shares are padded)."""
  local = _local_batch(global_batch_size, process_count)
  most = max(source.num_examples(split, i, process_count, drop_remainder=False)
             for i in range(process_count))
  return max(1, -(-most // local))


def eval_batches(source: Source, d, *, split: str, image_size, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """One pass over every example of the split, in order: {'image', 'label', 'mask'}; padding
  rows (to fill the last batch and even out processes) have mask 0."""
  local = _local_batch(global_batch_size, process_count)
  steps = eval_steps(source, split, global_batch_size, process_count)
  n = source.num_examples(split, process_index, process_count, drop_remainder=False)
  ds = source.reader(split, process_index, process_count, False, None)
  ds = ds.map(lambda ex: {"image": eval_transform(ex["image"], image_size, d.mean, d.std),
                          "label": tf.cast(ex["label"], tf.int32),
                          "mask": tf.constant(1, tf.int32)},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  pad = tf.data.Dataset.from_tensors({
      "image": tf.zeros([*image_hw(image_size), 3], tf.float32),
      "label": tf.constant(0, tf.int32), "mask": tf.constant(0, tf.int32)}).repeat(
          steps * local - n)
  ds = ds.concatenate(pad).batch(local, drop_remainder=True).prefetch(2)

  def locate(done):
    if source.paths_fn is None:
      return None
    paths = source.paths_fn(split, process_index, process_count, False)
    window = enumerate(paths[done * local:(done + 1) * local], done * local)
    return _first_failure(window, lambda _, data: eval_transform(data, image_size, d.mean, d.std))

  yield from _iterate(ds, source, split, locate)
