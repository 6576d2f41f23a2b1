r"""`python -m mae_jax.analyze`: figures (PNG) and their numbers (JSON) from a pretraining workdir.

  python -m mae_jax.analyze --workdir=W [--what=all|recon,attention_distance,head_diversity,cka,
      droppos] [--step=0] [--out=W/analysis] [--num_images=8] [--stat_images=256] [--split=S]
      [--seed=0] [--batch_size=64] [--data_dir=D] [--images=FILE_OR_FOLDER]

--what=all runs every analysis that fits the workdir's method (recon for methods that predict
pixels, droppos for DropPos, the attention ones for all; an encoder-only import gets the attention
ones). --images analyzes the user's own image files (a folder: its images sorted by name, the
first --num_images) instead of a split, without opening the run's dataset. Naming an analysis
that does not fit, a missing workdir or checkpoint, an unknown split or no readable image ends
with one line `error: ...` on stderr and exit code 2 (as mae_jax.main). See
mae_jax/analyze/run.py for what each analysis computes.
"""

from __future__ import annotations

import argparse
import sys

from mae_jax.cli import fail, quiet_orbax, run_then_exit
from mae_jax.errors import UserError

PROG = "python -m mae_jax.analyze"


class _Parser(argparse.ArgumentParser):
  """argparse with the project's one-line errors (argparse prints usage + message)."""

  def error(self, message: str):
    fail(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description="Figures (PNG) and numbers (JSON) of what a masked image "
                                     "model learned: reconstructions, attention distance, head "
                                     "diversity, layer CKA, DropPos positions.")
  p.add_argument("--workdir", required=True,
                 help="a pretraining workdir (mae_jax.main, or one mae_jax.convert imported)")
  p.add_argument("--what", default="all",
                 help="comma-separated: recon, attention_distance, head_diversity, cka, droppos; "
                      "or all (default): every one that fits the method")
  p.add_argument("--step", type=int, default=0, help="checkpoint step (0 = latest)")
  p.add_argument("--out", default="", help="output folder (default WORKDIR/analysis)")
  p.add_argument("--num_images", type=int, default=8,
                 help="images shown in the recon and droppos figures (with --images: the most "
                      "files read from the folder)")
  p.add_argument("--stat_images", type=int, default=256,
                 help="images averaged for attention and position statistics (0 = the split)")
  p.add_argument("--split", default="", help="dataset split (default: the run's eval_split)")
  p.add_argument("--seed", type=int, default=0, help="seed of the masks")
  p.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
  p.add_argument("--data_dir", default="",
                 help="tfds data_dir, when the run's config.dataset.data_dir is elsewhere")
  p.add_argument("--images", default="",
                 help="an image file or a folder of images (jpg, png, ...) to analyze instead "
                      "of a dataset split; the dataset is not opened")
  return p


def main(argv: list[str] | None = None) -> list[str]:
  args = parser().parse_args(argv)
  for name, least in (("step", 0), ("num_images", 1), ("stat_images", 0), ("batch_size", 1)):
    if getattr(args, name) < least:
      fail(f"--{name} must be >= {least}, got {getattr(args, name)}")
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # Orbax notices are console noise here.
  quiet_orbax()
  try:
    from mae_jax.analyze import run
    opened = run.open_workdir(args.workdir, step=args.step, split=args.split, out=args.out,
                              data_dir=args.data_dir, images=args.images,
                              num_images=args.num_images, stat_images=args.stat_images,
                              batch_size=args.batch_size, seed=args.seed)
    names = run.resolve(args.what, opened.method, opened.config.method, opened.whole)
    on = (f"{len(opened.images)} images of {args.images}" if opened.images else opened.split)
    print(f"{opened.config.method} step {opened.step}: {', '.join(names)} on {on}", flush=True)
    written = run.analyze(opened, names)
  except UserError as e:
    fail(str(e))
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  for path in written:
    print(f"wrote {path}")
  return written


if __name__ == "__main__":
  run_then_exit(main)
