"""Evaluators the training loop runs, built from `config.evals` by one factory.

  config.evals.<name> = dict(type=TYPE, every_steps=N, ...)   # or every_epochs=E

`type` names a module `mae_jax/evaluators/<type>.py` defining `DEFAULTS` (every key the entry may
set, with its default), `Evaluator(cfg, ctx)` (`due(step)`, `run(state)`; see
`mae_jax.evaluators.base`) and optionally `CHECKS` (`configlib.check` rules of its keys, applied
by `check_config`). Results are logged as '<name>/<metric>'; `config.best_metric` (e.g.
'classification/top1') names the one that keeps WORKDIR/best. Every entry takes
`every_steps` or `every_epochs` (used when every_steps is 0); with both 0 it is off. Adding an
evaluator is one file here plus one config entry.
"""

from __future__ import annotations

import importlib
import math

import ml_collections

from mae_jax import configlib
from mae_jax.errors import UserError
from mae_jax.evaluators.base import Context, Periodic

__all__ = ["Context", "Periodic", "build", "check_config"]

# Keys every entry takes, beside its type's DEFAULTS, and their rules.
COMMON = {"every_steps": 0, "every_epochs": 0.0}
COMMON_CHECKS = {"every_steps": configlib.integer("[0, inf)"),
                 "every_epochs": configlib.number("[0, inf)")}  # both 0 = off.


def _module(name: str, entry) -> object:
  kind = entry.get("type", "") if isinstance(entry, (dict, ml_collections.ConfigDict)) else ""
  if not kind or not str(kind).isidentifier() or kind == "base":
    raise UserError(f"config.evals.{name} needs type=NAME, a module of mae_jax/evaluators "
                    f"(knn, heldout, classification, ...); got {kind!r}")
  module_name = f"mae_jax.evaluators.{kind}"
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      raise UserError(f"config.evals.{name}: unknown type {kind!r}: there is no "
                      f"mae_jax/evaluators/{kind}.py") from None
    raise
  return module


def _resolved(name: str, entry, module) -> ml_collections.ConfigDict:
  """The entry with the type's defaults filled in; UserError for keys the type does not take
  and for values its rules refuse."""
  defaults = dict(COMMON, **module.DEFAULTS, type=entry["type"])
  unknown = sorted(set(entry.keys()) - set(defaults))
  if unknown:
    raise UserError(f"config.evals.{name} ({entry['type']}): unknown key(s) "
                    f"{', '.join(unknown)}; it takes {', '.join(sorted(defaults))}")
  # Merged before the ConfigDict is made: its type checks would turn a wrong type into a
  # TypeError; the rules below name it.
  cfg = ml_collections.ConfigDict({**defaults, **dict(entry)})
  configlib.check(cfg, {**COMMON_CHECKS, **getattr(module, "CHECKS", {})},
                  where=f"config.evals.{name}")
  return cfg


def _is_on(cfg) -> bool:
  return cfg.every_steps > 0 or cfg.every_epochs > 0


def check_config(config) -> None:
  """Every entry of config.evals names a known type and only its keys; config.best_metric
  names an entry. Needs no data or model: run before anything is built."""
  evals = config.get("evals") or {}
  resolved = {name: _resolved(name, entry, _module(name, entry)) for name, entry in evals.items()}
  best = config.get("best_metric", "")
  if best:
    entry = resolved.get(best.split("/", 1)[0])
    if "/" not in best or entry is None or not _is_on(entry):
      raise UserError(f"config.best_metric={best!r} must be '<eval>/<metric>' of an evaluator "
                      f"that runs; config.evals has {sorted(evals) or 'none'}")


def build(config, ctx: Context) -> list:
  """The evaluators of config.evals that are on, in config order, with every_epochs turned into
  every_steps; each checks its own values and data (UserError) before the workdir is touched."""
  out = []
  for name, entry in (config.get("evals") or {}).items():
    module = _module(name, entry)
    cfg = _resolved(name, entry, module)
    if _is_on(cfg):
      if not cfg.every_steps:
        cfg.every_steps = max(1, int(math.floor(cfg.every_epochs * ctx.steps_per_epoch + 0.5)))
      evaluator = module.Evaluator(cfg, ctx)
      evaluator.name = name
      out.append(evaluator)
  return out
