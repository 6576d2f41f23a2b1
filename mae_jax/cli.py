"""Command-line helpers shared by the entry points: one-line errors, exit code 2."""

from __future__ import annotations

import os
import sys
import threading

from absl import flags

EXIT_USER_ERROR = 2


def quiet_orbax() -> None:
  """Drops Orbax's log records below FATAL (its notices, and the tracebacks it logs from its
  writer threads when a save fails): the entry points report such failures in one line."""
  import logging as std_logging

  class _NotOrbax(std_logging.Filter):
    def filter(self, record) -> bool:
      return record.levelno >= std_logging.CRITICAL or "/orbax/" not in record.pathname

  std_logging.getLogger("absl").addFilter(_NotOrbax())
  previous, previous_thread_hook = sys.excepthook, threading.excepthook

  def closed_loop(value) -> bool:
    # TensorStore's callbacks of a failed save or restore, after Orbax closed its event loop.
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

  def hook(kind, value, tb):
    if not closed_loop(value):
      previous(kind, value, tb)

  def thread_hook(args):
    if not closed_loop(args.exc_value):
      previous_thread_hook(args)

  previous_unraisable = sys.unraisablehook

  def unraisable_hook(args):
    if not closed_loop(args.exc_value):
      previous_unraisable(args)

  sys.excepthook, threading.excepthook = hook, thread_hook
  sys.unraisablehook = unraisable_hook


def exit_now(code: int) -> None:
  """Exits with `code` without the interpreter's shutdown, after flushing stdout and stderr:
  after a failed checkpoint read or write, Orbax's and TensorStore's background threads can
  block the shutdown or print tracebacks from it. Only for a process's last act."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def run_then_exit(main, *args) -> None:
  """Runs an entry point's `main(*args)` and ends the process with its exit code (exit_now)."""
  try:
    main(*args)
  except SystemExit as e:
    exit_now(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
  exit_now(0)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _last_line(e: BaseException) -> str:
  """config_flags wraps load and override errors; the innermost useful sentence comes last."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def _unknown_key(e: KeyError) -> None:
  key = e.args[0] if e.args else e
  fail(f"unknown config key {key} (keys are locked; see the config file)")


def _moved_keys(argv: list[str]) -> None:
  """--config.KEY overrides of keys that moved (configlib.MOVED_KEYS) fail naming the new key."""
  from mae_jax.configlib import moved_key_message
  for arg in argv[1:]:
    if arg.startswith("--config."):
      message = moved_key_message(arg[len("--config."):].split("=", 1)[0])
      if message:
        fail(message)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (unknown keys, bad values, unknown variants);
  `--config=NAME[:VARIANT]` names a shipped config (mae_jax.config_files)."""
  from mae_jax import config_files
  from mae_jax.errors import UserError
  try:
    argv = config_files.resolve_argv(argv)
  except UserError as e:
    fail(str(e))
  _moved_keys(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(_last_line(e))
  except KeyError as e:  # a --config.KEY override for a key the config does not have.
    _unknown_key(e)
  except (OSError, ImportError, SyntaxError) as e:  # the config file itself failed to load.
    fail(f"cannot load the config file: {_last_line(e)}")
  except (AttributeError, TypeError, ValueError) as e:
    # Raised by config_flags while loading the config or applying --config.* overrides; an
    # unknown key arrives as AttributeError(KeyError) depending on the flags' order.
    if e.args and isinstance(e.args[0], KeyError):
      _unknown_key(e.args[0])
    fail(f"bad --config: {_last_line(e)}")
  return []


def config_value(holder, example: str = "configs/mae.py"):
  """The parsed --config; config files that fail to load (missing file, error inside
  get_config) are reported here, since config_flags defers those errors to first access."""
  try:
    config = holder.value
    if config is not None:
      config.keys()  # touches the lazily-loaded config.
  except (OSError, ImportError, SyntaxError, AttributeError, ValueError, TypeError) as e:
    fail(f"cannot load the config file: {_last_line(e)}")
  if config is None:
    fail(f"--config is required, e.g. --config={example}")
  return config
