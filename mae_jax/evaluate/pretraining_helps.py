r"""Does pretraining help? k-NN and linear probe of a pretrained encoder vs the same model at random init.

  python -m mae_jax.evaluate.pretraining_helps --workdir=DIR [--pretrained=PRETRAIN_WORKDIR]
      [--pretrain_config=configs/mae.py] [--finetune]

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
flags.DEFINE_string("pretrain_config", "configs/mae.py", "Pretraining config to run first.")
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


def _config(path: str, **values):
  import importlib.util

  from mae_jax.errors import UserError

  file, _, variant = path.partition(":")
  if not os.path.isfile(file):
    raise UserError(f"config file {file} not found")
  spec = importlib.util.spec_from_file_location("cfg", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(variant or None)
  for k, v in values.items():
    setattr(c, k, v)
  return c


def main(argv):
  del argv
  from mae_jax import tasks
  from mae_jax.errors import UserError
  from mae_jax.workdir import absolute

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  workdir = absolute(FLAGS.workdir)
  try:
    pretrained = FLAGS.pretrained
    if pretrained and not os.path.isfile(os.path.join(pretrained, "config.json")):
      raise UserError(f"--pretrained={pretrained} is not a pretraining workdir (no config.json)")
    if not pretrained:
      pretrained = os.path.join(workdir, "pretrain")
      tasks.pretrain(_config(os.path.join(root, FLAGS.pretrain_config)), pretrained)
    pretrained = absolute(pretrained)
    results = {}
    tasks = ["knn", "linprobe"] + (["finetune"] if FLAGS.finetune else [])
    for task in tasks:
      results[task] = {}
      for random_init in (False, True):
        name = "random" if random_init else "pretrained"
        c = _config(os.path.join(root, "configs", f"{task}.py"), init_from=pretrained,
                    random_init=random_init)
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
  with open(os.path.join(workdir, "pretraining_helps.json"), "w") as f:
    json.dump({"pretrained_workdir": pretrained, "results": results, "helps": helps}, f, indent=2)
  print("\n".join(lines))
  print("pretraining helps" if helps else "PRETRAINING DOES NOT HELP", flush=True)
  sys.exit(0 if helps else 1)


if __name__ == "__main__":
  app.run(main)
