"""The Python API: `mae_jax.load(path)` -> a `Pretrained` model for your own images.

  model = mae_jax.load("workdirs/mae_tiny")     # or an official .pth, a timm file, a model folder
  x = model.preprocess(["cat.jpg", "dog.png"])  # float32 [2, H, W, 3], the evaluation transform
  model.features(x, pool="cls")                 # [2, D] (also "mean", "tokens": [2, T, D])
  model.reconstruct(x, mask_ratio=0.75)         # images in [0, 1] and the patch mask
  model.attention(x)                            # [layers, 2, heads, T, T]

Everything takes raw images too (what `preprocess` accepts), runs jitted in batches of
`batch_size` (the last one padded, so one compilation serves every batch) and returns numpy.
Files and configs are read here and in `mae_jax.analyze.run` (which the CLI shares), never by the
models. Heavy modules (JAX, TensorFlow, torch) are imported on first use, so `import mae_jax`
stays cheap.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from typing import Any, Optional

import numpy as np

from mae_jax.errors import UserError, first_line

# Files a folder of images contributes (the pipeline's own types, plus what Pillow reads).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
# Encodings TensorFlow decodes itself (the evaluation pipeline's); others go through Pillow.
_TF_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")
POOLS = ("cls", "mean", "tokens")
_METHOD_POOL = {"cls": "cls", "mean": "avg", "avg": "avg"}  # the methods' own pool names


# ----------------------------------------------------------------------------- images


def image_files(path, limit: int = 0) -> list[str]:
  """The image files `path` names: itself (a file), or the images directly in a folder, sorted by
  name (hidden files and other suffixes left out); the first `limit` (0: all)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise UserError(f"image path {path} does not exist")
  if os.path.isdir(path):
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))
             if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
             and os.path.isfile(os.path.join(path, f))]
    if not files:
      raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
  else:
    files = [path]
  return files[:limit] if limit else files


def _tf_reason(e: BaseException) -> str:
  """A TensorFlow error's first line without its function-node prefix and op suffix."""
  text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", first_line(e))
  return re.sub(r"\s*\[\[\{\{node .*$|\s*\[Op:[^\]]*\].*$", "", text) or type(e).__name__


def _to_rgb(array: np.ndarray, name: str) -> np.ndarray:
  """uint8 [H, W] / [H, W, 1 | 3 | 4] -> uint8 [H, W, 3] (grey repeated, alpha dropped, as the
  pipeline's decoder does)."""
  if array.dtype != np.uint8:
    raise UserError(f"{name}: dtype {array.dtype}, expected uint8 pixels (0-255); a float batch "
                    "already normalized by `preprocess` goes to features/reconstruct/attention")
  if array.ndim == 2:
    array = array[:, :, None]
  if array.shape[-1] not in (1, 3, 4):
    raise UserError(f"{name}: shape {array.shape} has {array.shape[-1]} channels; expected 1 "
                    "(grey), 3 (RGB) or 4 (RGBA), channels last")
  if min(array.shape[:2]) < 1:
    raise UserError(f"{name}: shape {array.shape} has no pixels")
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array[:, :, :3])


def _items(images, name: str = "images") -> list[tuple[str, Any]]:
  """[(name, uint8 [H, W, 3] array or encoded file bytes)] of what `preprocess` accepts."""
  if isinstance(images, (str, os.PathLike)):
    path = os.fspath(images)
    if not os.path.isfile(path):
      raise UserError(f"image file {path} does not exist" if not os.path.exists(path) else
                      f"{path} is not an image file")
    with open(path, "rb") as f:
      data = f.read()
    if data.startswith(_TF_MAGIC):
      return [(path, data)]
    try:  # WebP, TIFF, ...: decoded by Pillow, then the pipeline's resize and crop.
      from PIL import Image
      with Image.open(path) as im:
        return [(path, np.asarray(im.convert("RGB")))]
    except Exception as e:  # Pillow raises many types for files it cannot read.
      raise UserError(f"cannot read image {path}: {first_line(e)}") from None
  pil = sys.modules.get("PIL.Image")  # a PIL image implies Pillow is imported already.
  if pil is not None and isinstance(images, pil.Image):
    return [(name, np.asarray(images.convert("RGB")))]
  if isinstance(images, (list, tuple)):
    if not images:
      raise UserError(f"{name} is empty: no images given")
    return [item for i, x in enumerate(images) for item in _items(x, f"{name}[{i}]")]
  if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
    array = np.asarray(images)
    if array.ndim == 4:
      return [(f"{name}[{i}]", _to_rgb(a, f"{name}[{i}]")) for i, a in enumerate(array)]
    if array.ndim in (2, 3):
      return [(name, _to_rgb(array, name))]
    raise UserError(f"{name}: shape {array.shape}; expected an image [H, W] or [H, W, C], or a "
                    "batch [B, H, W, C]")
  raise UserError(f"{name}: cannot read a {type(images).__name__} as images; pass uint8 numpy "
                  "arrays (HWC or BHWC), PIL images, file paths or a list of them")


