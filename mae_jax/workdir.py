"""A training workdir read back: its config.json, its checkpoints, partial restores of them.

  WORKDIR/config.json   the resolved config of the run (every run that trains writes it)
  WORKDIR/checkpoints/  Orbax checkpoints, items 'state' (params, opt_state, step, rng,
                        model_state) and 'meta' (mae_jax.checkpoint writes them)
  WORKDIR/best/         the best checkpoint by config.best_metric, where a run keeps one

Everything that reads a workdir of ours (downstream tasks, TinyMIM's teacher, conversion,
analysis) goes through this module, so each file has one reader and every "names or shapes
differ" problem is reported by one function, `describe_mismatch`. Nothing here writes.

Integrity: every checkpoint's meta holds a checksum of each array (`tree_checksums`, computed on
the devices when it is saved); readers verify the arrays they restore against it, so a flipped
bit, a truncated or a missing file is reported as a damaged checkpoint (`DamagedCheckpoint`, one
line) instead of loading wrong numbers or failing deep inside Orbax.
An evaluation needs the params only and must not rebuild the optimizer (its structure depends on
the pretraining config): the abstract tree is read from the checkpoint's own metadata and only
the wanted subtrees of 'state' are restored (Orbax partial restore).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
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


# ----------------------------------------------------------------------------- integrity


class DamagedCheckpoint(UserError):
  """A checkpoint whose files cannot be read or whose arrays differ from their checksums."""


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as a flat uint32 vector (narrower dtypes widened, 64-bit ones split)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).ravel().astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """sum_i word_i * (2i + 1) mod 2**32. Odd weights make every single-bit flip change the sum
  (2**k * odd is never 0 mod 2**32) and position-dependent; integer addition mod 2**32 is exact
  in any order, so the value does not depend on the sharding or the device count."""
  w = _words(x)
  weights = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.sum(w * weights, dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def tree_checksums(tree) -> dict[str, int]:
  """{'params/encoder/...': checksum} of every array of `tree` (sharded arrays included: the
  sums run where the arrays live and only the scalars are fetched)."""
  sums = jax.device_get(_checksums(tree))
  return {name: int(v) for name, v in zip(flat_shapes(tree), jax.tree.leaves(sums))}


def verify_checksums(tree, expected: Optional[Mapping[str, int]], where: str,
                     prefix: str = "") -> None:
  """DamagedCheckpoint unless every array of `tree` has its stored checksum (`expected`, from
  the checkpoint's meta; arrays named `prefix` + name there). Checkpoints written before
  checksums were stored (`expected` None) pass."""
  if not expected:
    return
  got = tree_checksums(tree)
  bad = [name for name, v in got.items()
         if prefix + name in expected and int(expected[prefix + name]) != v]
  if bad:
    differ = _listed("arrays differ from their checksums", bad, 3)
    raise DamagedCheckpoint(f"checkpoint {where} is damaged: {differ}")


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


def read_state_metadata(manager, step: int) -> tuple[Optional[dict], Optional[str]]:
  """(the checkpoint's state metadata tree: shapes and dtypes, no arrays; None) or
  (None, why it is damaged)."""
  try:
    stored = manager.item_metadata(step)["state"]
    stored = getattr(stored, "tree", stored)  # TreeMetadata -> nested dict
  except Exception as e:  # Orbax raises many types for missing or truncated metadata files.
    return None, f"its state metadata is unreadable ({first_line(e)})"
  return (stored, None) if stored else (None, "its state metadata is missing")


def _stored_state(manager, directory, step: int) -> dict:
  stored, error = read_state_metadata(manager, step)
  if error:
    raise DamagedCheckpoint(f"checkpoint {directory} step {step} is damaged: {error}"
                            f"{_other_steps(manager, step)}")
  return stored


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
    others = _other_steps(manager, step)
    stored = _stored_state(manager, directory, step)
    wanted = {k: stored[k] for k in keys if k in stored and jax.tree.leaves(stored[k])}
    if keys[0] not in wanted:
      raise UserError(f"checkpoint {directory} step {step} has no readable state.{keys[0]}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            wanted)
    where = f"{directory} step {step}"
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=abstract, partial_restore=True,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # missing or truncated array files, a missing meta item, ...
      raise DamagedCheckpoint(f"checkpoint {where} is damaged: {first_line(e)}{others}") from None
  finally:
    manager.close()
  meta = dict(restored["meta"] or {})
  state = dict(restored["state"])
  try:
    verify_checksums(state, meta.get("checksums"), where)
  except DamagedCheckpoint as e:
    raise DamagedCheckpoint(f"{e}{others}") from None
  meta.pop("checksums", None)
  return {k: unstack_blocks(v) for k, v in state.items()}, meta


def _other_steps(manager, step: int) -> str:
  others = [s for s in sorted(manager.all_steps()) if s != step]
  return f" (other checkpoints there: steps {others})" if others else ""


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
