"""Files that are replaced are written to a temporary name and renamed, so a reader (or a run
killed mid-write) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import uuid

import tensorflow as tf


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` through `path`.tmp-<random> and a rename (local, gs:// alike).

  Local files are fsync'ed before the rename, so a crash right after it leaves the new bytes."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  mode = "wb" if isinstance(data, bytes) else "w"
  try:
    if "://" in path:
      with tf.io.gfile.GFile(tmp, mode) as f:
        f.write(data)
      tf.io.gfile.rename(tmp, path, overwrite=True)
      return
    with open(tmp, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      tf.io.gfile.remove(tmp)
    except (tf.errors.OpError, OSError):
      pass
    raise
