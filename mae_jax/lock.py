"""One run per workdir: WORKDIR/run.lock, taken before anything else is written.

Local folders (and NFS) use `fcntl.flock`, which the kernel releases when the process dies, so
a run killed with -9 never leaves a lock behind; the file's content (host, pid, start time)
names the holder in the refusal, and a previous holder that did not finish cleanly is reported
when its lock is taken over. Object stores (gs://) have no locks: there the file itself is the
lock, checked and written best-effort (two runs started within the same second can both pass),
and a lock of this host whose pid is gone is taken over.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Optional

import jax
import numpy as np
import tensorflow as tf

from mae_jax.errors import UserError

LOCK_FILE = "run.lock"


def _describe(owner: dict) -> str:
  return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started "
          f"{owner.get('started', '?')}")


def _parse(text: str) -> Optional[dict]:
  try:
    owner = json.loads(text)
  except json.JSONDecodeError:
    return None
  return owner if isinstance(owner, dict) else None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process.
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds WORKDIR/run.lock for the block; UserError (one line) when
  another run holds it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: Optional[int] = None
    self._remote = "://" in workdir

  def _owner(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}

  def _refuse(self, holder: Optional[dict]) -> UserError:
    who = f" ({_describe(holder)})" if holder else ""
    return UserError(f"workdir {self.workdir} is in use by another run{who}; wait for it to "
                     f"finish or stop it (the lock is {self.path})")

  def _notice(self, previous: dict) -> None:
    print(f"notice: taking over the lock of an earlier run that did not finish cleanly "
          f"({_describe(previous)})", flush=True)

  def acquire(self) -> "WorkdirLock":
    if self._remote:
      return self._acquire_remote()
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
      os.close(fd)
      raise self._refuse(holder) from None
    previous = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
    if previous:  # a holder that released nothing: killed, or its host went down.
      self._notice(previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(self._owner()).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def _acquire_remote(self) -> "WorkdirLock":
    if tf.io.gfile.exists(self.path):
      with tf.io.gfile.GFile(self.path) as f:
        holder = _parse(f.read())
      stale = (holder and holder.get("host") == socket.gethostname()
               and not _alive(int(holder.get("pid", 0))))
      if not stale:
        raise self._refuse(holder)
      self._notice(holder)
    with tf.io.gfile.GFile(self.path, "w") as f:
      f.write(json.dumps(self._owner()))
    self._fd = -1
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    if self._remote:
      tf.io.gfile.remove(self.path)
    else:  # emptied, not removed: removing a flock'ed file races with a run opening it.
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def hold(workdir: str):
  """Holds the workdir's lock for a run of any number of processes: process 0 takes it and
  every process learns whether it got it, so all of them refuse together."""
  lock, error = WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    got = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not got and error is None:
      error = UserError(f"workdir {workdir} is in use by another run (process 0 could not "
                        f"take {lock.path})")
  if error:
    raise error
  try:
    yield lock
  finally:
    lock.release()
