r"""`python -m mae_jax.convert`: Orbax workdir -> PyTorch file, and back.

  python -m mae_jax.convert export --workdir=W [--step=N] [--format=auto|timm|mae|convmae] \
      --out=FILE.safetensors|.pth [--image_size=N|H,W] [--no_head] [--best] [--force]
  python -m mae_jax.convert export --workdir=W --format=hf|timm --out=DIR   # model folders
  python -m mae_jax.convert import --src=FILE|DIR --workdir=OUT [--arch=auto|mae|convmae|timm] \
      [--variant=B/16|base] [--image_size=N|H,W] [--decoder_heads=N] \
      [--norm_pix_loss=true|false] [--force]

Problems the user can fix end as one line `error: ...` on stderr with exit code 2 (as
mae_jax.main). Existing output files and non-empty workdirs are kept unless --force.
"""

from __future__ import annotations

import argparse
import sys

from mae_jax import configlib
from mae_jax.cli import fail, quiet_orbax, run_then_exit
from mae_jax.errors import UserError


PROG = "python -m mae_jax.convert"


class _Parser(argparse.ArgumentParser):
  """argparse with the project's one-line errors (argparse prints usage + message)."""

  def error(self, message: str):
    fail(f"{message} (see {self.prog} --help)")


def _bool(text: str) -> bool:
  if text.lower() in ("true", "1", "yes"):
    return True
  if text.lower() in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _image_size(text: str):
  """'224' -> 224, '224,320' (or '(224, 320)', config_flags' spelling) -> (224, 320)."""
  parts = [p.strip() for p in text.strip().strip("()").split(",")]
  try:
    sides = [int(p) for p in parts]
  except ValueError:
    sides = []
  if len(sides) not in (1, 2) or min(sides) < 1:
    raise argparse.ArgumentTypeError(f"expected N or H,W (positive integers), got {text!r}")
  return sides[0] if len(sides) == 1 else tuple(sides)


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG,
              description="Convert checkpoints between Orbax workdirs and PyTorch files.")
  sub = p.add_subparsers(dest="command", required=True, metavar="{export,import}",
                         parser_class=_Parser)
  e = sub.add_parser("export", help="Orbax workdir -> .safetensors / .pth")
  e.add_argument("--workdir", required=True, help="pretraining or fine-tuning workdir")
  e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  e.add_argument("--format", default="auto", choices=("auto", "timm", "mae", "convmae", "hf"),
                 help="timm: the ViT encoder in timm's layout (a file, or a folder for "
                      "timm.create_model('local-dir:DIR', pretrained=True)); mae / convmae: the "
                      "whole model in the official release layout; hf: a Hugging Face folder "
                      "(ViTMAEForPreTraining, or ViTForImageClassification for a [CLS] "
                      "classifier); auto: by the workdir's method")
  e.add_argument("--out", required=True,
                 help="FILE.safetensors or FILE.pth, or a folder DIR for --format=hf / timm "
                      "(publish it with huggingface_hub.upload_folder(repo_id=..., "
                      "folder_path=DIR))")
  e.add_argument("--image_size", type=_image_size, default=None,
                 help="N or H,W: write the sin-cos position embeddings for this image size")
  e.add_argument("--no_head", action="store_true", help="leave a classifier's head out")
  e.add_argument("--best", action="store_true",
                 help="a fine-tuning workdir's best checkpoint (WORKDIR/best)")
  e.add_argument("--force", action="store_true", help="overwrite --out")
  i = sub.add_parser("import", help=".safetensors / .pth -> Orbax pseudo-pretraining workdir")
  i.add_argument("--src", required=True, help="a .pth (loaded weights-only) or .safetensors, or "
                 "a Hugging Face / timm model folder (config.json + model.safetensors)")
  i.add_argument("--workdir", required=True, help="new workdir for config.init_from")
  i.add_argument("--arch", default="auto", choices=("auto", "mae", "convmae", "timm"),
                 help="mae: official MAE (decoder too when present); timm: ViT encoder only")
  i.add_argument("--variant", default=None, help="force a size: NAME/PATCH (ViT) or NAME (ConvMAE)")
  i.add_argument("--image_size", type=_image_size, default=None,
                 help="N or H,W (default: our export's config, else a square grid from "
                      "pos_embed)")
  i.add_argument("--decoder_heads", type=int, default=None,
                 help="decoder heads (not in the weights; default 16, the official MAE's)")
  i.add_argument("--norm_pix_loss", type=_bool, default=None,
                 help="false for the official visualize release (pixel targets)")
  i.add_argument("--force", action="store_true", help="replace OUT's config.json and checkpoints/")
  return p


def main(argv: list[str] | None = None) -> None:
  args = parser().parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # Orbax notices are console noise here.
  quiet_orbax()
  from mae_jax.convert import workdirs
  try:
    if args.command == "export":
      out = workdirs.export_workdir(args.workdir, args.out, fmt=args.format, step=args.step,
                                    image_size=args.image_size, head=not args.no_head,
                                    best=args.best, force=args.force)
      print(f"wrote {out['out']}: {out['layout']} layout, {out['num_arrays']} arrays, "
            f"{out['num_params'] / 1e6:.2f}M values, from {out['source']}")
      print(f"load with: {out['hint']}")
    else:
      out = workdirs.import_checkpoint(args.src, args.workdir, arch=args.arch,
                                       variant=args.variant, image_size=args.image_size,
                                       decoder_heads=args.decoder_heads,
                                       norm_pix_loss=args.norm_pix_loss, force=args.force)
      for note in out["notes"]:
        print(f"note: {note}")
      what = "encoder + decoder" if out["decoder"] else "encoder only"
      size = configlib.image_size_text(out["image_size"])
      print(f"wrote {out['workdir']}: {out['method']} {out['variant']} at {size} px, {what}, "
            f"{out['num_params'] / 1e6:.2f}M params (step 0)")
      print(f"use with: --config.init_from={out['workdir']}")
  except UserError as e:
    fail(str(e))


if __name__ == "__main__":
  run_then_exit(main, sys.argv[1:])
