"""Command-line helpers shared by the entry points: one-line errors, exit code 2."""

from __future__ import annotations

import sys

from absl import flags

EXIT_USER_ERROR = 2


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
  """absl flag parsing with one-line errors (unknown keys, bad values, unknown variants)."""
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
