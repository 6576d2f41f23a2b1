"""The benchmark measures the real train step and reports consistent figures."""

import math

import numpy as np

from configs import mae as mae_config
from mae_jax.bench import step as bench


def test_run_bench_reports_consistent_figures():
  c = mae_config.get_config("tiny")
  c.image_size = 16
  c.batch_size = 16
  c.model.decoder_width = 32
  c.model.decoder_depth = 1
  r = bench.run_bench(c, steps=2, warmup=1, matmul_size=256)
  assert r["batch_size"] == 16 and r["image_size"] == 16
  assert r["step_s"] > 0 and r["compile_s"] > 0
  assert 0 < r["peak_ratio"] < 1.5  # the step cannot run far above the measured matmul peak.
  # A step of a 0.8M-parameter model on 16 images costs at least the forward matmuls.
  assert r["flops_per_step"] > 16 * 2 * 0.5e6 * 4
  assert r["peak_memory_bytes"] > 0 and math.isfinite(r["loss"])
  assert "mae Mu/4" in bench.format_table(r)


def test_compile_only_and_markdown_rows_name_the_compute_options():
  c = mae_config.get_config("tiny")
  c.image_size = 16
  c.batch_size = 8
  c.model.decoder_depth = 2
  c.compute.scan = True
  c.compute.remat = True
  r = bench.run_bench(c, steps=1, warmup=0, matmul_size=64, compile_only=True)
  assert "step_s" not in r and r["compile_s"] > 0 and r["xla_memory_bytes"] > 0
  assert 0 < r["trace_s"] < r["compile_s"] and 0 < r["xla_compile_s"] < r["compile_s"]
  assert r["compute"] == "float32 remat scan"
  row = bench.markdown_row(r)
  assert row.startswith("| mae Mu/4 | float32 remat scan | 8 |") and row.count("|") == 11
  assert "float32 remat scan" in bench.format_table(r)


def test_flops_per_step_count_the_global_batch_whatever_the_attention_or_scan():
  """XLA's analysis counts a loop body once and a partitioned program per device: the bench's
  count must not move with blocked attention, scan, or the number of devices (8 here)."""
  import jax

  from mae_jax import train
  from mae_jax.methods import get_method

  c = mae_config.get_config("tiny")
  c.image_size = 16
  c.batch_size = 16
  c.compute.attention = "xla"
  counts = {}
  for attention, scan in (("xla", False), ("blocked", False), ("xla", True), ("blocked", True)):
    c.compute.attention, c.compute.scan = attention, scan
    r = bench.run_bench(c, steps=1, warmup=0, matmul_size=64, compile_only=True)
    counts[attention, scan] = r["flops_per_step"]
  assert len(jax.devices()) == 8
  for key, flops in counts.items():
    assert abs(flops / counts["xla", False] - 1) < 1e-3, (key, counts)
  # XLA's count of the same step compiled for one device.
  c.compute.attention, c.compute.scan = "xla", False
  mesh = train.make_mesh(jax.devices()[:1])
  plan = train.Plan(steps_per_epoch=1000, total_steps=100_000, warmup_steps=1000, peak_lr=1e-4)
  update = train.build_update(c, mesh, plan, get_method(c, plan.total_steps))
  abstract = jax.eval_shape(update.init_state, jax.random.PRNGKey(0))
  images = jax.ShapeDtypeStruct((16, 16, 16, 3), np.uint8)
  one_device = bench.cost_flops(update.step.lower(abstract, {"image": images}).compile())
  assert abs(counts["xla", False] / one_device - 1) < 0.02, (counts, one_device)


# ----------------------------------------------------------------------------- other modes

import json  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

from conftest import run_cli  # noqa: E402

ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _bench(*args, **kwargs):
  r = run_cli(*args, module="mae_jax.bench", env_extra=ONE_DEVICE, **kwargs)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")], r.stdout


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  from mae_jax.bench import input as input_bench
  folder = str(tmp_path_factory.mktemp("photos"))
  input_bench.make_photos(folder, 24)
  return folder


