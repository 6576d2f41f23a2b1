"""Unreadable image files in folder sources (named, verified up front, or skipped), and the
embedded digits prepared by two runs at once."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mae_jax import configlib, data
from mae_jax.errors import UserError
from conftest import REPO, SMALL, run_cli


@pytest.fixture(scope="module")
def photos():
  """48 random 96x128 RGB crops of scikit-learn's two sample photographs: large enough that half
  of one as a JPEG ends in its scan data, past the headers."""
  from sklearn.datasets import load_sample_images
  images = load_sample_images().images  # two 427x640 photographs.
  rng = np.random.default_rng(0)
  out = []
  for i in range(48):
    top, left = rng.integers(0, 427 - 192), rng.integers(0, 640 - 256)
    crop = images[i % 2][top:top + 192, left:left + 256]
    out.append(np.asarray(Image.fromarray(crop).resize((128, 96))))
  return out


def _write_folder(root, photos, names):
  """Writes photos[i] to root/names[i] (format from the extension); returns the paths."""
  paths = []
  for photo, name in zip(photos, names):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(photo).save(path, "JPEG" if name.endswith(".jpg") else "PNG")
    paths.append(path)
  return paths


def _truncate(path):
  with open(path, "rb") as f:
    content = f.read()
  with open(path, "wb") as f:
    f.write(content[:len(content) // 2])


def _folder_config(folder, **overrides):
  d = configlib.dataset_config("folder")
  d.folder = str(folder)
  d.val_fraction = 0.0
  for k, v in overrides.items():
    d[k] = v
  return d


def _flat_names(n):
  return [f"{i:02d}.{'jpg' if i % 2 else 'png'}" for i in range(n)]


@pytest.mark.parametrize("bad,overrides", [
    (7, dict(crop_min_scale=1.0)),  # a JPEG: decoded whole, the missing rows always fail.
    (12, dict(shuffle_buffer=5)),  # a PNG, through a shuffle buffer smaller than the split.
])
@pytest.mark.parametrize("start_step", [0, 5])  # 5: mid-epoch, after a resume.
def test_training_stream_names_the_truncated_file(tmp_path, photos, bad, overrides, start_step):
  paths = _write_folder(tmp_path, photos, _flat_names(24))
  _truncate(paths[bad])
  d = _folder_config(tmp_path, **overrides)
  source = data.get_source(d)  # headers are intact: it opens.
  stream = data.train_batches(source, d, split="train", image_size=16, global_batch_size=6,
                              seed=1, start_step=start_step)
  with pytest.raises(UserError) as e:
    for _ in range(8):  # spans a whole epoch of 4 steps (all 24 files) from either start.
      next(stream)
  message = str(e.value)
  assert f": {paths[bad]} (" in message and "\n" not in message
  assert "skip_bad_images=True" in message and "function_node" not in message


def test_evaluation_names_the_bad_validation_file(tmp_path, photos):
  names = [f"train/{'ab'[i % 2]}/{i:02d}.jpg" for i in range(12)]
  names += [f"val/{'ab'[i % 2]}/{i:02d}.{'png' if i % 3 else 'jpg'}" for i in range(12, 24)]
  paths = _write_folder(tmp_path, photos, names)
  _truncate(paths[21])  # val/b/21.jpg, 11th of the 12 sorted files: the last batch of 3.
  d = _folder_config(tmp_path)
  source = data.get_source(d)
  next(data.train_batches(source, d, split="train", image_size=16, global_batch_size=4, seed=0))
  with pytest.raises(UserError, match=f"split validation: {paths[21]} \\(jpeg::"):
    list(data.eval_batches(source, d, split="validation", image_size=16, global_batch_size=3))


def test_verify_images_decodes_every_file_up_front(tmp_path, photos, capsys):
  paths = _write_folder(tmp_path, photos, _flat_names(30))
  d = _folder_config(tmp_path, verify_images=True, val_fraction=0.1)
  assert data.get_source(d).num_examples("train") == 27
  assert "checked 30 images of folder" in capsys.readouterr().out
  _truncate(paths[5])
  _truncate(paths[20])
  with pytest.raises(UserError) as e:
    data.get_source(d)
  assert str(e.value).startswith(f"2 of 30 images in folder {tmp_path} cannot be decoded: "
                                 "05.jpg, 20.png (first: jpeg::")


def test_skip_bad_images_leaves_them_out_and_the_stream_resumes_exactly(tmp_path, photos, capsys):
  names = [f"{'ab'[i % 2]}/{i:02d}.{'jpg' if i % 3 else 'png'}" for i in range(40)]
  paths = _write_folder(tmp_path, photos, names)
  for i in (4, 9, 21):  # b/21 is held out for validation (every 10th file by sorted path).
    _truncate(paths[i])
  d = _folder_config(tmp_path, skip_bad_images=True, val_fraction=0.1)
  source = data.get_source(d)
  out = capsys.readouterr().out
  assert f"skipped 3 unreadable images of 40 in folder {tmp_path}: a/04.jpg, b/09.png, b/21.png" \
      in out
  assert source.num_examples("train") == 34 and source.num_examples("validation") == 3
  kw = dict(split="train", image_size=16, global_batch_size=8, seed=2)
  full = [b["image"] for b, _ in zip(data.train_batches(source, d, **kw), range(10))]
  resumed = next(data.train_batches(source, d, start_step=6, **kw))["image"]
  np.testing.assert_array_equal(resumed, full[6])
  evals = list(data.eval_batches(source, d, split="validation", image_size=16,
                                 global_batch_size=2))
  assert sum(int(b["mask"].sum()) for b in evals) == 3


def test_cli_stops_with_one_line_naming_the_file_or_skips_it(tmp_path, photos):
  # 36 files, every 10th held out: 32 to train on, two steps of 16 an epoch (31 files and one
  # step once the bad one is skipped).
  paths = _write_folder(tmp_path / "images", photos, _flat_names(36))
  _truncate(paths[12])  # a PNG (any crop fails) in the first batch: it stops before compiling.
  flags = ["--config=configs/mae.py", *SMALL, "--config.batch_size=16", "--config.total_steps=2",
           "--config.evals.heldout.every_steps=0",  # 4 validation images: under one batch.
           "--config.dataset.name=folder", f"--config.dataset.folder={tmp_path / 'images'}"]
  r = run_cli(f"--workdir={tmp_path / 'stop'}", *flags)
  assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: cannot read an image of folder"), r.stderr
  assert f"{paths[12]} (" in lines[0]
  r = run_cli(f"--workdir={tmp_path / 'skip'}", *flags, "--config.dataset.skip_bad_images=True")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "skipped 1 unreadable images of 36" in r.stdout and "step 2/2" in r.stdout


def test_two_runs_prepare_the_digits_at_once(tmp_path):
  script = ("import sys; from mae_jax import configlib, data; d = configlib.dataset_config(); "
            "d.data_dir = sys.argv[1]; print(data.get_source(d).num_examples('train'))")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "tfds")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == "1497"
  assert sum("preparing mae_jax_digits" in out for out, _ in results) == 1
