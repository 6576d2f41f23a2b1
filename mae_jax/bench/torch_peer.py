"""The MAE train step in PyTorch, timed in a subprocess of the same run: the reference for
`python -m mae_jax.bench --peer=...`.

Peers:
  official:DIR  `models_mae.MaskedAutoencoderViT` of a facebookresearch/mae checkout in DIR, run
                unmodified. That code was written for timm 0.3 and NumPy < 1.24: here timm's
                `Block` is given a subclass that accepts (and drops) the `qk_scale=None` argument
                it passes, and `np.float` is aliased to `float` for its sin-cos table, if missing.
  hf            transformers' `ViTMAEForPreTraining` (a port of the official model).

Both get the same sizes, mask ratio and loss as our config, and the official optimizer: AdamW
(0.9, 0.95), weight decay 0.05 on weights (not on biases and norms), as facebookresearch/mae
`main_pretrain.py`. One step: forward with random masking, loss, backward, AdamW update, on a
fixed batch of standard-normal images [B, 3, H, W]; CUDA when torch sees one (bfloat16 autocast
when our config computes in bfloat16, as the official code's AMP), else the CPU with all its
threads. The subprocess imports neither TensorFlow nor JAX, and runs while this process idles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional

from mae_jax.errors import UserError


def parse_peer(spec: str) -> dict:
  kind, _, arg = spec.partition(":")
  if kind == "hf" and not arg:
    return {"kind": "hf"}
  if kind == "official" and arg:
    if not os.path.isfile(os.path.join(arg, "models_mae.py")):
      raise UserError(f"--peer={spec}: {arg} has no models_mae.py (a facebookresearch/mae "
                      "checkout)")
    return {"kind": "official", "dir": os.path.abspath(arg)}
  raise UserError(f"--peer={spec}: expected hf or official:DIR")


def model_args(config) -> dict:
  """The sizes of config's MAE model, as both peers take them."""
  from mae_jax.models.vit import parse_variant
  if config.method != "mae":
    raise UserError(f"--peer compares the MAE step; this config is {config.method}")
  v = parse_variant(config.model.variant)
  return {"image_size": int(config.image_size), "patch_size": v.patch_size, "width": v.width,
          "depth": v.depth, "heads": v.num_heads, "decoder_width": config.model.decoder_width,
          "decoder_depth": config.model.decoder_depth,
          "decoder_heads": config.model.decoder_heads, "mask_ratio": config.mask_ratio,
          "norm_pix_loss": bool(config.norm_pix_loss)}


def add_peer(result: dict, config, peer: dict, steps: int, warmup: int) -> None:
  """Times the peer at result's batch size in a subprocess; adds its figures and the ratio
  ours / peer to `result`."""
  job = {"peer": peer, "model": model_args(config), "batch_size": result["batch_size"],
         "steps": steps, "warmup": warmup,
         "bfloat16": config.compute.dtype == "bfloat16"}
  proc = subprocess.run([sys.executable, "-m", "mae_jax.bench.torch_peer", json.dumps(job)],
                        capture_output=True, text=True)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise UserError(f"the PyTorch peer failed: {last}")
  got = json.loads(lines[-1])
  result.update({"peer": got["name"], "peer_device": got["device"],
                 "peer_img_per_s": got["img_per_s"], "peer_step_s": got["step_s"],
                 "peer_loss": got["loss"], "peer_matmul_flops_per_s": got["matmul_flops_per_s"],
                 "ratio_to_peer": result["img_per_s"] / got["img_per_s"]})


# ----------------------------------------------------------------------------- the subprocess


def _official(directory: str, m: dict):
  import functools

  import numpy as np
  import timm.models.vision_transformer as timm_vit
  from torch import nn

  if not hasattr(np, "float"):
    np.float = float  # the official util/pos_embed.py asks for np.float (removed in NumPy 1.24).

  class Block(timm_vit.Block):
    def __init__(self, *args, qk_scale=None, **kwargs):
      assert qk_scale is None  # timm 0.3's default: head_dim ** -0.5, as timm's Block now.
      super().__init__(*args, **kwargs)

  timm_vit.Block = Block
  sys.path.insert(0, directory)
  import models_mae  # pylint: disable=import-error

  model = models_mae.MaskedAutoencoderViT(
      img_size=m["image_size"], patch_size=m["patch_size"], embed_dim=m["width"],
      depth=m["depth"], num_heads=m["heads"], decoder_embed_dim=m["decoder_width"],
      decoder_depth=m["decoder_depth"], decoder_num_heads=m["decoder_heads"], mlp_ratio=4,
      norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=m["norm_pix_loss"])
  return "official facebookresearch/mae models_mae.py", model, (
      lambda x: model(x, mask_ratio=m["mask_ratio"])[0])


def _hf(m: dict):
  import transformers

  config = transformers.ViTMAEConfig(
      hidden_size=m["width"], num_hidden_layers=m["depth"], num_attention_heads=m["heads"],
      intermediate_size=4 * m["width"], image_size=m["image_size"], patch_size=m["patch_size"],
      decoder_hidden_size=m["decoder_width"], decoder_num_hidden_layers=m["decoder_depth"],
      decoder_num_attention_heads=m["decoder_heads"],
      decoder_intermediate_size=4 * m["decoder_width"], mask_ratio=m["mask_ratio"],
      norm_pix_loss=m["norm_pix_loss"], layer_norm_eps=1e-6, qkv_bias=True)
  model = transformers.ViTMAEForPreTraining(config)
  return f"transformers {transformers.__version__} ViTMAEForPreTraining", model, (
      lambda x: model(pixel_values=x).loss)


def _matmul_peak(torch, device, dtype, n: int = 4096, repeats: int = 5) -> float:
  a = torch.ones((n, n), device=device, dtype=dtype) / n
  best = float("inf")
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    (a @ a).sum().item()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def time_peer(job: dict) -> dict:
  import torch

  m, peer = job["model"], job["peer"]
  name, model, loss_fn = (_official(peer["dir"], m) if peer["kind"] == "official" else _hf(m))
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model.to(device).train()
  decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-4, betas=(0.9, 0.95))
  torch.manual_seed(0)
  x = torch.randn(job["batch_size"], 3, m["image_size"], m["image_size"], device=device)
  amp = job["bfloat16"] and device.type == "cuda"

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
      loss = loss_fn(x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(job["warmup"]):
    step()
  if device.type == "cuda":
    torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(job["steps"]):
    loss = step()
  loss = float(loss.item())  # waits for the device.
  step_s = (time.perf_counter() - t0) / job["steps"]
  dtype = torch.bfloat16 if amp else torch.float32
  return {"name": name, "device": f"{device.type} ({torch.get_num_threads()} threads)"
          if device.type == "cpu" else torch.cuda.get_device_name(),
          "img_per_s": job["batch_size"] / step_s, "step_s": step_s, "loss": loss,
          "matmul_flops_per_s": _matmul_peak(torch, device, dtype)}


def main(argv: Optional[list[str]] = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  print(json.dumps(time_peer(json.loads(argv[0]))), flush=True)


if __name__ == "__main__":
  main()
