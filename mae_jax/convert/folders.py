"""Model folders: what `from_pretrained(DIR)` (Hugging Face) and `create_model('local-dir:DIR')`
(timm) load, written from our checkpoints and read back.

A folder holds `model.safetensors` and `config.json`:

- `--format=hf`: a MAE pretraining workdir becomes a `transformers.ViTMAEForPreTraining` folder
  (encoder + decoder; sizes, mask_ratio and norm_pix_loss in config.json, as
  `facebook/vit-mae-base` on the Hub); a fine-tuned ViT classifier that pools the [CLS] token
  becomes a `ViTForImageClassification` folder. Names follow transformers'
  `models/vit_mae/modeling_vit_mae.py` and `models/vit/modeling_vit.py` in the layout the Hub
  checkpoints use (`vit.encoder.layer.N.attention.attention.query`, ...), which every
  transformers version loads; our fused qkv is split into query, key and value. LayerNorm eps is
  1e-6 (the official MAE's, not transformers' default 1e-12) and GELU is the exact one.
- `--format=timm` with a folder for --out: timm's ViT names (as the flat timm export) and a
  config.json with `architecture`, `model_args` and `pretrained_cfg` (mean, std, input_size,
  interpolation, crop_pct) read by timm's `_hub.load_model_config_from_path`.

Our own config travels in config.json under "mae_jax", so an import rebuilds the same model.
Publishing a folder is `huggingface_hub.upload_folder(repo_id="USER/NAME", folder_path=DIR)`
(or `huggingface-cli upload USER/NAME DIR`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

import numpy as np

from mae_jax import configlib
from mae_jax.convert import files
from mae_jax.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LAYER_NORM_EPS = 1e-6
EVAL_CROP_PCT = 0.875  # the evaluation transform's (mae_jax.data.pipeline)

# Block parts: official / timm name -> Hugging Face name (the fused qkv is handled apart).
_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after",
          "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
          "mlp.fc2": "output.dense"}
_QKV = ("query", "key", "value")


def is_folder_out(out: str) -> bool:
  """An --out without a file suffix (or an existing folder) names a folder."""
  return os.path.isdir(out) or out.endswith(os.sep) or not os.path.splitext(out)[1]


def check_folder_out(out: str, force: bool) -> None:
  if os.path.splitext(out.rstrip(os.sep))[1]:
    raise UserError(f"--out={out}: a model folder is a directory path, not a file "
                    f"(.safetensors / .pth are the flat formats)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out={out} exists and is not a directory")
  if os.path.isdir(out) and os.listdir(out) and not force:
    raise UserError(f"--out={out} is not empty; choose a new folder or pass --force")
  parent = os.path.dirname(os.path.abspath(out.rstrip(os.sep)))
  if not os.path.isdir(parent):
    raise UserError(f"the folder of --out={out} does not exist")


def _block_to_hf(rest: str, prefix: str, value, out: dict) -> bool:
  if rest.startswith("attn.qkv."):
    leaf = rest.rsplit(".", 1)[1]
    for name, part in zip(_QKV, np.split(np.asarray(value), 3, axis=0)):
      out[f"{prefix}attention.attention.{name}.{leaf}"] = part
    return True
  for ours, theirs in _BLOCK.items():
    if rest.startswith(ours + "."):
      out[prefix + theirs + rest[len(ours):]] = value
      return True
  return False


def to_hf(sd: dict, base: str = "vit") -> dict:
  """Official MAE / timm names -> Hugging Face names (ViTMAEForPreTraining, or ViT* with
  `base`='vit' and the classifier head as `classifier`)."""
  out = {}
  for k, v in sd.items():
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
    d = re.fullmatch(r"decoder_blocks\.(\d+)\.(.+)", k)
    if m and _block_to_hf(m.group(2), f"{base}.encoder.layer.{m.group(1)}.", v, out):
      continue
    if d and _block_to_hf(d.group(2), f"decoder.decoder_layers.{d.group(1)}.", v, out):
      continue
    simple = {"cls_token": f"{base}.embeddings.cls_token",
              "pos_embed": f"{base}.embeddings.position_embeddings",
              "patch_embed.proj.weight": f"{base}.embeddings.patch_embeddings.projection.weight",
              "patch_embed.proj.bias": f"{base}.embeddings.patch_embeddings.projection.bias",
              "norm.weight": f"{base}.layernorm.weight", "norm.bias": f"{base}.layernorm.bias",
              "head.weight": "classifier.weight", "head.bias": "classifier.bias",
              "mask_token": "decoder.mask_token",
              "decoder_pos_embed": "decoder.decoder_pos_embed"}
    if k in simple:
      out[simple[k]] = v
    elif k.startswith(("decoder_embed.", "decoder_norm.", "decoder_pred.")):
      out["decoder." + k] = v
    else:
      raise UserError(f"no Hugging Face name for {k}: this model has no Hugging Face layout")
  return out


# Hugging Face names of newer transformers (`vit.layers.N.attention.q_proj`, `mlp.fc1`) -> the
# Hub layout, so both read back.
_NEW_BLOCK = {"attention.q_proj": "attention.attention.query",
              "attention.k_proj": "attention.attention.key",
              "attention.v_proj": "attention.attention.value",
              "attention.o_proj": "attention.output.dense",
              "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def _hub_layout(name: str) -> str:
  name = re.sub(r"^(vit\.)?layers\.", lambda m: f"{m.group(1) or ''}encoder.layer.", name)
  # transformers 5's save_pretrained writes the decoder's blocks under this name.
  name = name.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers.")
  for new, old in _NEW_BLOCK.items():
    name = name.replace(f".{new}.", f".{old}.")
  return name


def from_hf(hf: dict) -> dict:
  """Hugging Face names (ViTMAEForPreTraining, ViTMAEModel, ViTModel, ViTForImage...) ->
  official MAE / timm names; qkv fused again."""
  sd, qkv = {}, {}
  for k, v in hf.items():
    k = _hub_layout(k)
    k = re.sub(r"^(vit|vit_mae)\.", "", k)
    m = re.fullmatch(r"(encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)", k)
    if m:
      block = ("blocks." if m.group(1) == "encoder.layer" else "decoder_blocks.") + m.group(2)
      rest = m.group(3)
      q = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
      if q:
        qkv.setdefault((block, q.group(2)), {})[q.group(1)] = np.asarray(v)
        continue
      for ours, theirs in _BLOCK.items():
        if rest.startswith(theirs + "."):
          sd[f"{block}.{ours}{rest[len(theirs):]}"] = v
          break
      else:
        raise UserError(f"unknown Hugging Face parameter {k}")
      continue
    simple = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
              "classifier.weight": "head.weight", "classifier.bias": "head.bias",
              "decoder.mask_token": "mask_token", "decoder.decoder_pos_embed": "decoder_pos_embed"}
    if k in simple:
      sd[simple[k]] = v
    elif k.startswith(("decoder.decoder_embed.", "decoder.decoder_norm.",
                       "decoder.decoder_pred.")):
      sd[k[len("decoder."):]] = v
    elif k.startswith("pooler."):
      continue  # ViTModel's optional pooler: not part of our models.
    else:
      raise UserError(f"unknown Hugging Face parameter {k}")
  for (block, leaf), parts in qkv.items():
    if set(parts) != set(_QKV):
      raise UserError(f"{block}: query, key and value must all be present")
    sd[f"{block}.attn.qkv.{leaf}"] = np.concatenate([parts[n] for n in _QKV], axis=0)
  return sd


def _json_size(size):
  """An image size as timm's and transformers' configs hold it: an int S, or [H, W] (both
  libraries take a pair for img_size / image_size)."""
  h, w = configlib.image_hw(size)
  return h if h == w else [h, w]


def hf_config(config, sd: dict, size, classifier: bool) -> dict:
  """config.json of a Hugging Face folder for our `config` (a pretraining or fine-tuning one);
  `size` an int S or (H, W)."""
  from mae_jax.models.vit import parse_variant
  v = parse_variant(config.model.variant)
  common = {"hidden_size": v.width, "num_hidden_layers": v.depth, "num_attention_heads": v.num_heads,
            "intermediate_size": int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
            "hidden_act": "gelu", "layer_norm_eps": LAYER_NORM_EPS, "qkv_bias": True,
            "image_size": _json_size(size), "patch_size": v.patch_size, "num_channels": 3,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
  if classifier:
    n = int(sd["head.weight"].shape[0])
    return {"model_type": "vit", "architectures": ["ViTForImageClassification"], **common,
            "id2label": {str(i): f"LABEL_{i}" for i in range(n)},
            "label2id": {f"LABEL_{i}": i for i in range(n)}}
  m = config.model
  return {"model_type": "vit_mae", "architectures": ["ViTMAEForPreTraining"], **common,
          "decoder_hidden_size": int(m.decoder_width),
          "decoder_num_hidden_layers": int(m.decoder_depth),
          "decoder_num_attention_heads": int(m.decoder_heads),
          "decoder_intermediate_size": int(sd["decoder_blocks.0.mlp.fc1.weight"].shape[0]),
          "mask_ratio": float(config.mask_ratio), "norm_pix_loss": bool(config.norm_pix_loss)}


def timm_config(config, sd: dict, size, variant: str, mean, std) -> dict:
  """config.json of a timm folder (`local-dir:`): architecture, model_args, pretrained_cfg;
  `size` an int S or (H, W)."""
  from mae_jax.convert import layout
  from mae_jax.models.vit import parse_variant
  v = parse_variant(variant)
  num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
  name = layout.vit_timm_name(variant) or "vit_base_patch16_224"
  h, w = configlib.image_hw(size)
  args = {"img_size": _json_size(size), "patch_size": v.patch_size, "embed_dim": v.width,
          "depth": v.depth, "num_heads": v.num_heads,
          "mlp_ratio": int(sd["blocks.0.mlp.fc1.weight"].shape[0]) / v.width}
  if "fc_norm.weight" in sd:
    args["global_pool"] = "avg"
    args["fc_norm"] = True
  return {"architecture": name, "num_classes": num_classes, "num_features": v.width,
          "model_args": args,
          "pretrained_cfg": {"input_size": [3, h, w], "interpolation": "bicubic",
                             "crop_pct": EVAL_CROP_PCT, "crop_mode": "center",
                             "mean": list(map(float, mean)), "std": list(map(float, std)),
                             "num_classes": num_classes, "first_conv": "patch_embed.proj",
                             "classifier": "head", "fixed_input_size": True}}


def write_folder(out: str, sd: dict, config_json: dict, force: bool) -> None:
  """model.safetensors + config.json into `out`, built in a temporary folder and renamed."""
  files.require("safetensors")
  from safetensors.numpy import save_file
  out = os.path.abspath(out.rstrip(os.sep))
  tmp = f"{out}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()},
              os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG), "w") as f:
      json.dump(config_json, f, indent=2, sort_keys=True)
    if os.path.isdir(out):
      if os.listdir(out) and not force:
        raise UserError(f"--out={out} is not empty; choose a new folder or pass --force")
      shutil.rmtree(out)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _read_size(size, where: str):
  """A config.json image size (S, or a pair [H, W]; a pair of equal sides is S) -> our
  image_size value; UserError for anything else."""
  if isinstance(size, (list, tuple)) and len(size) == 1:
    size = size[0]
  try:
    h, w = configlib.image_hw(size)
  except UserError:
    raise UserError(f"{where}: image size {size!r} is neither an integer nor [height, width]"
                    ) from None
  return h if h == w else (h, w)


def read_folder(path: str) -> tuple[dict, dict, dict]:
  """(state_dict in official / timm names, metadata as a flat file has it, hints for the
  import: image_size, decoder_heads, norm_pix_loss, variant) of a model folder."""
  cfg_path = os.path.join(path, CONFIG)
  if not os.path.isfile(cfg_path):
    raise UserError(f"{path} is a folder without {CONFIG}: not a Hugging Face or timm model "
                    "folder")
  try:
    with open(cfg_path) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {cfg_path}: {e}") from None
  weights = os.path.join(path, WEIGHTS)
  if not os.path.isfile(weights):
    raise UserError(f"{path} has no {WEIGHTS} (only safetensors weights are read from folders)")
  sd, metadata = files.read_state_dict(weights)
  if "mae_jax" in cfg:
    metadata = {**metadata, files.META_KEY: json.dumps({"config": cfg["mae_jax"]})}
  hints: dict[str, Any] = {}
  model_type = cfg.get("model_type")
  if "architecture" in cfg and "pretrained_cfg" in cfg:  # timm
    size = cfg.get("model_args", {}).get("img_size") or cfg["pretrained_cfg"].get(
        "input_size", [3, 224, 224])[1:]
    hints["image_size"] = _read_size(size, cfg_path)
    return sd, metadata, hints
  if model_type not in ("vit_mae", "vit"):
    raise UserError(f"{cfg_path}: model_type {model_type!r} is not a ViT MAE or ViT model "
                    "(vit_mae, vit) nor a timm folder")
  eps = cfg.get("layer_norm_eps", 1e-12)
  if abs(eps - LAYER_NORM_EPS) > 1e-9:
    raise UserError(f"{cfg_path}: layer_norm_eps {eps} differs from our models' "
                    f"{LAYER_NORM_EPS}: the imported model would compute something else")
  if cfg.get("hidden_act", "gelu") != "gelu":
    raise UserError(f"{cfg_path}: hidden_act {cfg['hidden_act']!r}; our models use the exact "
                    "GELU ('gelu')")
  if not cfg.get("qkv_bias", True):
    raise UserError(f"{cfg_path}: qkv_bias false; our models have attention biases")
  sd = from_hf(sd)
  hints["image_size"] = _read_size(cfg.get("image_size", 224), cfg_path)
  if model_type == "vit_mae":
    hints["decoder_heads"] = int(cfg.get("decoder_num_attention_heads", 16))
    hints["norm_pix_loss"] = bool(cfg.get("norm_pix_loss", False))
  heads = cfg.get("num_attention_heads")
  if heads is not None:
    hints["num_attention_heads"] = int(heads)
  return sd, metadata, hints
