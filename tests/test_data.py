"""Input pipelines on real data: the embedded digits through tfds, and folders of real image files."""

import os

import numpy as np
import pytest
from PIL import Image
import tensorflow as tf

from mae_jax import configlib, data
from mae_jax.data import pipeline
from mae_jax.errors import UserError


def _digits_config(data_dir):
  d = configlib.dataset_config()
  d.data_dir = data_dir
  return d


@pytest.fixture(scope="module")
def digits(digits_data_dir):
  d = _digits_config(digits_data_dir)
  return d, data.get_source(d)


def test_digits_source_prepares_itself_with_fixed_splits(digits):
  _, source = digits
  assert source.num_classes == 10
  assert source.num_examples("train") == 1497
  assert source.num_examples("validation") == 300
  assert data.steps_per_epoch(source, "train", 128) == 1497 // 128


def test_train_batches_shapes_and_normalization(digits):
  d, source = digits
  batch = next(data.train_batches(source, d, split="train", image_size=32, global_batch_size=16,
                                  seed=0))
  # Pretraining batches are uint8 pixels; the train step normalizes them.
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  # Grayscale digits become RGB with three equal channels.
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 1])
  assert batch["image"].max() > 128  # white strokes on black, not rescaled
  assert set(batch["label"].tolist()) <= set(range(10))


def test_normalize_on_device_is_the_hosts_normalization():
  """Every pixel value, on the device (the train step) and on the host (the evaluation input):
  the same to float32 rounding of the terms (XLA:CPU divides through a reciprocal; near zero the
  subtraction of the mean leaves that rounding as the whole difference)."""
  import jax
  import tensorflow as tf
  from mae_jax.data import pipeline
  pixels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # [256, 1, 3]
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  host = pipeline._normalize(  # pylint: disable=protected-access
      tf.constant(pixels), mean, std).numpy()
  device = np.asarray(jax.jit(lambda x: data.normalize_on_device(x, mean, std))(pixels))
  np.testing.assert_allclose(device, host, rtol=1e-6, atol=1e-6)
  assert device.dtype == np.float32
  assert np.asarray(device).dtype == np.float32


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_stream_is_deterministic_and_resumes_exactly(digits):
  d, source = digits
  kw = dict(split="train", image_size=16, global_batch_size=256, seed=3)
  spe = data.steps_per_epoch(source, "train", 256)  # 5 steps per epoch.
  full = _take(data.train_batches(source, d, **kw), 2 * spe + 2)
  again = _take(data.train_batches(source, d, **kw), 2)
  np.testing.assert_array_equal(full[0]["image"], again[0]["image"])
  # Resuming mid-epoch and exactly on an epoch boundary gives the uninterrupted stream.
  for start in (3, spe, 2 * spe + 1):
    resumed = next(data.train_batches(source, d, start_step=start, **kw))
    np.testing.assert_array_equal(resumed["image"], full[start]["image"])
    np.testing.assert_array_equal(resumed["label"], full[start]["label"])
  # Epochs are reshuffled and re-augmented; other seeds give other streams.
  assert not np.array_equal(full[0]["label"], full[spe]["label"])
  other = next(data.train_batches(source, d, **dict(kw, seed=4)))
  assert not np.array_equal(other["image"], full[0]["image"])


def test_one_epoch_visits_each_example_at_most_once(digits):
  d, source = digits
  d = configlib.dataset_config()
  d.data_dir = digits[0].data_dir
  d.crop_min_scale = 1.0  # no random crop: 8x8 digits -> identical resize of the whole image.
  d.hflip = False
  spe = data.steps_per_epoch(source, "train", 100)
  batches = _take(data.train_batches(source, d, split="train", image_size=8, global_batch_size=100,
                                     seed=0), spe)
  images = np.concatenate([b["image"] for b in batches])
  keys = {img.tobytes() for img in images}
  # Distinct images seen once each (the digits set has a few exact duplicates, hence >=).
  assert len(images) == spe * 100 and len(keys) >= len(images) - 20


def test_process_shares_are_disjoint_and_cover_the_split(digits):
  d, source = digits
  seen = []
  for pi in range(2):
    batches = list(data.eval_batches(source, d, split="validation", image_size=8,
                                     global_batch_size=64, process_index=pi, process_count=2))
    assert len(batches) == data.eval_steps(source, "validation", 64, 2)
    for b in batches:
      seen += [img.tobytes() for img, m in zip(b["image"], b["mask"]) if m]
  assert len(seen) == 300
  single = list(data.eval_batches(source, d, split="validation", image_size=8, global_batch_size=64))
  assert sum(int(b["mask"].sum()) for b in single) == 300
  assert single[-1]["mask"].tolist() == [1] * (300 - 4 * 64) + [0] * (5 * 64 - 300)
  everything = {img.tobytes() for b in single for img, m in zip(b["image"], b["mask"]) if m}
  assert set(seen) == everything


def test_training_shares_differ_between_processes(digits):
  d, source = digits
  a = next(data.train_batches(source, d, split="train", image_size=8, global_batch_size=64,
                              seed=0, process_index=0, process_count=2))
  b = next(data.train_batches(source, d, split="train", image_size=8, global_batch_size=64,
                              seed=0, process_index=1, process_count=2))
  assert a["image"].shape == (32, 8, 8, 3)
  assert not np.array_equal(a["image"], b["image"])


