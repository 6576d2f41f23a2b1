"""Orbax checkpoints under WORKDIR/checkpoints: train state plus a small JSON record.

Each checkpoint holds two items: `state` (the TrainState: params, optimizer state, step, RNG key
and model_state, the non-differentiated part such as BatchNorm statistics, frozen encoders or a
distillation teacher) and `meta` (step, epoch position, global batch, method, and evaluation
results of a best checkpoint), so a resumed run knows where its data stream was. Works for local
paths and gs:// alike; every process must call `save` in multi-host runs. Readers that need only
parts of a checkpoint use `mae_jax.workdir`.
"""

from __future__ import annotations

from typing import Any, Optional

import orbax.checkpoint as ocp

from mae_jax.errors import UserError, first_line
from mae_jax.workdir import checkpoint_dir, describe_mismatch, flat_shapes


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
    problem = describe_mismatch(flat_shapes(abstract_state), flat_shapes(stored))
    if problem:
      raise UserError(f"checkpoint {where} does not match this config (a different model or "
                      f"method?): {problem}")
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"checkpoint {where} does not match this config "
                      f"(a different model or method?): {first_line(e)}") from None
    return restored["state"], dict(restored["meta"])

  def best_metric(self, key: str) -> Optional[float]:
    """`meta[key]` of the newest checkpoint here (the best one so far in WORKDIR/best).

    Best checkpoints written before evaluators had names store 'top1' for
    'classification/top1': the last part of `key` is looked up when the whole is absent."""
    step = self.latest_step()
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = dict(meta["meta"])
    value = meta.get(key, meta.get(key.rsplit("/", 1)[-1]))
    return None if value is None else float(value)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
