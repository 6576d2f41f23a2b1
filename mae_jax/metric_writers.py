"""Scalars to three places: a progress line, TensorBoard, and WORKDIR/metrics.jsonl; images to
TensorBoard. With config.wandb.enabled the same scalars and images also go to a Weights & Biases
run (`WandbRun`)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import secrets
import string
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from mae_jax import configlib
from mae_jax.atomic import write_atomic

# The W&B run id of a workdir: written before its first wandb.init, read by every resume.
WANDB_RUN_ID_FILE = "wandb_run_id"

# TensorBoard's scalar plugin tag. Written with the core `tf.summary.write` op, so logging needs
# only TensorFlow (tf.summary.scalar lives in the separate `tensorboard` package).
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
# TensorBoard's image plugin reads a string tensor [width, height, png, ...] with this tag.
_IMAGE_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images"))


class MetricWriter:
  """Writes one JSON object per logged step and the same scalars as TensorBoard summaries.

  Only process 0 writes; the others are silent, so a pod run produces one log. With `config`
  whose wandb.enabled is set, scalars and images also go to the workdir's W&B run (`WandbRun`,
  its config the run config). As a context manager, an exception marks the W&B run failed.
  """

  def __init__(self, workdir: str, enabled: bool = True, config=None):
    self.enabled = enabled
    self._wandb: Optional[WandbRun] = None
    if not enabled:
      return
    wandb_cfg = config.get("wandb") if config is not None else None
    if wandb_cfg is not None and wandb_cfg.enabled and wandb_cfg.mode != "disabled":
      self._wandb = WandbRun(workdir, wandb_cfg, json.loads(config.to_json_best_effort()))
    path = os.path.join(workdir, "metrics.jsonl")
    drop_torn_line(path)
    self._jsonl = tf.io.gfile.GFile(path, "a")
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")  # one write per line: a crash tears one at most.
    self._jsonl.flush()
    with self._tb.as_default(step=int(step)):
      for k, v in scalars.items():
        tf.summary.write(k, tf.constant(float(v), tf.float32), metadata=_SCALAR_METADATA)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(step, {k: float(v) for k, v in scalars.items()})

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """One TensorBoard image per tag: uint8 [H, W, 3] (or [H, W, 1]), stored as PNG."""
    if not self.enabled or not images:
      return
    with self._tb.as_default(step=int(step)):
      for k, image in images.items():
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3:
          raise ValueError(f"image {k!r} must be uint8 [H, W, C], got {image.dtype} {image.shape}")
        png = tf.io.encode_png(image)
        tensor = tf.stack([tf.constant(str(image.shape[1])), tf.constant(str(image.shape[0])),
                           png])
        tf.summary.write(k, tensor, metadata=_IMAGE_METADATA)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log_images(step, images)

  def close(self, failed: bool = False) -> None:
    """Closes the files, and finishes the W&B run (marked failed with `failed`)."""
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish(failed)
        self._wandb = None
      self.enabled = False

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    self.close(failed=exc_type is not None)
    return False


def new_wandb_run_id() -> str:
  """8 random characters of [0-9a-z], the form of the ids wandb draws itself."""
  return "".join(secrets.choice(string.digits + string.ascii_lowercase) for _ in range(8))


def wandb_run_id(workdir: str, new_id=new_wandb_run_id) -> str:
  """The W&B run id of `workdir`: WORKDIR/wandb_run_id, or `new_id()` written there first
  (atomically), so every later start of the run (a resume) logs into the same W&B run."""
  path = os.path.join(workdir, WANDB_RUN_ID_FILE)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      run_id = f.read().strip()
    if run_id:
      return run_id
  run_id = str(new_id())
  write_atomic(path, run_id + "\n")
  return run_id


class WandbRun:
  """One Weights & Biases run per workdir (the `wandb` extra, imported only here).

  wandb.init with config.wandb's project, entity ('' = the account's default), name ('' = the
  workdir's basename), mode and tags, the resolved run config, id = `wandb_run_id(workdir)` and
  resume='allow' (a resumed workdir continues its W&B run; a fresh one creates it). Its files go
  under WORKDIR/wandb (wandb's `dir`; for a gs:// workdir, wandb's default local directory).
  Scalars are logged at their training step; W&B keeps a step's values in one history row.
  Images need Pillow (wandb.Image); without it only scalars are logged.
  """

  def __init__(self, workdir: str, cfg, run_config: Mapping[str, Any]):
    wandb = configlib.import_wandb()
    self._wandb = wandb
    run_id = wandb_run_id(workdir)
    local = "://" not in workdir
    name = cfg.name or os.path.basename(workdir.rstrip("/")) or None
    self.run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=name,
                          mode=cfg.mode, tags=configlib.wandb_tags(cfg.tags) or None,
                          config=dict(run_config), id=run_id, resume="allow",
                          dir=workdir if local else None)
    self.run_id = run_id
    self._images = importlib.util.find_spec("PIL") is not None
    if not self._images:
      print("W&B: Pillow is not installed, so images go to TensorBoard only", flush=True)

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    self.run.log(dict(scalars), step=int(step))

  def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    if self._images:
      self.run.log({k: self._wandb.Image(np.asarray(v)) for k, v in images.items()},
                   step=int(step))

  def finish(self, failed: bool = False) -> None:
    self.run.finish(exit_code=1 if failed else 0)


def drop_torn_line(path: str) -> None:
  """Cuts a last line without its newline (a run killed while writing it) off a JSON-lines
  file, so appended records start on a line of their own."""
  if not tf.io.gfile.exists(path):
    return
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  if not data or data.endswith(b"\n"):
    return
  keep = data[:data.rfind(b"\n") + 1]
  if "://" in path:
    write_atomic(path, keep)
  else:
    with open(path, "r+b") as f:
      f.truncate(len(keep))


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file, in order; a torn last line is left out."""
  with tf.io.gfile.GFile(path) as f:
    lines = [line for line in f.read().split("\n") if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise
  return records


def progress_line(step: int, total: int, scalars: Mapping[str, float], eta_s: float) -> str:
  parts = [f"step {step}/{total}"]
  for key, fmt in (("epoch", "{:.2f}"), ("loss", "{:.4f}"), ("lr", "{:.2e}"),
                   ("img_per_s", "{:.0f} img/s")):
    if key in scalars:
      value = fmt.format(scalars[key])
      parts.append(value if key == "img_per_s" else f"{key} {value}")
  if scalars.get("skipped_steps"):
    parts.append(f"skipped {scalars['skipped_steps']:.0f} non-finite steps")
  parts.append(f"ETA {datetime.timedelta(seconds=int(max(eta_s, 0)))}")
  return " | ".join(parts)