def test_random_resized_crop_window_stays_inside_and_respects_scale():
  for i in range(50):
    shape = tf.constant([60 + i, 200 - 2 * i, 3])
    top, left, h, w = (int(v) for v in pipeline.random_resized_crop_window(
        shape, tf.constant([i, 1], tf.int64), (0.2, 1.0)))
    H, W = 60 + i, 200 - 2 * i
    assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
    assert h * w >= 0.18 * H * W  # area fraction drawn from (0.2, 1), up to rounding.
    fallback = h == H or w == W
    assert fallback or 0.7 <= w / h <= 1.4  # aspect ratio drawn from (3/4, 4/3).
  # A sliver image cannot fit any proposal: centre crop with the ratio clamped to 3/4.
  top, left, h, w = (int(v) for v in pipeline.random_resized_crop_window(
      tf.constant([400, 20, 3]), tf.constant([0, 0], tf.int64), (0.9, 1.0)))
  assert (w, h) == (20, 27) and left == 0 and top == round((400 - 27) / 2)


# ----------------------------------------------------------------------------- folders


def _digit_images():
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images * 255 / 16).astype(np.uint8)
  return images, digits.target


def _write(path, array, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.fromarray(np.kron(array, np.ones((4, 4), np.uint8)))  # 32x32 grayscale.
  if fmt == "JPEG":
    img = img.convert("RGB")
  img.save(path, fmt)


def test_folder_with_class_subfolders(tmp_path):
  images, labels = _digit_images()
  for i in range(40):
    ext, fmt = (".jpg", "JPEG") if i % 2 else (".png", "PNG")
    _write(str(tmp_path / f"class_{labels[i]}" / f"{i:03d}{ext}"), images[i], fmt)
  (tmp_path / "notes.txt").write_text("not an image")  # ignored: not an image extension
  d = configlib.dataset_config("folder")
  d.folder = str(tmp_path)
  d.val_fraction = 0.25
  source = data.get_source(d)
  assert source.num_classes == len(set(labels[:40].tolist()))
  assert source.num_examples("train") == 30 and source.num_examples("validation") == 10
  batch = next(data.train_batches(source, d, split="train", image_size=16, global_batch_size=8,
                                  seed=0))
  assert batch["image"].shape == (8, 16, 16, 3)
  evals = list(data.eval_batches(source, d, split="validation", image_size=16, global_batch_size=4))
  assert sum(int(b["mask"].sum()) for b in evals) == 10


def test_folder_flat_and_train_val_layouts(tmp_path):
  images, _ = _digit_images()
  for i in range(12):
    _write(str(tmp_path / "flat" / f"{i}.png"), images[i], "PNG")
    split = "train" if i < 9 else "val"
    _write(str(tmp_path / "tv" / split / f"{i}.png"), images[i], "PNG")
  d = configlib.dataset_config("folder")
  d.folder = str(tmp_path / "flat")
  flat = data.get_source(d)
  assert flat.num_classes == 0 and flat.num_examples("train") == 10  # every 10th held out.
  b = next(data.train_batches(flat, d, split="train", image_size=8, global_batch_size=5, seed=0))
  assert (b["label"] == -1).all()
  d.folder = str(tmp_path / "tv")
  tv = data.get_source(d)
  assert tv.num_examples("train") == 9 and tv.num_examples("validation") == 3


def test_folder_errors_are_one_line_user_errors(tmp_path):
  d = configlib.dataset_config("folder")
  d.folder = str(tmp_path / "missing")
  with pytest.raises(UserError, match="does not exist"):
    data.get_source(d)
  (tmp_path / "empty").mkdir()
  d.folder = str(tmp_path / "empty")
  with pytest.raises(UserError, match="no images"):
    data.get_source(d)
  images, _ = _digit_images()
  _write(str(tmp_path / "bad" / "0.png"), images[0], "PNG")
  (tmp_path / "bad" / "1.jpg").write_bytes(b"this is not a jpeg at all")
  d.folder = str(tmp_path / "bad")
  with pytest.raises(UserError, match=r"unreadable image .*1\.jpg"):
    data.get_source(d)


def test_corrupt_image_body_is_reported_while_streaming(tmp_path, monkeypatch):
  images, _ = _digit_images()
  for i in range(4):
    _write(str(tmp_path / f"{i}.png"), images[i], "PNG")
  # A valid PNG signature followed by garbage passes the header check but cannot be decoded.
  (tmp_path / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
  d = configlib.dataset_config("folder")
  d.folder = str(tmp_path)
  d.val_fraction = 0.0
  source = data.get_source(d)
  with pytest.raises(UserError, match="cannot read an image"):
    next(data.train_batches(source, d, split="train", image_size=8, global_batch_size=5, seed=0))


def test_unknown_and_unprepared_datasets(tmp_path):
  d = configlib.dataset_config("no_such_dataset_xyz")
  with pytest.raises(UserError, match="unknown dataset 'no_such_dataset_xyz'"):
    data.get_source(d)
  d = configlib.dataset_config("mnist")
  d.data_dir = str(tmp_path)
  with pytest.raises(UserError, match="not prepared"):
    data.get_source(d)


def test_unknown_split_and_too_large_batch(digits):
  d, source = digits
  with pytest.raises(UserError, match="no split 'test'"):
    data.steps_per_epoch(source, "test", 8)
  with pytest.raises(UserError, match="fewer than one batch"):
    data.steps_per_epoch(source, "validation", 512)