@functools.lru_cache(maxsize=8)
def _eval_transform(image_size, mean: tuple, std: tuple):
  """The evaluation pipeline's transform (decode, resize the shorter side, centre crop,
  normalize) of one encoded image, as one traced TensorFlow function."""
  import tensorflow as tf
  from mae_jax.data import pipeline
  return tf.function(lambda data: pipeline.eval_transform(data, image_size, list(mean), list(std)),
                     input_signature=[tf.TensorSpec([], tf.string)])


def read_images(images, image_size, mean, std) -> np.ndarray:
  """float32 [B, H, W, 3]: `images` (see `Pretrained.preprocess`) through the evaluation
  pipeline's own transform at image_size (an int S: S x S, or (H, W)), normalized with mean /
  std."""
  import tensorflow as tf
  from mae_jax import configlib
  transform = _eval_transform(configlib.image_size_value(image_size), tuple(map(float, mean)),
                              tuple(map(float, std)))
  out = []
  for name, item in _items(images):
    # Arrays are PNG-encoded (lossless) so that they take the very same decode, resize and crop.
    data = item if isinstance(item, bytes) else tf.io.encode_png(item)
    try:
      out.append(transform(tf.constant(data) if isinstance(data, bytes) else data).numpy())
    except tf.errors.OpError as e:
      raise UserError(f"cannot read image {name}: {_tf_reason(e)}") from None
  return np.stack(out).astype(np.float32)


# ----------------------------------------------------------------------------- models


