"""Orbax checkpoints under WORKDIR/checkpoints: train state plus a small JSON record.

Each checkpoint holds two items: `state` (params, optimizer state, step, RNG key) and `meta`
(step, epoch position, global batch, method), so a resumed run knows where its data stream was.
Works for local paths and gs:// alike; every process must call `save` in multi-host runs.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from mae_jax.errors import UserError, first_line


def absolute(path: str) -> str:
  """Local paths made absolute (Orbax refuses relative ones); gs:// and other URLs unchanged."""
  return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(workdir: str, name: str = "checkpoints") -> str:
  return os.path.join(absolute(workdir), name)


class Checkpointer:
  """Async `CheckpointManager` keeping the newest `max_to_keep` checkpoints.

  The caller decides when to save (the training loop: every config.checkpoint_every_steps, at
  the end and when stopping), so every `save` is written.
  """

  def __init__(self, workdir: str, max_to_keep: int, create: bool = True,
               name: str = "checkpoints"):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=True)
    self.directory = checkpoint_dir(workdir, name)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> bool:
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto `abstract_state`'s shapes, dtypes and shardings; UserError on mismatch.

    Shapes are compared with the checkpoint's metadata first, so a mismatch is reported before
    any array is read.
    """
    where = f"{self.directory} step {step}"
    try:
      stored = self.manager.item_metadata(step)["state"]
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise UserError(f"checkpoint {where} is unreadable: {first_line(e)}") from None
    _check_shapes(abstract_state, stored, where)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"checkpoint {where} does not match this config "
                      f"(a different model or method?): {first_line(e)}") from None
    return restored["state"], dict(restored["meta"])

  def best_metric(self, key: str) -> Optional[float]:
    """`meta[key]` of the newest checkpoint here (the best one so far in WORKDIR/best)."""
    step = self.latest_step()
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    value = dict(meta["meta"]).get(key)
    return None if value is None else float(value)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _names(path) -> str:
  """'opt_state.0.mu.encoder.cls_token': the dotted name Orbax stores an array under."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return ".".join(parts)


def _check_shapes(expected: Any, stored: Any, where: str) -> None:
  exp = {_names(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  have = {_names(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored)}
  missing = sorted(set(exp) - set(have))
  extra = sorted(set(have) - set(exp))
  diffs = [f"{k}: {have[k]} vs {s}" for k, s in exp.items() if k in have and have[k] != s]
  if missing or extra or diffs:
    detail = "; ".join(diffs[:3] + [f"missing {k}" for k in missing[:2]] +
                       [f"unexpected {k}" for k in extra[:2]])
    raise UserError(f"checkpoint {where} does not match this config (a different model or "
                    f"method?): {len(diffs)} shapes differ, {len(missing)} arrays missing, "
                    f"{len(extra)} unexpected; e.g. {detail}")