def test_generated_photos_are_imagenet_sized_jpegs_made_once(photos):
  from PIL import Image
  from mae_jax.bench import input as input_bench
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(photos, "train"))
                 for f in fs)
  assert len(files) == 24
  sizes = {Image.open(f).size for f in files}
  assert sizes <= {(500, 375), (375, 500)} and len(sizes) == 2
  assert all(Image.open(f).format == "JPEG" for f in files)
  kb = [os.path.getsize(f) / 1024 for f in files]
  assert 30 < sum(kb) / len(kb) < 300, kb  # the size of an ImageNet training JPEG
  before = {f: os.path.getmtime(f) for f in files}
  input_bench.make_photos(photos, 24)  # the same recipe: reused, not rewritten
  assert {f: os.path.getmtime(f) for f in files} == before


def test_input_bench_against_torchvision_on_a_folder_and_as_tfds(photos):
  rows, out = _bench("--config=mae", "--input=photos", f"--photos_dir={photos}", "--photos=24",
                     "--batch_size=8", "--steps=2", "--warmup=1", "--workers=1")
  r = rows[-1]
  assert r["dataset"] == "folder" and r["host_cores"] == 1 and r["image_size"] == 32
  assert r["ours_img_per_s"] > 0 and r["torchvision_img_per_s"] > 0
  assert r["ratio"] == pytest.approx(r["ours_img_per_s"] / r["torchvision_img_per_s"])
  assert "torchvision" in out and "ratio" in out
  rows, _ = _bench("--config=mae", "--input=photos_tfds", f"--photos_dir={photos}",
                   "--photos=24", "--batch_size=8", "--steps=2", "--warmup=1", "--peer=none")
  assert rows[-1]["dataset"] == "mae_jax_photos" and "torchvision_img_per_s" not in rows[-1]


def test_training_decode_of_a_jpeg_reads_only_the_crop_window(photos):
  """The training transform decodes JPEGs with DecodeAndCropJpeg (only the crop's blocks), for
  folders and for tfds datasets alike (tfds hands over the encoded bytes)."""
  import tensorflow as tf
  from mae_jax import data
  from mae_jax.data import pipeline

  path = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(photos, "train"))
                for f in fs)[0]
  encoded = tf.io.read_file(path)
  window = lambda shape: (tf.constant(40), tf.constant(60), tf.constant(200), tf.constant(150))
  fn = tf.function(lambda b: pipeline._decode(b, window))  # pylint: disable=protected-access
  graph = fn.get_concrete_function(tf.TensorSpec([], tf.string)).graph.as_graph_def()
  ops = {n.op for f in graph.library.function for n in f.node_def} | {n.op for n in graph.node}
  assert "DecodeAndCropJpeg" in ops and "DecodeJpeg" not in ops
  # Inside the window: the same pixels as decoding the whole image; on its edge the chroma
  # upsampling lacks the neighbours outside the window, so edge pixels differ slightly.
  cropped = fn(encoded).numpy().astype(int)
  whole = tf.io.decode_jpeg(encoded, channels=3).numpy()[40:240, 60:210].astype(int)
  assert cropped.shape == whole.shape == (200, 150, 3)
  np.testing.assert_array_equal(cropped[1:-1, 1:-1], whole[1:-1, 1:-1])
  assert np.abs(cropped - whole).mean() < 0.1
  # tfds: the reader hands the transform encoded bytes, not decoded pixels.
  config = mae_config.get_config("tiny")
  d = config.dataset
  from mae_jax.bench import input as input_bench
  input_bench.point_dataset(d, "photos_tfds", "", None, photos)
  source = data.get_source(d)
  assert source.reader("train", 0, 1, True, None).element_spec["image"].dtype == tf.string


