"""Workdir <-> file: export an Orbax checkpoint to a PyTorch file, import one into a workdir.

Export reads a pretraining workdir (WORKDIR/config.json + WORKDIR/checkpoints/<step>, params
only, through `mae_jax.workdir`) or a fine-tuning workdir (through
`mae_jax.evaluate.finetune.load_classifier`) and writes timm's ViT layout, the official MAE
layout or the official ConvMAE layout. Import writes a pseudo-pretraining workdir that
`config.init_from` accepts: OUT/config.json (configs/mae.py or configs/convmae.py with the
checkpoint's size) and OUT/checkpoints/0 with the items `state` = {'params': ...} and `meta`.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from mae_jax import config_files, configlib
from mae_jax import workdir as workdirs
from mae_jax.atomic import write_atomic
from mae_jax.convert import files, folders, layout
from mae_jax.errors import UserError

FORMATS = ("auto", "timm", "mae", "convmae", "hf")
ARCHS = ("auto", "mae", "convmae", "timm")
# Classifier entries an import into a pretraining workdir leaves out (fine-tuning makes new ones).
HEAD_NAMES = ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias")


# ----------------------------------------------------------------------------- export


def _fresh_shapes(method, image_size):
  images = jnp.zeros((1, *configlib.image_hw(image_size), 3))
  return jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images)


def _patch_size(encoder) -> int:
  if "patch_embed" in encoder:
    return int(encoder["patch_embed"]["proj"]["kernel"].shape[0])
  from mae_jax.models.convvit import PATCH_SIZE
  return PATCH_SIZE


def load_hint(fmt: str, tree, out: str, variant: Optional[str], image_size) -> str:
  """One line saying what loads the exported file (timm's call, or the official model)."""
  load = ("safetensors.torch.load_file(FILE)" if out.endswith(".safetensors")
          else "torch.load(FILE, weights_only=True)")
  if fmt != "timm":
    sd = load if out.endswith(".safetensors") else f"{load}['model']"
    model = ("models_mae.MaskedAutoencoderViT" if fmt == "mae" else
             "models_convmae model" if "decoder" in tree else "models_convvit.ConvViT")
    return f"the official {model} of {variant or 'this size'}: model.load_state_dict({sd})"
  head = tree.get("head", {}).get("kernel")
  kwargs = [f"num_classes={head.shape[-1] if head is not None else 0}"]
  if "fc_norm" in tree:
    kwargs.append("global_pool='avg'")
  h, w = configlib.image_hw(image_size)
  if (h, w) != (224, 224):
    kwargs.append(f"img_size={h if h == w else (h, w)}")  # timm takes an int or (H, W).
  name = layout.vit_timm_name(variant) if variant else None
  if name is None:  # no timm name for this size: any ViT name, its size set by keywords.
    from mae_jax.models.vit import parse_variant
    name = "vit_base_patch16_224"
    heads = parse_variant(variant).num_heads if variant else "HEADS"
    kwargs += [f"patch_size={_patch_size(tree)}", f"embed_dim={layout.encoder_width(tree)}",
               f"depth={sum(k.startswith('blocks_') for k in tree)}", f"num_heads={heads}"]
  return f"timm.create_model('{name}', {', '.join(kwargs)}).load_state_dict({load})"


def export_workdir(workdir: str, out: str, fmt: str = "auto", step: Optional[int] = None,
                   image_size=None, head: bool = True, best: bool = False,
                   force: bool = False) -> dict:
  """Writes the checkpoint of `workdir` (latest, or `step`) to `out` in `fmt`'s layout.

  A pretraining workdir: fmt 'timm' writes its ViT encoder, 'mae' the whole official MAE model
  ({'model': sd} in a .pth), 'convmae' the whole official ConvMAE model; 'auto' picks by method.
  A fine-tuning workdir (its classifier via `finetune.load_classifier`, `best` for WORKDIR/best):
  timm's layout for a ViT, the official ConvViT's for ConvMAE, with the head unless not `head`.
  `image_size` (an int S or (H, W)) writes the fixed sin-cos buffers for another resolution (a
  learned pos_embed is exported as trained). Returns a summary dict (layout, source, counts, a
  load hint).
  """
  if fmt not in FORMATS:
    raise UserError(f"--format must be one of {FORMATS}, got {fmt!r}")
  folder = fmt == "hf" or (fmt == "timm" and folders.is_folder_out(out))
  if folder:  # before any loading.
    folders.check_folder_out(out, force)
  else:
    files.check_out_path(out, force)
  workdir = workdirs.absolute(workdir)
  config = workdirs.read_config(workdir)
  task = config.get("task", "pretrain")
  if task == "pretrain":
    if best:
      raise UserError("--best is for fine-tuning workdirs; a pretraining workdir has no best/")
    fmt, tree, variant, size, step = _pretrained_tree(workdir, config, fmt, step, image_size)
  elif task == "finetune":
    fmt, tree, variant, size, step = _classifier_tree(workdir, config, fmt, step, image_size,
                                                      head, best)
  else:
    raise UserError(f"{workdir} is a {task!r} workdir; export takes pretraining and fine-tuning "
                    "workdirs")
  size = configlib.image_size_value(size)
  patch = _patch_size(tree.get("encoder", tree))
  grid = configlib.image_grid(size, patch)
  if grid is None:
    raise UserError(f"--image_size={configlib.image_size_text(size)} is not a multiple of the "
                    f"patch size {patch}")
  sd = layout.export_state_dict(tree, grid)
  source = f"{workdir} step {step}"
  configlib.set_image_size(config, size)
  saved = json.loads(config.to_json_best_effort())
  meta = {"config": saved, "layout": fmt, "source": source}
  if folder:
    if fmt == "hf":
      classifier = "decoder_embed.weight" not in sd
      if classifier and "fc_norm.weight" in sd:
        raise UserError("this classifier pools the mean of the patch tokens through fc_norm, "
                        "which ViTForImageClassification cannot express (it reads the [CLS] "
                        "token); export it with --format=timm (a folder for timm) instead")
      if not classifier and grid[0] != grid[1]:
        raise UserError(f"--format=hf: transformers' ViTMAE builds its sin-cos position tables "
                        f"for a square patch grid only (int(sqrt(num_patches)) per side), so "
                        f"ViTMAEForPreTraining cannot be built for "
                        f"{configlib.image_size_text(size)} px images; export --format=timm (a "
                        f"folder) or --format=mae instead")
      written = folders.to_hf(sd)
      cfg = folders.hf_config(config, sd, size, classifier)
      hint = (f"transformers.{'ViTForImageClassification' if classifier else 'ViTMAEForPreTraining'}"
              f".from_pretrained('{out}')")
    else:
      written = sd
      cfg = folders.timm_config(config, sd, size, variant, config.dataset.mean,
                                config.dataset.std)
      hint = f"timm.create_model('local-dir:{out}', pretrained=True)"
    cfg["mae_jax"] = saved
    folders.write_folder(out, written, cfg, force)
    return {"out": out, "layout": f"{fmt} folder", "source": source, "num_arrays": len(written),
            "num_params": int(sum(np.size(v) for v in written.values())), "hint": hint}
  files.write_state_dict(out, sd, {files.META_KEY: json.dumps(meta)}, wrap_model=fmt != "timm")
  return {"out": out, "layout": fmt, "source": source, "num_arrays": len(sd),
          "num_params": int(sum(v.size for v in sd.values())),
          "hint": load_hint(fmt, tree, out, variant, size)}


def _pretrained_tree(workdir, config, fmt, step, image_size):
  """(format, tree to export, variant, image size, step) of a pretraining workdir."""
  from mae_jax.methods import get_method
  method = get_method(config)
  params, meta = workdirs.load_params(workdir, step)
  workdirs.check_fits(_fresh_shapes(method, config.image_size), params, f"checkpoint of {workdir}")
  params = jax.device_get(params)
  name = config.method
  if fmt == "auto":
    fmt = name if name in ("mae", "convmae") else "timm"
  if fmt == "hf" and name != "mae":
    raise UserError(f"--format=hf writes a ViTMAEForPreTraining folder and needs a mae "
                    f"pretraining workdir; {workdir} trained {name!r}" +
                    (" (use --format=timm for its ViT encoder)" if name != "convmae" else ""))
  encoder = params[method.encoder_key]
  is_vit = "cls_token" in encoder and "patch_embed" in encoder
  if fmt == "timm":
    if not is_vit:
      raise UserError(f"--format=timm needs a ViT encoder; {workdir} trained {name!r}" +
                      (" (use --format=convmae)" if name == "convmae" else ""))
    tree = encoder
  elif fmt != name and fmt != "hf":
    raise UserError(f"--format={fmt} needs a {fmt} pretraining workdir; {workdir} trained "
                    f"{name!r}" + (" (use --format=timm for its ViT encoder)" if is_vit else ""))
  else:
    tree = params
  return fmt, tree, config.model.variant, image_size or config.image_size, meta.get("step")


def _classifier_tree(workdir, config, fmt, step, image_size, head, best):
  """(format, tree, variant, image size, step) of a fine-tuning workdir."""
  from mae_jax.evaluate.finetune import load_classifier
  from mae_jax.models.convvit import ConvViT
  from mae_jax.models.vit import ViT
  module, params, info = load_classifier(workdir, step, best=best)
  tree = dict(params)
  if not head:
    tree.pop("head", None)
  if isinstance(module, ViT):
    want = "timm"
  elif isinstance(module, ConvViT):
    want = "convmae"
  else:
    raise UserError(f"unknown architecture: {type(module).__name__} has no PyTorch layout here")
  if fmt not in ("auto", want) and not (fmt == "hf" and want == "timm"):
    raise UserError(f"--format={fmt} does not fit a {type(module).__name__} classifier "
                    f"(use --format={want})")
  if fmt == "hf":
    want = "hf"
  size = info.get("image_size") or config.image_size
  if (image_size and configlib.image_hw(image_size) != configlib.image_hw(size)
      and "pos_embed" in tree):
    raise UserError(f"--image_size={configlib.image_size_text(image_size)}: this classifier's "
                    f"pos_embed is learned at {configlib.image_size_text(size)} px and is "
                    "exported as trained; fine-tuning code resizes it")
  return want, tree, info.get("variant"), size, info.get("step")


# ----------------------------------------------------------------------------- import


def _repo_config(name: str, arg: str) -> ml_collections.ConfigDict:
  """The shipped config NAME:ARG (configs/NAME.py; mae_jax.configs in an installed wheel)."""
  return config_files.load(f"{name}:{arg}")


def _base_config(saved: Optional[dict], name: str, arg: str) -> ml_collections.ConfigDict:
  """Our export's own config when the file has one (same method), else configs/NAME.py:ARG."""
  if saved:
    config = ml_collections.ConfigDict(saved)
    config.lock()
    return config
  config = _repo_config(name, arg)
  # A release is a model to evaluate, convert and analyze, not a run to continue: full precision
  # rather than the recipe's bfloat16 training activations.
  config.compute.dtype = "float32"
  return config


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
  depth = layout.block_count(sd, "decoder_blocks")
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
      # A count of positions names a square grid only: (H, W) comes from metadata or the flag.
      n = sd["pos_embed"].shape[1] - (1 if has_cls else 0)
      image_size = layout.square_grid(n, "pos_embed") * patch
    else:
      image_size = 224
      notes.append("no pos_embed to read the image size from: assumed 224 (--image_size)")
  image_size = configlib.image_size_value(image_size)
  has_decoder = arch != "timm" and any(k.startswith("decoder_") or k == "mask_token" for k in sd)
  configlib.set_image_size(config, image_size)
  with config.unlocked():
    config.model.variant = name
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
  grid = configlib.image_grid(config.image_size, patch)  # get_method checked the divisibility.
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
                      image_size=None, decoder_heads: Optional[int] = None,
                      norm_pix_loss: Optional[bool] = None, force: bool = False) -> dict:
  """A PyTorch checkpoint (official MAE / ConvMAE release, timm ViT, or our export) -> a
  pseudo-pretraining workdir for `config.init_from`. `image_size` (an int S or (H, W)) overrides
  the size read from the file. Returns a summary dict."""
  from mae_jax.checkpoint import Checkpointer
  if arch not in ARCHS:
    raise UserError(f"--arch must be one of {ARCHS}, got {arch!r}")
  workdir = workdirs.absolute(workdir)
  check_target(workdir, force)
  if os.path.isdir(src):  # a Hugging Face or timm model folder
    sd, metadata, hints = folders.read_folder(src)
    image_size = image_size or hints.get("image_size")
    decoder_heads = decoder_heads or hints.get("decoder_heads")
    if norm_pix_loss is None:
      norm_pix_loss = hints.get("norm_pix_loss")
  else:
    sd, metadata, hints = (*files.read_state_dict(src), {})
  if arch == "auto":
    arch = "convmae" if "patch_embed1.proj.weight" in sd else "mae"
  config, abstract, grid, ignore, notes, details = _target(
      sd, metadata, arch, variant, image_size, decoder_heads, norm_pix_loss)
  heads = hints.get("num_attention_heads")
  if heads is not None and arch != "convmae":
    from mae_jax.models.vit import parse_variant
    if parse_variant(config.model.variant).num_heads != heads:
      raise UserError(f"{src}: {heads} attention heads, but the ViT size of these weights "
                      f"({config.model.variant}) has {parse_variant(config.model.variant).num_heads}; "
                      "pass --variant")
  params = layout.import_state_dict(sd, abstract, grid, ignore=ignore, where=src)
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  if force and (path / "checkpoints").exists():  # replace, never mix with, earlier checkpoints.
    (path / "checkpoints").rmtree()
  write_atomic(str(path / "config.json"), config.to_json_best_effort(indent=2, sort_keys=True))
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
