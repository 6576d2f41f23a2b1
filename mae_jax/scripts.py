"""Console scripts of the wheel (setup.cfg): the same entry points as `python -m ...`.

  mae-jax-train    = python -m mae_jax.main
  mae-jax-convert  = python -m mae_jax.convert
  mae-jax-analyze  = python -m mae_jax.analyze
  mae-jax-bench    = python -m mae_jax.bench
"""

from __future__ import annotations

import sys

from absl import app

from mae_jax.cli import parse_flags, run_then_exit


def train() -> None:
  from mae_jax import main
  app.run(main.main, flags_parser=parse_flags)


def convert() -> None:
  from mae_jax.convert.__main__ import main
  run_then_exit(main, sys.argv[1:])


def analyze() -> None:
  from mae_jax.analyze.__main__ import main
  run_then_exit(main)


def bench() -> None:
  from mae_jax.bench.__main__ import main
  app.run(main, flags_parser=parse_flags)
