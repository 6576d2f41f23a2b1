"""Orbax checkpoints under WORKDIR/checkpoints: train state plus a small JSON record.

Each checkpoint holds two items: `state` (the TrainState: params, optimizer state, step, RNG key
and model_state, the non-differentiated part such as BatchNorm statistics, frozen encoders or a
distillation teacher) and `meta` (step, epoch position, global batch, method, evaluation results
of a best checkpoint, and a checksum of every array), so a resumed run knows where its data
stream was and can prove its arrays are the ones that were saved. Works for local paths and gs://
alike; every process must call `save` in multi-host runs. Readers that need only parts of a
checkpoint use `mae_jax.workdir`.

Faults: a checkpoint that cannot be read back or fails its checksums (`DamagedCheckpoint`) is
moved to WORKDIR/<name>.damaged/ (never deleted) and the run resumes from the newest intact one;
a save that fails (disk full, permissions, network) ends the run with `CheckpointWriteError`, one
line naming the cause, instead of Orbax's tracebacks from its background threads.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mae_jax.errors import UserError, first_line
from mae_jax.workdir import (DamagedCheckpoint, checkpoint_dir, describe_mismatch,
                             flat_shapes, read_state_metadata, tree_checksums,
                             verify_checksums)


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (disk full, no permission, unreachable storage)."""


def root_cause(e: BaseException) -> str:
  """The innermost OS-level reason in `e`'s chain ('[Errno 28] No space left on device: path'),
  else its first line: Orbax wraps the error of its writer threads several times."""
  seen, todo = set(), [e]
  while todo:
    x = todo.pop(0)
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, OSError) and x.errno is not None:
      where = f": {x.filename}" if x.filename else ""
      return f"[Errno {x.errno}] {x.strerror}{where}"
    # TensorStore's writers report the OS error as text: '...Failed writing: "PATH": ...
    # [os_error_code='28']'.
    code = re.search(r"os_error_code='(\d+)'", str(x))
    if code:
      path = re.search(r'Failed \w+: "([^"]+)"', str(x))
      where = f": {path.group(1)}" if path else ""
      return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}{where}"
    todo += [x.__cause__, x.__context__]
  return first_line(e)


def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (a restore can fail on one process only, for a file
  only it reads)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """Async `CheckpointManager` keeping the newest `max_to_keep` checkpoints.

  The caller decides when to save (the training loop: every config.checkpoint_every_steps, at
  the end and when stopping), so every `save` is written. The loop saves only finite states, so
  the rotation never drops a good checkpoint for a bad one.
  """

  def __init__(self, workdir: str, max_to_keep: int, create: bool = True,
               name: str = "checkpoints"):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=True)
    self.directory = checkpoint_dir(workdir, name)
    self.damaged_directory = f"{checkpoint_dir(workdir, name)}.damaged"
    self._failed: Optional[CheckpointWriteError] = None
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})
    except OSError as e:
      raise CheckpointWriteError(f"cannot open checkpoints in {self.directory}: "
                                 f"{root_cause(e)}") from None

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _write_failed(self, e: BaseException) -> CheckpointWriteError:
    self._failed = CheckpointWriteError(f"cannot write checkpoints in {self.directory}: "
                                        f"{root_cause(e)}")
    return self._failed

  def save(self, step: int, state: Any, meta: dict) -> bool:
    """Starts writing `state` (async); raises CheckpointWriteError for this save or an earlier
    one that failed in the background."""
    if self._failed:
      raise self._failed
    meta = {**meta, "checksums": tree_checksums(state)}
    try:
      return self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # the previous async save's error surfaces here too.
      raise self._write_failed(e) from None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto `abstract_state`'s shapes, dtypes and shardings and verifies the checksums.

    UserError when the checkpoint is of another model (shapes are compared with its metadata
    first, so nothing is read); DamagedCheckpoint when its files cannot be read or its arrays
    differ from their checksums.
    """
    where = f"{self.directory} step {step}"
    stored, error = read_state_metadata(self.manager, step)
    if not _all_agree(error is None):
      raise DamagedCheckpoint(f"checkpoint {where} is damaged: {error or 'on another process'}")
    problem = describe_mismatch(flat_shapes(abstract_state), flat_shapes(stored))
    if problem:
      raise UserError(f"checkpoint {where} does not match this config (a different model or "
                      f"method?): {problem}")
    restored, error = None, None
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
      if not isinstance(restored["meta"], dict):
        error = "its meta item is missing"
    except Exception as e:  # missing or truncated array files, a missing meta item, ...
      error = first_line(e)
    if not _all_agree(error is None):
      raise DamagedCheckpoint(f"checkpoint {where} is damaged: {error or 'on another process'}")
    meta = dict(restored["meta"])
    verify_checksums(restored["state"], meta.pop("checksums", None), where)
    return restored["state"], meta

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[Any, dict, int]]:
    """(state, meta, step) of the newest intact checkpoint, or None when there is none.

    Damaged ones on the way are reported in one line each and moved aside."""
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_state)
        return state, meta, step
      except DamagedCheckpoint as e:
        print(f"warning: {e}; moved it to {self.move_aside(step)}", flush=True)
    return None

  def move_aside(self, step: int) -> str:
    """Moves checkpoint `step` to <directory>.damaged/ (process 0; the others wait)."""
    target = epath.Path(self.damaged_directory) / str(step)
    if jax.process_index() == 0:
      n = 1
      while target.exists():
        target, n = epath.Path(self.damaged_directory) / f"{step}.{n}", n + 1
      target.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(self.directory, str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"mae_jax_move_aside_{step}")
    self.manager.reload()
    return str(target)

  def best_metric(self, key: str) -> Optional[float]:
    """`meta[key]` of the newest checkpoint here (the best one so far in WORKDIR/best).

    Best checkpoints written before evaluators had names store 'top1' for
    'classification/top1': the last part of `key` is looked up when the whole is absent. A
    damaged best checkpoint is moved aside (the next best result replaces it)."""
    step = self.latest_step()
    if step is None:
      return None
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = dict(meta["meta"])
    except Exception as e:  # the meta item is missing or truncated.
      print(f"warning: checkpoint {self.directory} step {step} is damaged: {first_line(e)}; "
            f"moved it to {self.move_aside(step)}", flush=True)
      return None
    value = meta.get(key, meta.get(key.rsplit("/", 1)[-1]))
    return None if value is None else float(value)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    """Waits for the saves in flight; CheckpointWriteError if one failed."""
    if self._failed:
      raise self._failed
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_failed(e) from None

  def close(self, timeout_s: float = 60.0) -> None:
    """Finishes and closes the manager, bounded: after a failed write Orbax's threads may never
    finish, so the close runs in a daemon thread that is abandoned after `timeout_s`."""
    if self._failed:
      return  # waiting on a failed save would raise again or block.
    done = threading.Event()

    def close():
      try:
        self.manager.close()
      except Exception as e:  # a save failed while closing: reported by the caller.
        self._write_failed(e)
      finally:
        done.set()

    threading.Thread(target=close, daemon=True).start()
    if not done.wait(timeout_s):
      raise CheckpointWriteError(f"writing checkpoints in {self.directory} did not finish "
                                 f"within {timeout_s:.0f}s")
    if self._failed:
      raise self._failed
