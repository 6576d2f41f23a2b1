r"""Command-line entry point.

  python -m mae_jax.main --config=configs/mae.py[:variant] --workdir=DIR [--config.KEY=VALUE ...]

Multi-host: the same command on every host (see mae_jax.distributed for when and how the
processes join: --distributed, --coordinator_address, --num_processes, --process_id).

Dispatches on `config.task` (`mae_jax.tasks`). Problems the user can fix (bad config values, unknown keys, missing
datasets, unwritable workdirs, mismatched checkpoints) end with one line on stderr and exit code 2;
nothing in an existing workdir is touched before the config, data and workdir are validated.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mae_jax.cli import EXIT_USER_ERROR, config_value, exit_now, fail, parse_flags, quiet_orbax
from mae_jax.errors import UserError, first_line

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mae.py:vit_b16",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Join a multi-process JAX system: auto (explicit flags below, or SLURM with > 1 task), on "
    "(JAX's detection: Cloud TPU VM slices, GKE, Open MPI), off.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for explicit multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in an explicit run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in an explicit run.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a workdir with training keys that differ from its config.json (e.g. a longer "
    "schedule or another batch size); without it such a resume is refused.")


def run(config, workdir: str) -> None:
  # Imported here so that flag errors answer fast, without loading JAX and TensorFlow.
  from mae_jax import tasks
  tasks.run(config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)


def _is_io_error(e: BaseException) -> bool:
  """OSError or TensorFlow's file-system errors (tf.errors.OpError: gs:// reads and writes),
  raised or wrapped (tensorflow-datasets re-raises them as RuntimeError)."""
  while e is not None:
    if isinstance(e, OSError) or any(c.__name__ == "OpError" and
                                     c.__module__.startswith("tensorflow")
                                     for c in type(e).__mro__):
      return True
    e = e.__cause__ or e.__context__
  return False




def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.ERROR)  # JAX backend probing and Orbax notices are console noise.
  quiet_orbax()
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = config_value(_CONFIG)
  if not _WORKDIR.value:
    fail("--workdir is required")
  try:
    from mae_jax import distributed
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
    run(config, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    exit_now(EXIT_USER_ERROR)
  except KeyboardInterrupt:
    print("interrupted; the latest checkpoint is kept", file=sys.stderr)
    exit_now(130)
  except Exception as e:
    if not _is_io_error(e):
      raise
    # Disk full, permissions, an unreachable gs:// path: the cause in one line, not a trace.
    print(f"error: {first_line(e)}", file=sys.stderr)
    exit_now(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
