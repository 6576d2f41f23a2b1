"""Scalars to three places: a progress line, TensorBoard, and WORKDIR/metrics.jsonl."""

from __future__ import annotations

import datetime
import json
import os
from typing import Mapping

import tensorflow as tf
from tensorflow.core.framework import summary_pb2

# TensorBoard's scalar plugin tag. Written with the core `tf.summary.write` op, so logging needs
# only TensorFlow (tf.summary.scalar lives in the separate `tensorboard` package).
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


class MetricWriter:
  """Writes one JSON object per logged step and the same scalars as TensorBoard summaries.

  Only process 0 writes; the others are silent, so a pod run produces one log.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self._jsonl = tf.io.gfile.GFile(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    with self._tb.as_default(step=int(step)):
      for k, v in scalars.items():
        tf.summary.write(k, tf.constant(float(v), tf.float32), metadata=_SCALAR_METADATA)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def progress_line(step: int, total: int, scalars: Mapping[str, float], eta_s: float) -> str:
  parts = [f"step {step}/{total}"]
  for key, fmt in (("epoch", "{:.2f}"), ("loss", "{:.4f}"), ("lr", "{:.2e}"),
                   ("img_per_s", "{:.0f} img/s")):
    if key in scalars:
      value = fmt.format(scalars[key])
      parts.append(value if key == "img_per_s" else f"{key} {value}")
  parts.append(f"ETA {datetime.timedelta(seconds=int(max(eta_s, 0)))}")
  return " | ".join(parts)