def _is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load(path, step: Optional[int] = None) -> "Pretrained":
  """A pretrained model from `path`: one of our pretraining workdirs (config.json +
  checkpoints/; `step` picks a checkpoint, default the latest), or anything
  `mae_jax.convert.import_checkpoint` reads (an official MAE / ConvMAE .pth, a timm .safetensors
  or .pth, a model folder), imported into a temporary workdir that is gone once loaded."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist: mae_jax.load takes a pretraining workdir, a "
                    ".pth / .safetensors file or a model folder")
  from mae_jax.analyze import run
  if _is_workdir(path):
    return Pretrained(run.load_model(path, step or 0), source=path, workdir=path)
  if step is not None:
    raise UserError(f"step={step}: {path} holds one set of weights; step picks a checkpoint of "
                    "a workdir")
  from mae_jax.convert.workdirs import import_checkpoint
  with tempfile.TemporaryDirectory(prefix="mae_jax_load_") as tmp:
    workdir = os.path.join(tmp, "workdir")
    info = import_checkpoint(path, workdir)
    loaded = run.load_model(workdir)  # params restored into memory: the folder may go.
  return Pretrained(loaded, source=path, workdir=None, notes=tuple(info.get("notes", ())))


def _bucket(n: int, batch_size: int) -> int:
  """Rows per forward pass for n images: the next power of two, at most batch_size (few shapes,
  so few compilations, and little padding for a handful of images)."""
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


class Pretrained:
  """A pretrained encoder (and decoder, when the checkpoint has one) with its preprocessing.

  Attributes: `method` (name, e.g. 'mae'), `variant`, `config` (the run's resolved config),
  `params` (the whole tree; {'encoder': ...} alone for an encoder-only release), `step`,
  `image_size` (an int S for S x S inputs, or (H, W)), `mean`, `std`, `patch_size` (input pixels
  per token), `grid` (the token grid, rows by columns: (H / patch_size, W / patch_size)),
  `has_cls`, `has_decoder`, `source` (what was loaded), `workdir` (None for an imported file),
  `notes` (what the import assumed), `trainable` (the `mae_jax.methods` object: its hooks take
  `params`).
  """

  def __init__(self, loaded, source: str, workdir: Optional[str], notes: tuple = ()):
    from mae_jax import configlib
    from mae_jax.analyze import run
    self.config = loaded.config
    self.trainable = loaded.method
    self.params = loaded.params
    self.step = loaded.step
    self.has_decoder = loaded.whole
    self.source, self.workdir, self.notes = source, workdir, notes
    self.method = str(self.config.method)
    self.variant = self.config.model.get("variant")
    self.image_size = configlib.image_size_value(self.config.image_size)
    self._hw = configlib.image_hw(self.image_size)
    self.mean = tuple(float(v) for v in self.config.dataset.mean)
    self.std = tuple(float(v) for v in self.config.dataset.std)
    self.grid = tuple(int(g) for g in self.trainable.grid)
    self.patch_size = self._hw[1] // self.grid[1]
    self._encoder = run.encoder_for(self.trainable, self.params)
    self.has_cls = hasattr(self._encoder, "prepend_cls")
    self._compiled: dict = {}  # jitted functions by (hook, option)
    self._with_ratio: dict = {}  # methods rebuilt for another mask ratio

  def __repr__(self) -> str:
    import jax
    from mae_jax import configlib
    count = sum(int(np.size(x)) for x in jax.tree.leaves(self.params))
    parts = "encoder + decoder" if self.has_decoder else "encoder only"
    size = configlib.image_size_text(self.image_size)
    return (f"Pretrained({self.method} {self.variant}, {size} px, {self.patch_size} px "
            f"tokens ({self.grid[0]}x{self.grid[1]}{' + cls' if self.has_cls else ''}), "
            f"step {self.step}, {count / 1e6:.2f}M params, {parts}, from {self.source!r})")

  # --------------------------------------------------------------------------- inputs

  def preprocess(self, images) -> np.ndarray:
    """float32 [B, H, W, 3] at this model's size (S x S for an int S), normalized with its mean
    / std, through the evaluation pipeline's transform (resized to cover (H, W) / 0.875 keeping
    the aspect ratio, bicubic; centre crop).
    `images`: a uint8 [H, W, C] or [B, H, W, C] array (C = 1, 3 or 4), a PIL image, a file path,
    or a list of these."""
    return read_images(images, self.image_size, self.mean, self.std)

  def _batch(self, x) -> np.ndarray:
    """A float batch [B, H, W, 3] is taken as preprocessed; anything else is preprocessed."""
    if hasattr(x, "dtype") and hasattr(x, "shape") and np.issubdtype(x.dtype, np.floating):
      shape = tuple(x.shape)
      want = (*self._hw, 3)
      if len(shape) == 3:
        shape, x = (1,) + shape, np.asarray(x)[None]
      if len(shape) != 4 or shape[1:] != want or shape[0] < 1:
        raise UserError(f"a float batch must be preprocessed images [B, {want[0]}, {want[1]}, "
                        f"3] for this model, got shape {tuple(x.shape)}")
      return np.asarray(x, np.float32)
    return self.preprocess(x)

  def _batched(self, fn, images: np.ndarray, batch_size: int):
    """fn(batch [b, H, W, 3], index) -> numpy pytree with the batch first, over `images` in
    batches of one static size b (the last padded with zeros), the padding cut off again."""
    import jax
    n = len(images)
    b = _bucket(n, batch_size)
    outs = []
    for i, start in enumerate(range(0, n, b)):
      part = images[start:start + b]
      real = len(part)
      if real < b:
        part = np.concatenate([part, np.zeros((b - real,) + part.shape[1:], part.dtype)])
      outs.append(jax.tree.map(lambda a, r=real: np.asarray(a)[:r], fn(part, i)))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def _jit(self, name: str, option, make):
    if (name, option) not in self._compiled:
      import jax
      self._compiled[(name, option)] = jax.jit(make())
    return self._compiled[(name, option)]

  # --------------------------------------------------------------------------- hooks

  def features(self, x, pool: Optional[str] = None, batch_size: int = 64) -> np.ndarray:
    """float32 [B, D]: one vector per image from the encoder on all tokens (no mask, no dropout).
    pool 'cls' (the cls token), 'mean' (mean of the patch tokens) or None (the method's default,
    the one its linear probe and k-NN use); 'tokens': every output token [B, T, D] (cls first).
    `x`: raw images (as `preprocess`) or a preprocessed float batch."""
    if pool is not None and pool not in POOLS and pool != "avg":
      raise UserError(f"pool must be one of {', '.join(POOLS)} (or None: the method's "
                      f"default), got {pool!r}")
    if pool == "cls" and not self.has_cls:
      raise UserError(f"{self.method} has no cls token: use pool='mean' or 'tokens'")
    method, key, encoder = self.trainable, self.trainable.encoder_key, self._encoder

    def make():
      def fn(params, images):
        if pool == "tokens":
          return encoder.apply({"params": params[key]}, images)
        if encoder is method.encoder_module:  # the method's own rule: what its evaluators see.
          return method.features(params, images, _METHOD_POOL.get(pool))
        # A learned pos_embed, which only imports carry (MAE-shaped): MAE's pooling (cls by
        # default) on the tokens of the encoder that uses it.
        tokens = encoder.apply({"params": params[key]}, images)
        return tokens[:, 0] if (pool or "cls") == "cls" else tokens[:, 1:].mean(axis=1)
      return fn

    fn = self._jit("features", pool, make)
    images = self._batch(x)
    return self._batched(lambda part, _: fn(self.params, part), images, batch_size)

  def reconstruct(self, x, mask_ratio: Optional[float] = None, seed: int = 0,
                  batch_size: int = 64) -> dict[str, np.ndarray]:
    """Masked-image reconstructions (MAE, ConvMAE, SimMIM, SplitMask): {'original', 'masked'
    (hidden patches grey), 'reconstruction', 'pasted' (the reconstruction with the visible
    patches pasted back)}: float32 [B, H, W, 3] in [0, 1] RGB; 'mask' [B, N] over the patch grid
    (1 = hidden); 'hidden_mse' [B] on the hidden pixels. Masks are drawn from `seed` (batch i:
    fold_in(seed, i)); `mask_ratio` overrides the config's (not for SplitMask's halves)."""
    import jax
    from mae_jax.analyze import run
    from mae_jax.evaluators import panels
    if self.trainable.reconstruct is None:
      raise UserError(f"{self.method} predicts no pixels: reconstruct is for MAE, ConvMAE, "
                      "SimMIM and SplitMask")
    if not self.has_decoder:
      raise UserError(f"{self.source} holds the encoder alone (an encoder-only release): "
                      "reconstruct needs the decoder too")
    method = self._method_with(mask_ratio)
    images = self._batch(x)
    key = jax.random.PRNGKey(seed)
    p = self.patch_size

    def one(part, i):
      got = run.reconstruct_panels(method, self.params, part, jax.random.fold_in(key, i),
                                   self.mean, self.std)
      shown = got["panels"]
      mask = got["mask"][:, ::p, ::p, 0]  # one value per patch
      return {"original": shown[panels.PANELS[0]], "masked": shown[panels.PANELS[1]],
              "reconstruction": shown[panels.PANELS[2]], "pasted": shown[panels.PANELS[3]],
              "mask": mask.reshape(len(part), -1), "hidden_mse": got["hidden_mse"]}

    return self._batched(one, images, batch_size)

  def _method_with(self, mask_ratio: Optional[float]):
    if mask_ratio is None or mask_ratio == self.config.get("mask_ratio"):
      return self.trainable
    if "mask_ratio" not in self.config:
      raise UserError(f"{self.method} has no mask ratio (it splits the patches in fixed halves)")
    if not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
      raise UserError(f"mask_ratio must be a number in (0, 1), got {mask_ratio!r}")
    if mask_ratio not in self._with_ratio:
      from mae_jax.methods import get_method
      config = self.config.copy_and_resolve_references()
      with config.unlocked():
        config.mask_ratio = float(mask_ratio)
      self._with_ratio[mask_ratio] = get_method(config)  # same params, another number masked.
    return self._with_ratio[mask_ratio]

  def attention(self, x, batch_size: int = 64) -> np.ndarray:
    """float32 [layers, B, heads, T, T]: the attention probabilities of every transformer block
    of the encoder on whole images (no mask; T = tokens, cls first where there is one; ConvMAE:
    its stage-3 blocks). Each row sums to 1."""
    import jax.numpy as jnp
    from mae_jax.analyze import run
    method = self.trainable

    def make():
      def fn(params, images):
        _, attention, _ = run.encoder_intermediates(method, params, images)
        if not attention:
          raise UserError(f"the {self.method} encoder has no attention layers")
        return jnp.stack(attention, axis=1).astype(jnp.float32)  # [B, layers, H, T, T]
      return fn

    fn = self._jit("attention", None, make)
    images = self._batch(x)
    out = self._batched(lambda part, _: fn(self.params, part), images, batch_size)
    return np.moveaxis(out, 1, 0)

