"""Config files by path or by short name.

`--config=configs/mae.py:vit_b16` (a file) and `--config=mae:vit_b16` (a shipped config, the
file `mae.py` of the package `mae_jax.configs`, which is the checkout's top-level `configs/`
folder) name the same config, so an installed wheel runs from any directory.
"""

from __future__ import annotations

import importlib.util
import os
import re
import ml_collections

from mae_jax.errors import UserError

_SHORT = re.compile(r"[a-z_][a-z0-9_]*")  # a shipped config's name: a Python module name.


def shipped_dir() -> str:
  """The folder of the shipped config files (installed package, else the checkout's)."""
  spec = importlib.util.find_spec("mae_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  # Run from a checkout without installing (PYTHONPATH=.): configs/ beside the package.
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(shipped_dir())
                if f.endswith(".py") and not f.startswith("_"))


def resolve(spec: str) -> str:
  """'mae:vit_b16' -> '/.../configs/mae.py:vit_b16'; a spec whose file exists is returned as
  it is. UserError for a name that is neither a file nor a shipped config."""
  file, sep, variant = spec.partition(":")
  if os.path.exists(file) or not _SHORT.fullmatch(file):
    return spec
  if file not in shipped_names():
    raise UserError(f"config {file!r} is neither a file nor a shipped config (one of "
                    f"{', '.join(shipped_names())}; or pass a path to a .py file)")
  return os.path.join(shipped_dir(), f"{file}.py") + sep + variant


def resolve_argv(argv: list[str]) -> list[str]:
  """argv with `--config=NAME[:VARIANT]` / `--config NAME[:VARIANT]` resolved to the file."""
  out, after_flag = [], False
  for arg in argv:
    if after_flag:
      arg, after_flag = resolve(arg), False
    elif arg.startswith("--config="):
      arg = "--config=" + resolve(arg[len("--config="):])
    elif arg == "--config":
      after_flag = True
    out.append(arg)
  return out


def load(spec: str, **overrides) -> ml_collections.ConfigDict:
  """get_config(variant) of the file or shipped config `spec` ('mae', 'configs/knn.py:base'),
  with top-level `overrides` set."""
  file, _, variant = resolve(spec).partition(":")
  if not os.path.isfile(file):
    raise UserError(f"config file {file} not found")
  name = "_mae_jax_config_" + re.sub(r"\W", "_", os.path.abspath(file))
  module_spec = importlib.util.spec_from_file_location(name, file)
  if module_spec is None:
    raise UserError(f"config file {file} is not a Python file (.py)")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  for key, value in overrides.items():
    setattr(config, key, value)
  return config
