"""The tasks `config.task` names. Each builds its trainable and its evaluators and hands them to
the one training loop (`train.train_and_evaluate`); 'knn' scores a pretrained encoder once.

  pretrain   the method of config.method (`mae_jax.methods`)
  finetune   `mae_jax.evaluate.finetune.Finetune` on config.init_from's encoder
  linprobe   `mae_jax.evaluate.linprobe.LinearProbe` on config.init_from's frozen encoder
  knn        k-NN top-1 of config.init_from's encoder (or a random one), WORKDIR/knn.json

Every problem found in the config, the data or a pretrained workdir is a UserError raised before
the workdir is touched.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import jax

from mae_jax import configlib, data, evaluators, lock, methods, train
from mae_jax import workdir as workdirs
from mae_jax.atomic import write_atomic
from mae_jax.errors import UserError
from mae_jax.evaluate import classifier
from mae_jax.evaluate.finetune import Finetune
from mae_jax.evaluate.linprobe import LinearProbe
from mae_jax.evaluators import knn as knn_eval
from mae_jax.evaluators.knn import evaluate_knn
from mae_jax.methods import get_method
from mae_jax.metric_writers import MetricWriter


def _run(config, workdir: str, build: Callable, devices, stop_at_step,
         allow_config_change: bool) -> dict:
  """Validates, builds `build(config, setup) -> trainable` and the evaluators, trains."""
  configlib.check_legacy_keys(config)
  evaluators.check_config(config)
  setup = train.prepare(config, devices)
  trainable = build(config, setup)
  ctx = evaluators.Context(config=config, trainable=trainable, source=setup.source,
                           mesh=setup.mesh, total_steps=setup.plan.total_steps,
                           steps_per_epoch=setup.plan.steps_per_epoch)
  return train.train_and_evaluate(config, workdirs.absolute(workdir), trainable,
                                  evaluators.build(config, ctx), setup, stop_at_step,
                                  allow_config_change)


def pretrain(config, workdir: str, devices: Optional[Sequence[jax.Device]] = None,
             stop_at_step: Optional[int] = None, allow_config_change: bool = False) -> dict:
  """Pretrains config.method in `workdir` (resuming it)."""
  return _run(config, workdir, lambda c, s: get_method(c, s.plan.total_steps), devices,
              stop_at_step, allow_config_change)


DOWNSTREAM = {"finetune": Finetune, "linprobe": LinearProbe}


def _pretrained(config) -> classifier.Pretrained:
  """The run config.init_from names, with the downstream task's own keys checked; resolves
  config.image_size 0 to that run's."""
  if config.task not in DOWNSTREAM:
    raise UserError(f"config.task must be one of {sorted(DOWNSTREAM)}, got {config.task!r}")
  pretrained = classifier.pretrained_run(config)
  classifier.check_task_keys(config)
  return pretrained


def _downstream(config, pretrained: classifier.Pretrained, source: data.Source,
                total_steps: Optional[int]):
  return DOWNSTREAM[config.task](config, total_steps, pretrained,
                                 classifier.num_classes_of(source, config.task))


def downstream_trainable(config, total_steps: Optional[int] = None):
  """The Finetune / LinearProbe trainable `config.task` names, outside a run (notebooks, tests):
  the pretrained run of config.init_from, the classes of config.dataset."""
  return _downstream(config, _pretrained(config), data.get_source(config.dataset), total_steps)


def downstream(config, workdir: str, devices: Optional[Sequence[jax.Device]] = None,
               stop_at_step: Optional[int] = None, allow_config_change: bool = False) -> dict:
  """`config.task` 'finetune' or 'linprobe': trains, evaluates, keeps the last and the best
  checkpoints; WORKDIR/<task>.json."""
  pretrained = _pretrained(config)
  out = _run(config, workdir,
             lambda c, s: _downstream(c, pretrained, s.source, s.plan.total_steps), devices,
             stop_at_step, allow_config_change)
  _write_summary(config, workdirs.absolute(workdir), out["history"])
  return out


def _write_summary(config, workdir: str, history: list[dict]) -> None:
  """WORKDIR/<task>.json: the last and the best evaluation by config.best_metric."""
  key = config.best_metric
  evals = [h for h in history if key and key in h]
  if jax.process_index() != 0 or not evals:
    return
  best = max(evals, key=lambda h: h[key])
  summary = {"task": config.task, "init_from": config.init_from,
             "random_init": bool(config.random_init), "metric": key, "last": evals[-1],
             "best": best}
  write_atomic(os.path.join(workdir, f"{config.task}.json"), json.dumps(summary, indent=2))
  print(f"{config.task}: {key} {evals[-1][key]:.4f} at the end, best {best[key]:.4f} (step "
        f"{best['step']})", flush=True)


