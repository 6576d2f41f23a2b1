"""Reading and writing PyTorch weight files safely: .safetensors, or .pth loaded weights-only.

Nothing here unpickles arbitrary objects: .safetensors files hold raw arrays and a JSON header;
.pth/.pt files go through `torch.load(weights_only=True)`, whose unpickler accepts tensors,
containers and primitive values only (plus `argparse.Namespace`, the `args` entry of the official
MAE / ConvMAE training checkpoints, a plain attribute bag). torch is imported lazily: it is the
optional `torch` extra, needed for .pth files only; .safetensors works with numpy alone.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from typing import Any, Optional

import numpy as np

from mae_jax.errors import UserError, first_line

StateDict = dict[str, np.ndarray]
SAFETENSORS = (".safetensors",)
TORCH = (".pth", ".pt", ".bin", ".ckpt")
INSTALL = 'pip install "mae-jax[torch]" (torch, torchvision, timm)'
# An entry our .pth exports add beside 'model': the resolved config as JSON (safetensors files
# keep the same in their metadata under this key), so an import rebuilds the same model.
META_KEY = "mae_jax"


def require(module: str):
  """Imports torch / safetensors, or a one-line UserError saying how to install them."""
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError:
    raise UserError(f"{module} is not installed; PyTorch conversion needs the torch extra: "
                    f"{INSTALL}") from None


def file_type(path: str) -> str:
  """'safetensors' or 'torch', by the file's first bytes; UserError for anything else."""
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist")
  if os.path.isdir(path):
    raise UserError(f"{path} is a directory, not a .safetensors or .pth file (to export an "
                    "Orbax workdir use `python -m mae_jax.convert export --workdir=...`)")
  with open(path, "rb") as f:
    head = f.read(9)
  if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save zip, or legacy pickle.
    return "torch"
  if len(head) == 9 and head[8:9] == b"{":
    (n,) = struct.unpack("<Q", head[:8])
    if 0 < n <= os.path.getsize(path) - 8:
      return "safetensors"
  raise UserError(f"wrong file type: {path} is neither a .safetensors file nor a PyTorch .pth "
                  f"checkpoint (it starts with {head[:8]!r})")


def _unpickler_reason(e: BaseException) -> str:
  """The weights-only unpickler's own reason (e.g. 'Unsupported global: GLOBAL x.Y was not an
  allowed global by default'), without torch's advice to load with weights_only=False."""
  text = str(e)
  if "WeightsUnpickler error:" in text:
    rest = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0]
    rest = " ".join(rest.split())
    return rest.split(". ")[0].rstrip(".") or "unsupported content"
  return first_line(e)


def _to_numpy(t) -> np.ndarray:
  torch = require("torch")
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16: widen (exact).
    t = t.float()
  return t.numpy()


def _unwrap(obj: Any, path: str) -> tuple[dict, Optional[str]]:
  """The state_dict inside a loaded checkpoint: {'model': sd} (official MAE / ConvMAE),
  {'state_dict': sd}, or sd itself (timm). Returns (sd, our JSON metadata or None)."""
  if not isinstance(obj, dict):
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict")
  meta = obj.get(META_KEY) if isinstance(obj.get(META_KEY), str) else None
  for key in ("model", "state_dict"):
    if isinstance(obj.get(key), dict):
      return obj[key], meta
  return obj, meta


def _read_safetensors(path: str) -> tuple[StateDict, dict[str, str]]:
  """With numpy; through torch only for dtypes numpy lacks (bfloat16)."""
  from safetensors import safe_open
  try:
    with safe_open(path, framework="np") as f:
      metadata = dict(f.metadata() or {})
      names = list(f.keys())
      sd = {}
      for k in names:
        try:
          sd[k] = f.get_tensor(k)
        except TypeError:  # a dtype numpy cannot hold: read all of them with torch below.
          sd = None
          break
    if sd is None:
      require("torch")
      with safe_open(path, framework="pt") as f:
        sd = {k: _to_numpy(f.get_tensor(k)) for k in names}
  except UserError:
    raise
  except Exception as e:  # safetensors raises its own SafetensorError for broken headers.
    raise UserError(f"cannot read {path} as .safetensors: {first_line(e)}") from None
  return sd, metadata


def read_state_dict(path: str) -> tuple[StateDict, dict[str, str]]:
  """(state_dict as numpy arrays, metadata) of a .safetensors or .pth file.

  A 'module.' prefix on every name (DistributedDataParallel) is removed. Non-tensor entries in
  the state_dict are an error.
  """
  kind = file_type(path)
  metadata: dict[str, str] = {}
  if kind == "safetensors":
    require("safetensors")
    sd, metadata = _read_safetensors(path)
  else:
    torch = require("torch")
    import argparse
    try:
      with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise UserError(f"refusing to unpickle {path}: it is not a weights-only file "
                      f"({_unpickler_reason(e)}); save its state_dict alone, or as "
                      ".safetensors") from None
    except (RuntimeError, EOFError, OSError) as e:
      raise UserError(f"cannot read {path} as a PyTorch checkpoint: {first_line(e)}") from None
    sd, meta = _unwrap(obj, path)
    if meta:
      metadata[META_KEY] = meta
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
      raise UserError(f"{path}: the state_dict has entries that are not tensors: "
                      f"{', '.join(map(str, bad[:8]))}")
    sd = {k: _to_numpy(v) for k, v in sd.items()}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  if not sd:
    raise UserError(f"{path} holds no tensors")
  return sd, metadata


def check_out_path(path: str, force: bool) -> str:
  """'safetensors' or 'torch' by the extension of an output file; refuses to overwrite."""
  ext = os.path.splitext(path)[1].lower()
  if ext in SAFETENSORS:
    kind = "safetensors"
  elif ext in TORCH:
    kind = "torch"
  else:
    raise UserError(f"wrong file type: --out={path} must end in .safetensors or "
                    f"{'/'.join(TORCH)}")
  if os.path.isdir(path):
    raise UserError(f"--out={path} is a directory")
  if os.path.exists(path) and not force:
    raise UserError(f"{path} exists; pass --force to overwrite it")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise UserError(f"the folder of --out={path} does not exist")
  if kind == "safetensors":
    require("safetensors")
  else:
    require("torch")
  return kind


def write_state_dict(path: str, state_dict: StateDict, metadata: dict[str, str],
                     wrap_model: bool) -> None:
  """Writes `state_dict` to .safetensors (flat, `metadata` in the header) or to a weights-only
  .pth: {'model': sd, 'mae_jax': config JSON} with `wrap_model` (the official releases'
  layout), else the flat sd (timm's). Written to a temporary name first, then renamed."""
  kind = check_out_path(path, force=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    if kind == "safetensors":
      from safetensors.numpy import save_file
      save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp,
                metadata={"format": "pt", **metadata})
    else:
      torch = require("torch")
      sd = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}  # writable copies
      obj = {"model": sd, **({META_KEY: metadata[META_KEY]} if META_KEY in metadata else {})} \
          if wrap_model else sd
      torch.save(obj, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def config_from_metadata(metadata: dict[str, str]) -> Optional[dict]:
  """The config dict our exports store in the metadata, or None."""
  text = metadata.get(META_KEY)
  if not text:
    return None
  try:
    meta = json.loads(text)
  except json.JSONDecodeError:
    return None
  return meta.get("config") if isinstance(meta, dict) else None
