r"""Does pretraining help? k-NN and linear probe of a pretrained encoder vs the same model at random init.

  python -m mae_jax.evaluate.pretraining_helps --workdir=DIR [--pretrained=PRETRAIN_WORKDIR]
      [--pretrain_config=mae] [--finetune]

Without --pretrained it first runs the pretraining config (default: the MAE CPU demo on the
embedded digits) in DIR/pretrain. Then, each on the pretrained encoder and on a random one:
k-NN (configs/knn.py) and the linear probe (configs/linprobe.py), and with --finetune also
fine-tuning (configs/finetune.py), all with their default (digits) variants. Writes
DIR/pretraining_helps.json and prints a table. Exit status 1 if the pretrained encoder does not beat
the random one on k-NN and on the linear probe: an example that fails when pretraining stops
helping. It takes minutes on a CPU (about 15 on 2 cores), so it is an example, not a unit test.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "Where the runs and the summary go.", required=True)
flags.DEFINE_string("pretrained", "", "An existing pretraining workdir (skips pretraining).")
flags.DEFINE_string("pretrain_config", "mae", "Pretraining config to run first (a file or a shipped "
                    "config's name, e.g. mae:vit_s16).")
flags.DEFINE_bool("finetune", False, "Also fine-tune both (slower).")
FLAGS = flags.FLAGS


def verdict(results: dict) -> tuple[bool, list[str]]:
  """(pretraining helps on every evaluation, lines of the table). `results`: {evaluation:
  {'pretrained': top-1, 'random': top-1}}; k-NN and linear probe decide."""
  lines = [f"{'evaluation':<12} {'pretrained':>10} {'random':>8}"]
  helps = True
  for name, r in results.items():
    lines.append(f"{name:<12} {r['pretrained']:>10.4f} {r['random']:>8.4f}")
    if name in ("knn", "linprobe") and not r["pretrained"] > r["random"]:
      helps = False
  return helps, lines


def _config(spec: str, **values):
  from mae_jax import config_files
  return config_files.load(spec, **values)


def main(argv):
  del argv
  from mae_jax import tasks
  from mae_jax.atomic import write_atomic
  from mae_jax.errors import UserError
  from mae_jax.workdir import absolute

  workdir = absolute(FLAGS.workdir)
  try:
    pretrained = FLAGS.pretrained
    if pretrained and not os.path.isfile(os.path.join(pretrained, "config.json")):
      raise UserError(f"--pretrained={pretrained} is not a pretraining workdir (no config.json)")
    if not pretrained:
      pretrained = os.path.join(workdir, "pretrain")
      tasks.pretrain(_config(FLAGS.pretrain_config), pretrained)
    pretrained = absolute(pretrained)
    results = {}
    evaluations = ["knn", "linprobe"] + (["finetune"] if FLAGS.finetune else [])
    for task in evaluations:
      results[task] = {}
      for random_init in (False, True):
        name = "random" if random_init else "pretrained"
        c = _config(task, init_from=pretrained, random_init=random_init)
        out_dir = os.path.join(workdir, f"{task}_{name}")
        if task == "knn":
          top1 = tasks.knn(c, out_dir)["knn_top1"]
        else:
          out = tasks.TASKS[task](c, out_dir)
          top1 = [h for h in out["history"] if c.best_metric in h][-1][c.best_metric]
        results[task][name] = float(top1)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  helps, lines = verdict(results)
  write_atomic(os.path.join(workdir, "pretraining_helps.json"),
               json.dumps({"pretrained_workdir": pretrained, "results": results,
                           "helps": helps}, indent=2))
  print("\n".join(lines))
  print("pretraining helps" if helps else "PRETRAINING DOES NOT HELP", flush=True)
  sys.exit(0 if helps else 1)


if __name__ == "__main__":
  app.run(main)