def test_loop_bench_times_the_loop_against_the_step(photos, tmp_path):
  rows, out = _bench("--config=mae", "--loop=photos", f"--photos_dir={photos}", "--photos=24",
                     "--batch_size=8", "--steps=2", "--warmup=1", "--matmul_size=128",
                     "--config.image_size=16", "--config.model.decoder_depth=1")
  r = rows[-1]
  assert r["dataset"] == "folder" and r["steps"] == 2 and r["batch_size"] == 8
  assert r["loop_img_per_s"] > 0 and r["step_img_per_s"] > 0 and r["input_wait_s"] >= 0
  assert r["ratio"] == pytest.approx(r["loop_img_per_s"] / r["step_img_per_s"])
  assert "whole loop" in out


def test_step_bench_against_the_hugging_face_peer():
  rows, out = _bench("--config=mae", "--batch_size=4", "--steps=1", "--warmup=1",
                     "--matmul_size=128", "--config.image_size=16",
                     "--config.model.decoder_depth=1", "--peer=hf")
  r = rows[-1]
  assert r["peer"].startswith("transformers") and "ViTMAEForPreTraining" in r["peer"]
  assert r["peer_img_per_s"] > 0 and np.isfinite(r["peer_loss"])
  assert r["ratio_to_peer"] == pytest.approx(r["img_per_s"] / r["peer_img_per_s"])
  assert "ours / peer" in out


@pytest.mark.parametrize("args,line", [
    (["--peer=official:/nonexistent"], "/nonexistent has no models_mae.py"),
    (["--peer=caffe"], "--peer=caffe: expected hf or official:DIR"),
    (["--input=photos", "--peer=hf"], "--peer=hf: with --input, torchvision or none"),
    (["--input=folder:/nonexistent"], "--input=folder:/nonexistent: /nonexistent is not a folder"),
    (["--input=videos"], "--input=videos: expected photos, photos_tfds, folder:DIR or tfds:NAME"),
    (["--input=photos", "--loop=photos"],
     "--input, --loop, --report and --profile are separate"),
    (["--steps=0"], "--steps must be >= 1, got 0"),
])
def test_bad_bench_flags_are_one_line(args, line):
  r = run_cli("--config=mae", *args, module="mae_jax.bench", env_extra=ONE_DEVICE)
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
  assert line in r.stderr, r.stderr


def test_profile_splits_the_step_by_kernel_kind_and_model_part(tmp_path):
  rows, out = _bench("--config=mae", "--batch_size=8", "--matmul_size=128",
                     "--config.image_size=16", "--config.model.decoder_depth=1",
                     f"--profile={tmp_path / 'trace'}")
  r = rows[-1]
  parts = {(p["part"], p["kind"]) for p in r["parts"]}
  # Every block's matmuls and elementwise work are found, in the encoder and the decoder.
  for where in ("encoder blocks", "decoder blocks"):
    for sub in ("attn", "mlp"):
      assert (f"{where} {sub}", "matmul") in parts, parts
  assert ("encoder blocks norm", "other") in parts, parts
  assert abs(sum(p["share"] for p in r["parts"]) - 1.0) < 1e-6
  # The kernels' summed time is about the step's (one kernel at a time on the CPU runtime).
  assert 0.3 * r["step_s"] < r["kernel_seconds"] < 3 * r["step_s"], r
  assert list((tmp_path / "trace").rglob("*.xplane.pb"))  # the trace, for TensorBoard / xprof
  assert "| all matmuls |" in out


def test_profile_by_operation_splits_forward_and_backward(tmp_path):
  rows, out = _bench("--config=mae", "--batch_size=8", "--matmul_size=128",
                     "--config.image_size=16", "--config.model.decoder_depth=1",
                     "--config.compute.attention=blocked", "--profile_by=op",
                     f"--profile={tmp_path / 'trace'}")
  ops = {p["part"]: p["kind"] for p in rows[-1]["parts"]}
  for direction in ("forward", "backward"):
    for where in ("encoder", "decoder"):
      assert ops.get(f"{direction} {where}/blocks/mlp/fc1/dot_general") == "matmul", ops
  # The attention product inside blocked attention's loop is its own row.
  assert any(op.startswith("forward decoder/blocks/attn/while/") and kind == "matmul"
             for op, kind in ops.items()), ops
  assert "| operation | kind | time | share |" in out
