"""The training input alone, timed: ours against the official MAE input (torchvision).

  python -m mae_jax.bench --input=photos            # generated photos (below), ours + torchvision
  python -m mae_jax.bench --input=folder:DIR        # your folder of images (class sub-folders)
  python -m mae_jax.bench --input=tfds:NAME --config.dataset.data_dir=DIR   # a prepared tfds set
  python -m mae_jax.bench --input=photos_tfds       # the generated photos as a tfds dataset

Ours is `mae_jax.data.train_batches` (read -> JPEG decode of the crop window only -> bicubic
resize -> flip -> batch of uint8 pixels, which the train step normalizes on the device) followed
by the copy to the device. The peer is the input of
facebookresearch/mae `main_pretrain.py`: torchvision `ImageFolder` with
`RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=BICUBIC)`, `RandomHorizontalFlip`,
`ToTensor`, `Normalize`, and a `DataLoader` with `num_workers` = the host's cores, on the same
files in the same run.

The generated photos: scikit-learn ships two real photographs (`load_sample_images`: china.jpg
and flower.jpg, 427 x 640 px). Each generated image is a random crop of one of them (10-100% of
its area), resized to 500 x 375 or 375 x 500 px and saved as a JPEG at quality 95, about the
size of an ImageNet training image; the same seed gives the same files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np

from mae_jax.errors import UserError

PHOTO_SIZE = (500, 375)
PHOTO_QUALITY = 95
PHOTOS_TFDS = "mae_jax_photos"


def host_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def make_photos(folder: str, count: int, seed: int = 0) -> str:
  """Writes `count` photos into folder/train/{china,flower}/ (once; reused when the same
  parameters made them); returns folder/train."""
  from PIL import Image
  from sklearn.datasets import load_sample_images

  train = os.path.join(folder, "train")
  recipe = {"count": count, "seed": seed, "size": list(PHOTO_SIZE), "quality": PHOTO_QUALITY}
  marker = os.path.join(folder, "photos.json")
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == recipe:
        return train
  sample = load_sample_images()
  names = [os.path.splitext(os.path.basename(f))[0] for f in sample.filenames]
  rng = np.random.default_rng(seed)
  for name in names:
    os.makedirs(os.path.join(train, name), exist_ok=True)
  for i in range(count):
    k = i % len(names)
    photo = sample.images[k]
    h, w = photo.shape[:2]
    area = rng.uniform(0.1, 1.0) * h * w
    portrait = bool(rng.integers(2))
    ratio = (PHOTO_SIZE[1] / PHOTO_SIZE[0]) if portrait else (PHOTO_SIZE[0] / PHOTO_SIZE[1])
    cw = int(min(w, round(np.sqrt(area * ratio))))
    ch = int(min(h, round(cw / ratio)))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    size = PHOTO_SIZE[::-1] if portrait else PHOTO_SIZE
    image = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(size, Image.BICUBIC)
    path = os.path.join(train, names[k], f"{i:06d}.jpg")
    image.save(path + ".tmp", format="JPEG", quality=PHOTO_QUALITY)
    os.replace(path + ".tmp", path)
  with open(marker + ".tmp", "w") as f:
    json.dump(recipe, f)
  os.replace(marker + ".tmp", marker)
  return train


def photos_tfds(folder: str, data_dir: str) -> None:
  """Prepares folder's photos as the tfds dataset `mae_jax_photos` in data_dir (encoded JPEG
  bytes in TFRecords, as imagenet2012 stores them); once per data_dir."""
  import tensorflow_datasets as tfds
  from etils import epath
  from tensorflow_datasets.core import utils as tfds_utils

  train = os.path.join(folder, "train")
  classes = sorted(os.listdir(train))

  class MaeJaxPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
      # As mae_jax.data.digits: tfds would ask importlib_resources, which it no longer installs.
      return epath.Path(__file__)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names=classes)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for label, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(train, name))):
          yield f"{name}/{f}", {"image": os.path.join(train, name, f), "label": label}

  MaeJaxPhotos.name = PHOTOS_TFDS
  MaeJaxPhotos(data_dir=data_dir).download_and_prepare()


def time_ours(d, image_size: int, batch: int, steps: int, warmup: int) -> dict:
  """img/s of mae_jax's training input, on the first local device."""
  import jax

  from mae_jax import data

  source = data.get_source(d)
  batches = data.train_batches(source, d, split="train", image_size=image_size,
                               global_batch_size=batch, seed=0)
  device = jax.local_devices()[0]

  def one():
    x = jax.device_put(next(batches)["image"], device)
    x.block_until_ready()

  for _ in range(warmup):
    one()
  start = time.perf_counter()
  for _ in range(steps):
    one()
  seconds = time.perf_counter() - start
  return {"img_per_s": steps * batch / seconds, "seconds": seconds}


