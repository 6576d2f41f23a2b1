"""Pretraining methods. A method is a model, a masking rule and a loss; nothing else.

Each method is one module `mae_jax/methods/<name>.py` that defines a class `Method` (a subclass of
`mae_jax.methods.base.Method`). `config.method = '<name>'` selects it; the training loop never
names a method, so adding one needs no edit outside its module and its config.
"""

from __future__ import annotations

import importlib
from typing import Optional

from mae_jax.errors import UserError
from mae_jax.methods.base import Method


def _module(config):
  """The module `mae_jax.methods.<config.method>`; UserError if there is none."""
  name = config.method
  if not name or not name.isidentifier() or name == "base":
    raise UserError(f"config.method={name!r} is not a method name")
  module_name = f"mae_jax.methods.{name}"
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      raise UserError(f"unknown method {name!r}: there is no mae_jax/methods/{name}.py") from None
    raise


def check_config(config) -> None:
  """config.method names a method and its keys hold values it can use (`Method.check_config`);
  builds nothing."""
  _module(config).Method.check_config(config)


def get_method(config, total_steps: Optional[int] = None) -> Method:
  """`mae_jax.methods.<config.method>.Method(config, total_steps)`, its keys validated;
  `total_steps` is the run's length (None outside a training run)."""
  return _module(config).Method(config, total_steps)
