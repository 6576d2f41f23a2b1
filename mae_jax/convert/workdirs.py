"""Workdir <-> file: export an Orbax checkpoint to a PyTorch file, import one into a workdir.

Export reads a pretraining workdir (WORKDIR/config.json + WORKDIR/checkpoints/<step>, params
only, as `encoder_init.load_pretrained`) or a fine-tuning workdir (through
`mae_jax.evaluate.classify.load_classifier`) and writes timm's ViT layout, the official MAE
layout or the official ConvMAE layout. Import writes a pseudo-pretraining workdir that
`config.init_from` accepts: OUT/config.json (configs/mae.py or configs/convmae.py with the
checkpoint's size) and OUT/checkpoints/0 with the items `state` = {'params': ...} and `meta`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from mae_jax.convert import files, layout
from mae_jax.errors import UserError

FORMATS = ("auto", "timm", "mae", "convmae")
ARCHS = ("auto", "mae", "convmae", "timm")
# Classifier entries an import into a pretraining workdir leaves out (fine-tuning makes new ones).
HEAD_NAMES = ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias")


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json, the resolved config every run saves (as knn_task.pretraining_config,
  read with etils.epath so that the converter does not load TensorFlow)."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise UserError(f"{path} not found: --workdir must be a training workdir")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------- export


def _fresh_shapes(method, image_size: int):
  images = jnp.zeros((1, image_size, image_size, 3))
  return jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images)


def _patch_size(encoder) -> int:
  if "patch_embed" in encoder:
    return int(encoder["patch_embed"]["proj"]["kernel"].shape[0])
  from mae_jax.models.convvit import PATCH_SIZE
  return PATCH_SIZE


def load_hint(fmt: str, config, tree, out: str) -> str:
  """One line saying what loads the exported file."""
  load = ("safetensors.torch.load_file(FILE)" if out.endswith(".safetensors")
          else "torch.load(FILE, weights_only=True)")
  if fmt == "timm":
    enc = tree
    variant = config.model.variant if "model" in config else None
    name = layout.vit_timm_name(variant) if variant else None
    head = enc.get("head", {}).get("kernel")
    kwargs = [f"num_classes={head.shape[-1] if head is not None else 0}"]
    if "fc_norm" in enc:
      kwargs.append("global_pool='avg'")
    if config.get("image_size", 224) != 224:
      kwargs.append(f"img_size={config.image_size}")
    if name is None:
      width = layout.encoder_width(enc)
      depth = sum(k.startswith("blocks_") for k in enc)
      name = "vit_base_patch16_224"  # any ViT name: the keyword arguments set the size.
      kwargs += [f"patch_size={_patch_size(enc)}", f"embed_dim={width}", f"depth={depth}",
                 f"num_heads={vit_heads(variant) if variant else 'H'}"]
    return f"timm.create_model('{name}', {', '.join(kwargs)}).load_state_dict({load})"
  sd_load = load if out.endswith(".safetensors") else f"{load}['model']"
  model = "models_mae.MaskedAutoencoderViT" if fmt == "mae" else "models_convmae's model"
  return f"the official {model} of this size: model.load_state_dict({sd_load})"


def vit_heads(variant: str) -> int:
  from mae_jax.models.vit import parse_variant
  return parse_variant(variant).num_heads


def export_workdir(workdir: str, out: str, fmt: str = "auto", step: Optional[int] = None,
                   image_size: Optional[int] = None, head: bool = True,
                   force: bool = False) -> dict:
  """Writes the checkpoint of `workdir` (latest, or `step`) to `out` in `fmt`'s layout.

  fmt 'timm': the ViT encoder (a classifier with its head unless head=False); 'mae': the whole
  official MAE model {'model': sd}; 'convmae': the official ConvMAE model; 'auto': by method.
  `image_size` rewrites the fixed sin-cos buffers for another resolution (learned position
  embeddings cannot be resized here). Returns a summary dict (layout, step, keys, hint).
  """
  from mae_jax.checkpoint import absolute
  from mae_jax.evaluate.encoder_init import check_fits, load_pretrained
  from mae_jax.methods import get_method
  if fmt not in FORMATS:
    raise UserError(f"--format must be one of {FORMATS}, got {fmt!r}")
  files.check_out_path(out, force)  # before any loading.
  workdir = absolute(workdir)
  config = read_config(workdir)
  if config.get("task", "pretrain") != "pretrain":
    return _export_classifier(workdir, config, out, fmt, step, image_size, head)
  method = get_method(config)
  params, meta = load_pretrained(workdir, step)
  check_fits(_fresh_shapes(method, config.image_size), params, f"checkpoint of {workdir}")
  params = jax.device_get(params)
  name = config.method
  if fmt == "auto":
    fmt = {"mae": "mae", "convmae": "convmae"}.get(name, "timm")
  encoder = params[method.encoder_key]
  if fmt == "timm":
    if "cls_token" not in encoder or "patch_embed" not in encoder:
      raise UserError(f"--format=timm needs a ViT encoder; {workdir} trained {name!r} (use "
                      f"--format={name})" if name == "convmae" else
                      f"--format=timm needs a ViT encoder; {workdir} has none")
    tree = encoder
  elif fmt != name:
    raise UserError(f"--format={fmt} needs a {fmt} pretraining workdir; {workdir} trained "
                    f"{name!r}" + (" (use --format=timm for its ViT encoder)"
                                   if "cls_token" in encoder else ""))
  else:
    tree = params
  size = image_size or config.image_size
  patch = _patch_size(encoder)
  if size % patch:
    raise UserError(f"--image_size={size} is not a multiple of the patch size {patch}")
  with config.unlocked():
    config.image_size = size
  sd = layout.export_state_dict(tree, (size // patch, size // patch))
  source = f"{os.path.abspath(workdir)} step {meta.get('step')}"
  return _write(out, sd, fmt, config, source, tree)


def _write(out, sd, fmt, config, source, tree) -> dict:
  info = {"config": json.loads(config.to_json_best_effort()), "layout": fmt, "source": source}
  files.write_state_dict(out, sd, {files.META_KEY: json.dumps(info)}, wrap_model=fmt != "timm")
  return {"out": out, "layout": fmt, "source": source, "num_arrays": len(sd),
          "num_params": int(sum(v.size for v in sd.values())),
          "hint": load_hint(fmt, config, tree, out)}


def _export_classifier(workdir, config, out, fmt, step, image_size, head) -> dict:
  """A fine-tuning workdir through `classify.load_classifier` (timm / official ConvViT layout)."""
  if importlib.util.find_spec("mae_jax.evaluate.classify") is None:
    raise UserError(f"{workdir} is a {config.task!r} workdir; exporting it needs "
                    "mae_jax.evaluate.classify.load_classifier, which this version lacks")
  from mae_jax.evaluate import classify
  from mae_jax.models.convvit import ConvViT
  from mae_jax.models.vit import ViT
  module, params, info = classify.load_classifier(workdir, step)
  tree = dict(jax.device_get(params))
  if not head:
    tree.pop("head", None)
  if isinstance(module, ViT):
    want = "timm"
  elif isinstance(module, ConvViT):
    want = "convmae"
  else:
    raise UserError(f"unknown architecture: {type(module).__name__} has no PyTorch layout here")
  if fmt not in ("auto", want):
    raise UserError(f"--format={fmt} does not fit a {type(module).__name__} classifier "
                    f"(use --format={want})")
  size = image_size or config.get("image_size", 224)
  if "pos_embed" in tree and image_size and image_size != config.get("image_size"):
    raise UserError("--image_size cannot resize a learned pos_embed; export at the trained size")
  patch = _patch_size(tree)
  sd = layout.export_state_dict(tree, (size // patch, size // patch))
  step_ = info.get("step") if isinstance(info, dict) else None
  return _write(out, sd, want, config, f"{os.path.abspath(workdir)} step {step_}", tree)


# ----------------------------------------------------------------------------- import


def _repo_config(name: str, arg: str) -> ml_collections.ConfigDict:
  """configs/<name>.py:<arg> of this checkout (the configs folder beside the package)."""
  import mae_jax
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(mae_jax.__file__))),
                      "configs", f"{name}.py")
  if not os.path.exists(path):
    raise UserError(f"{path} not found: import writes a config of configs/{name}.py and needs "
                    "the repository checkout")
  spec = importlib.util.spec_from_file_location(f"_mae_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _base_config(saved: Optional[dict], name: str, arg: str) -> ml_collections.ConfigDict:
  """Our export's own config when the file has one (same method), else configs/NAME.py:ARG."""
  if saved:
    config = ml_collections.ConfigDict(saved)
    config.lock()
    return config
  return _repo_config(name, arg)