def time_torchvision(folder: str, image_size: int, batch: int, steps: int, warmup: int,
                     workers: int, mean, std) -> dict:
  """img/s of the official MAE input on `folder` (class sub-folders)."""
  try:
    import torch
    from torchvision import datasets, transforms
  except ImportError:
    raise UserError("the torchvision comparison needs the torch extra: "
                    "pip install \"mae-jax[torch]\" (or --peer=none)") from None
  transform = transforms.Compose([
      transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0),
                                   interpolation=transforms.InterpolationMode.BICUBIC),
      transforms.RandomHorizontalFlip(),
      transforms.ToTensor(),
      transforms.Normalize(mean=list(mean), std=list(std))])
  dataset = datasets.ImageFolder(folder, transform=transform)
  if len(dataset) < batch:
    raise UserError(f"{folder} has {len(dataset)} images, fewer than one batch of {batch}")
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0, pin_memory=False)

  def endless():
    while True:
      yield from loader

  it = endless()
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  seconds = time.perf_counter() - start
  del it, loader  # stops the workers
  return {"img_per_s": steps * batch / seconds, "seconds": seconds}


def resolve_input(spec: str, photos: int, photos_dir: str, flag: str = "--input"
                  ) -> tuple[str, str, Optional[str]]:
  """(kind, argument, class folder or None) of 'photos', 'photos_tfds', 'folder:DIR' or
  'tfds:NAME'; the photos are generated here when needed."""
  kind, _, arg = spec.partition(":")
  if kind in ("photos", "photos_tfds") and not arg:
    return kind, arg, make_photos(photos_dir, photos)
  if kind == "folder" and arg:
    if not os.path.isdir(arg):
      raise UserError(f"{flag}={spec}: {arg} is not a folder")
    train = os.path.join(arg, "train")
    return kind, arg, train if os.path.isdir(train) else arg
  if kind == "tfds" and arg:
    return kind, arg, None
  raise UserError(f"{flag}={spec}: expected photos, photos_tfds, folder:DIR or tfds:NAME")


def point_dataset(d, kind: str, arg: str, folder: Optional[str], photos_dir: str) -> None:
  """Points the config.dataset block `d` at what `resolve_input` found (preparing the photos as
  a tfds dataset for 'photos_tfds')."""
  with d.unlocked():
    if kind == "photos_tfds":
      d.data_dir = os.path.join(photos_dir, "tfds")
      photos_tfds(photos_dir, d.data_dir)
      d.name = PHOTOS_TFDS
    elif kind == "tfds":
      d.name = arg
    else:
      d.name, d.folder = "folder", folder


def run_input_bench(config, spec: str, batch: int, steps: int, warmup: int, photos: int,
                    photos_dir: str, peer: bool, workers: Optional[int] = None) -> dict:
  """The input benchmark of `spec` ('photos', 'photos_tfds', 'folder:DIR', 'tfds:NAME')."""
  d = config.dataset
  kind, arg, folder = resolve_input(spec, photos, photos_dir)
  cores = workers or host_cores()
  if cores < host_cores() and hasattr(os, "sched_setaffinity"):
    # Both inputs on the same `cores` cores: the DataLoader's workers and TensorFlow's thread
    # pool (sized from the affinity when TensorFlow starts, after this) alike.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
  image_size = int(config.image_size)
  result = {"input": spec, "image_size": image_size, "batch_size": batch,
            "steps": steps, "host_cores": cores}
  tv = None
  if peer and folder is not None:
    # First, while neither TensorFlow nor JAX runs threads: the DataLoader forks its workers
    # (as the official code does), and they are shut down before ours starts.
    tv = time_torchvision(folder, image_size, batch, steps, warmup, cores, d.mean, d.std)
  point_dataset(d, kind, arg, folder, photos_dir)
  result["dataset"] = d.name
  ours = time_ours(d, image_size, batch, steps, warmup)
  result["ours_img_per_s"] = ours["img_per_s"]
  result["ours_img_per_s_per_core"] = ours["img_per_s"] / cores
  if tv is not None:
    result["torchvision_img_per_s"] = tv["img_per_s"]
    result["torchvision_img_per_s_per_core"] = tv["img_per_s"] / cores
    result["ratio"] = ours["img_per_s"] / tv["img_per_s"]
  return result


def format_input_table(r: dict) -> str:
  lines = [f"input {r['input']} ({r['dataset']}), {r['image_size']} px, batch {r['batch_size']}, "
           f"{r['steps']} batches, {r['host_cores']} host cores",
           f"  mae_jax      {r['ours_img_per_s']:9.1f} img/s  "
           f"{r['ours_img_per_s_per_core']:8.1f} img/s per core"]
  if "torchvision_img_per_s" in r:
    lines.append(f"  torchvision  {r['torchvision_img_per_s']:9.1f} img/s  "
                 f"{r['torchvision_img_per_s_per_core']:8.1f} img/s per core")
    lines.append(f"  ratio        {r['ratio']:9.2f}x")
  return "\n".join(lines)