def knn(config, workdir: str) -> dict:
  """`config.task='knn'`: k-NN top-1 of config.init_from's encoder (config.random_init: of a
  fresh one), scored with this config's data and config.knn; WORKDIR/knn.json."""
  if not config.init_from:
    raise UserError("config.init_from=PRETRAIN_WORKDIR is required")
  pre = workdirs.read_config(config.init_from, "a pretraining workdir (config.init_from)")
  with pre.unlocked():  # the pretrained model, scored with this config's data and compute.
    pre.dataset = config.dataset
    if "compute" in config:  # e.g. float32 features from a bfloat16 pretraining run.
      pre.compute = config.compute.to_dict()
      pre.compute.scan = False  # load_params gives the per-block layout.
  if config.image_size:
    configlib.set_image_size(pre, config.image_size)
  method = get_method(pre)
  source = data.get_source(config.dataset)
  if source.num_classes < 2:
    raise UserError(f"k-NN needs a labelled dataset; {source.name} has {source.num_classes} "
                    "classes")
  for split in (config.dataset.train_split, config.dataset.eval_split):
    source.check_split(split)
  knn_eval.check_pool(method, pre.image_size, config.knn.pool, "config.knn.pool")
  images = jax.numpy.zeros((1, *configlib.image_hw(pre.image_size), 3))
  fresh = method.init_params(jax.random.PRNGKey(config.seed), images)
  if config.random_init:
    params, step = fresh, None
  else:
    loaded, meta = workdirs.load_params(config.init_from, config.init_step or None)
    where = f"checkpoint of {config.init_from}"
    # Only the encoder matters (features); encoder-only imports have no decoder.
    encoder = workdirs.subtree(loaded, method.encoder_key, where)
    workdirs.check_fits(fresh[method.encoder_key], encoder, where)
    params, step = {**fresh, method.encoder_key: encoder}, meta.get("step")
  workdir = workdirs.absolute(workdir)
  train.check_workdir(workdir)
  with lock.hold(workdir):
    return _score_knn(config, workdir, pre, method, params, source, step)


def _score_knn(config, workdir: str, pre, method, params, source, step) -> dict:
  k = config.knn
  result = evaluate_knn(pre, method, params, source, k=k.k, temperature=k.temperature,
                        pool=k.pool or None, batch_size=config.batch_size)
  result = {**result, "k": k.k, "temperature": k.temperature, "init_from": config.init_from,
            "pretrain_step": step, "random_init": bool(config.random_init),
            "method": pre.method}
  write_atomic(os.path.join(workdir, "knn.json"), json.dumps(result, indent=2))
  with MetricWriter(workdir, enabled=jax.process_index() == 0, config=config) as writer:
    writer.write(step or 0, {"knn_top1": result["knn_top1"]})
  origin = "random init" if config.random_init else f"step {step}"
  print(f"k-NN top-1 {result['knn_top1']:.4f} ({pre.method} {origin}, k={k.k}, "
        f"T={k.temperature})", flush=True)
  return result


TASKS = {"pretrain": pretrain, "finetune": downstream, "linprobe": downstream, "knn": knn}


def check_config(config) -> None:
  """Every value of the config, before any data, model, file or workdir is read: the shared
  keys, config.evals and the task's own (the pretraining method's, the classifier's, k-NN's)."""
  if config.task not in TASKS:
    raise UserError(f"unknown config.task {config.task!r}; one of {sorted(TASKS)}")
  configlib.check_legacy_keys(config)
  configlib.validate_common(config)
  evaluators.check_config(config)
  if config.task == "pretrain":
    methods.check_config(config)
  elif config.task == "knn":
    knn_eval.check_task_config(config)
  else:
    DOWNSTREAM[config.task].check_config(config)


def run(config, workdir: str, **kwargs) -> dict:
  """Runs config.task in `workdir` (`kwargs`: devices, stop_at_step, allow_config_change for the
  training tasks)."""
  check_config(config)
  if config.task == "knn":  # scores once: nothing to resume.
    kwargs.pop("allow_config_change", None)
  return TASKS[config.task](config, workdir, **kwargs)