def check_target(workdir: str, force: bool) -> None:
  """UserError if `workdir` holds anything and not `force` (nothing in a workdir is lost)."""
  path = epath.Path(workdir)
  if path.exists():
    if not path.is_dir():
      raise UserError(f"--workdir={workdir} exists and is not a directory")
    have = sorted(p.name for p in path.iterdir())
    if have and not force:
      raise UserError(f"--workdir={workdir} is not empty (it has {', '.join(have[:5])}); choose "
                      "a new folder, or pass --force to replace its config.json and checkpoints/")


def _decoder_dims(sd, saved_model, decoder_heads: Optional[int]) -> tuple[int, int, int, str]:
  """(width, depth, heads, note) of an official decoder. Heads are not in the weights: from
  --decoder_heads, else our export's saved config, else the official 16."""
  width = int(sd["decoder_embed.weight"].shape[0]) if "decoder_embed.weight" in sd else 512
  depth = layout._block_count(sd, "decoder_blocks")
  note = ""
  if decoder_heads:
    heads = decoder_heads
  elif saved_model and saved_model.get("decoder_width") == width:
    heads = saved_model["decoder_heads"]
  else:
    heads = 16
    note = ("decoder heads are not stored in PyTorch weights: assumed 16 (the official MAE's); "
            "pass --decoder_heads to change")
  return width, depth, heads, note


