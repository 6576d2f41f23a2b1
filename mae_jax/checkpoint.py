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

from mae_jax.errors import UserError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


class Checkpointer:
  """Async `CheckpointManager` with max_to_keep and a save interval."""

  def __init__(self, workdir: str, save_interval_steps: int, max_to_keep: int,
               create: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=create,
        enable_async_checkpointing=True)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto `abstract_state`'s shapes, dtypes and shardings; UserError on mismatch."""
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f"checkpoint {self.directory} step {step} does not match this config "
                      f"(a different model or method?): {first}") from None
    _check_shapes(abstract_state, restored["state"], f"{self.directory} step {step}")
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _check_shapes(expected: Any, got: Any, where: str) -> None:
  exp = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  have = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(got)}
  diffs = [f"{k}: {have.get(k)} vs {s}" for k, s in exp.items() if have.get(k) != s]
  if diffs:
    raise UserError(f"checkpoint {where} does not match this config; shapes (checkpoint vs "
                    f"config) differ for {len(diffs)} arrays, e.g. {'; '.join(diffs[:3])}")
