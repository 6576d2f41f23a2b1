"""A training workdir read back: its config.json, its checkpoints, partial restores of them.

  WORKDIR/config.json   the resolved config of the run (every run that trains writes it)
  WORKDIR/checkpoints/  Orbax checkpoints, items 'state' (params, opt_state, step, rng,
                        model_state) and 'meta' (mae_jax.checkpoint writes them)
  WORKDIR/best/         the best checkpoint by config.best_metric, where a run keeps one

Everything that reads a workdir of ours (downstream tasks, TinyMIM's teacher, conversion,
analysis) goes through this module, so each file has one reader and every "names or shapes
differ" problem is reported by one function, `describe_mismatch`. Nothing here writes.
An evaluation needs the params only and must not rebuild the optimizer (its structure depends on
the pretraining config): the abstract tree is read from the checkpoint's own metadata and only
the wanted subtrees of 'state' are restored (Orbax partial restore).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from mae_jax.errors import UserError, first_line
from mae_jax.models.vit import unstack_blocks

CONFIG_FILE = "config.json"
Params = Any


def absolute(path: str) -> str:
  """Local paths made absolute (Orbax refuses relative ones); gs:// and other URLs unchanged."""
  return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(workdir: str, name: str = "checkpoints") -> str:
  return os.path.join(absolute(workdir), name)


def read_config(workdir: str, role: str = "a training workdir",
                name: str = CONFIG_FILE) -> ml_collections.ConfigDict:
  """WORKDIR/config.json (or WORKDIR/`name`) as a ConfigDict; UserError naming `role` (what
  the path should be) when the folder or the file is missing or the file is not JSON."""
  path = epath.Path(absolute(workdir))
  if not path.exists():
    raise UserError(f"{workdir} does not exist (no {name}): it must be {role}")
  file = path / name
  if not file.exists():
    raise UserError(f"{workdir} has no {name}: it must be {role}")
  try:
    return ml_collections.ConfigDict(json.loads(file.read_text()))
  except json.JSONDecodeError as e:
    raise UserError(f"{file} is not valid JSON: {first_line(e)}") from None


# ----------------------------------------------------------------------------- shapes


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'encoder/blocks_0/attn/qkv/kernel': shape, ...} of any pytree of arrays, abstract arrays
  or Orbax metadata (optimizer states included: 'opt_state/0/mu/...')."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {"/".join(_key_name(k) for k in path): tuple(v.shape) for path, v in leaves}


def _listed(what: str, names: list[str], limit: int) -> str:
  more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
  return f"{len(names)} {what}: {', '.join(names[:limit])}{more}"


def describe_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any],
                      limit: int = 6) -> str:
  """'' when `got` has exactly `expected`'s names and shapes, else one line: 'N missing: ...;
  N unexpected: ...; N shapes differ: name (got) vs (expected)'. Both map names to shapes."""
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  wrong = [f"{k} {tuple(got[k])} vs {tuple(s)}" for k, s in expected.items()
           if k in got and tuple(got[k]) != tuple(s)]
  parts = ([_listed("missing", missing, limit)] if missing else []) + (
      [_listed("unexpected", unexpected, limit)] if unexpected else []) + (
      [_listed("shapes differ (have vs want)", wrong, limit)] if wrong else [])
  return "; ".join(parts)


def check_fits(expected: Params, got: Params, where: str = "pretrained params") -> None:
  """UserError (one line) unless the params tree `got` has exactly `expected`'s array names and
  shapes; `where` names the source of `got`."""
  problem = describe_mismatch(flat_shapes(expected), flat_shapes(got))
  if problem:
    raise UserError(f"{where} does not fit the model: {problem}")


# ----------------------------------------------------------------------------- checkpoints


def find_checkpoints(path: str) -> epath.Path:
  """WORKDIR/checkpoints if it exists, else `path` itself (a checkpoints folder)."""
  p = epath.Path(absolute(path))
  if not p.exists():
    raise UserError(f"checkpoint path {path} does not exist")
  sub = epath.Path(checkpoint_dir(path))
  return sub if sub.is_dir() else p


def _manager(directory) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def _pick_step(manager, directory, step: Optional[int]) -> int:
  steps = sorted(manager.all_steps())
  if not steps:
    raise UserError(f"no checkpoints in {directory}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise UserError(f"no checkpoint for step {step} in {directory}; it has steps {steps}")
  return step


def _stored_state(manager, directory, step: int) -> dict:
  """The checkpoint's state metadata tree (shapes and dtypes, no arrays)."""
  try:
    stored = manager.item_metadata(step)["state"]
    return getattr(stored, "tree", stored)  # TreeMetadata -> nested dict
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise UserError(f"checkpoint {directory} step {step} has no readable state: "
                    f"{first_line(e)}") from None


def stored_shapes(path: str, key: str = "params", step: Optional[int] = None
                  ) -> tuple[int, dict]:
  """(step, {'encoder/blocks_0/attn/qkv/kernel': shape, ...}) of state[key] in the latest
  checkpoint under `path` (or at `step`), per-block layout, from Orbax metadata only: no array
  is read."""
  directory = find_checkpoints(path)
  manager = _manager(directory)
  try:
    step = _pick_step(manager, directory, step)
    stored = _stored_state(manager, directory, step)
    if key not in stored:
      raise UserError(f"checkpoint {directory} step {step} has no state.{key}")
    tree = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored[key])
  finally:
    manager.close()
  return step, flat_shapes(jax.eval_shape(unstack_blocks, tree))


def restore_items(path: str, keys: tuple[str, ...] = ("params",), step: Optional[int] = None,
                  sharding: Optional[jax.sharding.Sharding] = None) -> tuple[dict, dict]:
  """({key: subtree} of the checkpoint's state for each of `keys` it has, meta) of the latest
  checkpoint under `path` (a workdir or a checkpoints folder), or of `step`. Only those subtrees
  are read (Orbax partial restore), onto `sharding` (default: the first local device), in the
  per-block layout (a compute.scan run stores its blocks stacked)."""
  directory = find_checkpoints(path)
  manager = _manager(directory)
  try:
    step = _pick_step(manager, directory, step)
    stored = _stored_state(manager, directory, step)
    wanted = {k: stored[k] for k in keys if k in stored and jax.tree.leaves(stored[k])}
    if keys[0] not in wanted:
      raise UserError(f"checkpoint {directory} step {step} has no readable state.{keys[0]}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            wanted)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
        meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  state = {k: unstack_blocks(v) for k, v in dict(restored["state"]).items()}
  return state, dict(restored["meta"])


def load_params(path: str, step: Optional[int] = None,
                sharding: Optional[jax.sharding.Sharding] = None) -> tuple[Params, dict]:
  """(params, meta) of the latest checkpoint under `path` (a workdir or its checkpoints folder),
  or of `step`."""
  items, meta = restore_items(path, ("params",), step, sharding)
  return items["params"], meta


def subtree(params: Params, key: str, where: str = "pretrained params") -> Params:
  """params[key] (e.g. the encoder of a pretraining tree); UserError naming what is there."""
  if key not in params:
    raise UserError(f"{where} have no {key!r} subtree; they have {sorted(params)}")
  return params[key]