def _target(sd, metadata, arch, variant, image_size, decoder_heads, norm_pix_loss):
  """(config, abstract params, grid, ignore, notes, details) for the checkpoint's model."""
  saved = files.config_from_metadata(metadata)
  convmae = arch == "convmae"
  if saved and saved.get("method") != ("convmae" if convmae else "mae"):
    saved = None  # another method's export: infer from the weights alone.
  saved_model = (saved or {}).get("model", {})
  notes, details = [], {}
  if convmae:
    from mae_jax.models.convvit import PATCH_SIZE
    name = layout.infer_convvit_size(sd, variant or saved_model.get("variant"))
    config = _base_config(saved, "convmae", "base")
    patch, has_cls = PATCH_SIZE, False
  else:
    if "patch_embed.proj.weight" not in sd and not variant:
      raise UserError("unknown architecture: no patch_embed.proj.weight (timm / official MAE "
                      "ViT) nor patch_embed1.proj.weight (official ConvMAE); first names: "
                      f"{', '.join(sorted(sd)[:6])}")
    name = layout.infer_vit_variant(sd, variant or saved_model.get("variant"))
    config = _base_config(saved, "mae", "vit_b16")
    from mae_jax.models.vit import parse_variant
    patch, has_cls = parse_variant(name).patch_size, True
  if not image_size:
    if saved and saved.get("image_size"):
      image_size = saved["image_size"]
    elif "pos_embed" in sd and len(sd["pos_embed"].shape) == 3:
      n = sd["pos_embed"].shape[1] - (1 if has_cls else 0)
      image_size = layout.square_grid(n, "pos_embed") * patch
    else:
      image_size = 224
      notes.append("no pos_embed to read the image size from: assumed 224 (--image_size)")
  has_decoder = arch != "timm" and any(k.startswith("decoder_") or k == "mask_token" for k in sd)
  with config.unlocked():
    config.model.variant = name
    config.image_size = int(image_size)
    if convmae:
      config.model.dwconv_impl = saved_model.get("dwconv_impl", "conv")
    if has_decoder:
      width, depth, heads, note = _decoder_dims(sd, saved_model, decoder_heads)
      config.model.update(decoder_width=width, decoder_depth=depth, decoder_heads=int(heads))
      if note:
        notes.append(note)
    if norm_pix_loss is not None:
      config.norm_pix_loss = norm_pix_loss
    elif saved and "norm_pix_loss" in saved:
      config.norm_pix_loss = bool(saved["norm_pix_loss"])
  from mae_jax.methods import get_method
  method = get_method(config)
  abstract = _fresh_shapes(method, config.image_size)
  if not has_decoder:
    abstract = {"encoder": abstract["encoder"]}
  grid = (config.image_size // patch, config.image_size // patch)
  details["pos_embed"] = "sincos"
  pos = sd.get("pos_embed")
  width = layout.encoder_width(abstract["encoder"])
  if pos is not None and not layout.is_sincos(pos, width, grid, has_cls):
    want = (1, grid[0] * grid[1] + has_cls, width)
    if tuple(pos.shape) == want:  # a learned one (timm supervised ViTs): kept as a parameter.
      abstract["encoder"]["pos_embed"] = jax.ShapeDtypeStruct(want, jnp.float32)
      details["pos_embed"] = "learned"
      notes.append("pos_embed is learned (not the fixed sin-cos): kept as encoder param "
                   "'pos_embed'")
  ignore = tuple(n for n in HEAD_NAMES if n in sd)
  if ignore:
    if "fc_norm.weight" in sd and "norm.weight" not in sd:
      raise UserError("a fine-tuned global-pool classifier (fc_norm, no norm): it lacks the "
                      "pretrained final norm of a pretraining encoder; import a pretraining "
                      "release")
    notes.append(f"left out the classifier entries {', '.join(ignore)}")
  details["decoder"] = has_decoder
  return config, abstract, grid, ignore, notes, details


def import_checkpoint(src: str, workdir: str, arch: str = "auto", variant: Optional[str] = None,
                      image_size: Optional[int] = None, decoder_heads: Optional[int] = None,
                      norm_pix_loss: Optional[bool] = None, force: bool = False) -> dict:
  """A PyTorch checkpoint (official MAE / ConvMAE release, timm ViT, or our export) -> a
  pseudo-pretraining workdir for `config.init_from`. Returns a summary dict."""
  from mae_jax.checkpoint import Checkpointer, absolute
  if arch not in ARCHS:
    raise UserError(f"--arch must be one of {ARCHS}, got {arch!r}")
  workdir = absolute(workdir)
  check_target(workdir, force)
  sd, metadata = files.read_state_dict(src)
  if arch == "auto":
    arch = "convmae" if "patch_embed1.proj.weight" in sd else "mae"
  config, abstract, grid, ignore, notes, details = _target(
      sd, metadata, arch, variant, image_size, decoder_heads, norm_pix_loss)
  params = layout.import_state_dict(sd, abstract, grid, ignore=ignore, where=src)
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  if force and (path / "checkpoints").exists():  # replace, never mix with, earlier checkpoints.
    (path / "checkpoints").rmtree()
  (path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  meta = {"step": 0, "method": config.method, "source": os.path.abspath(src),
          "imported_as": arch, "pos_embed": details["pos_embed"], "decoder": details["decoder"],
          "dropped": list(ignore)}
  ckpt = Checkpointer(workdir, max_to_keep=1)
  try:
    ckpt.save(0, {"params": params}, meta)
    ckpt.wait()
  finally:
    ckpt.close()
  num = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  return {"workdir": workdir, "method": config.method, "variant": config.model.variant,
          "image_size": config.image_size, "num_params": num, "notes": notes, **details}
