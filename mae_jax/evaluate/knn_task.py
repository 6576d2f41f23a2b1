"""`config.task = 'knn'`: k-NN top-1 of a pretraining run's encoder (or of a random one).

The model is rebuilt from INIT_FROM/config.json (the resolved config every pretraining run saves),
so the k-NN config names only where the pretrained run is and which labelled data to score on.
Writes WORKDIR/knn.json and the same figure to metrics.jsonl / TensorBoard.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import tensorflow as tf

from mae_jax import data
from mae_jax.errors import UserError
from mae_jax.evaluate.encoder_init import check_fits, encoder_params, load_pretrained
from mae_jax.evaluate.knn import evaluate_knn
from mae_jax.methods import get_method
from mae_jax.metric_writers import MetricWriter


def pretraining_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a pretraining run saved in WORKDIR/config.json."""
  path = os.path.join(workdir, "config.json")
  if not tf.io.gfile.exists(path):
    raise UserError(f"{path} not found: config.init_from must be a pretraining workdir")
  with tf.io.gfile.GFile(path) as f:
    try:
      return ml_collections.ConfigDict(json.load(f))
    except json.JSONDecodeError as e:
      raise UserError(f"{path} is not valid JSON: {e}") from None


def run_knn(config, workdir: str) -> dict:
  from mae_jax import train  # the workdir check is shared with training.

  if not config.init_from:
    raise UserError("config.init_from=PRETRAIN_WORKDIR is required")
  pre = pretraining_config(config.init_from)
  # The pretrained model, scored with this config's data and k-NN settings.
  with pre.unlocked():
    pre.dataset = config.dataset
    if config.image_size:
      pre.image_size = config.image_size
  method = get_method(pre)
  source = data.get_source(config.dataset)
  if source.num_classes < 2:
    raise UserError(f"k-NN needs a labelled dataset; {source.name} has {source.num_classes} "
                    "classes")
  for split in (config.dataset.train_split, config.dataset.eval_split):
    source.check_split(split)
  images = jax.numpy.zeros((1, pre.image_size, pre.image_size, 3))
  fresh = method.init_params(jax.random.PRNGKey(config.seed), images)
  if config.random_init:
    params, step = fresh, None
  else:
    loaded, meta = load_pretrained(config.init_from, config.init_step or None)
    # Only the encoder matters (features); encoder-only imports have no decoder.
    encoder = encoder_params(loaded, method)
    check_fits(fresh[method.encoder_key], encoder, f"checkpoint of {config.init_from}")
    params, step = {**fresh, method.encoder_key: encoder}, meta.get("step")
  train.check_workdir(workdir)
  result = evaluate_knn(pre, method, params, source, k=config.knn.k,
                        temperature=config.knn.temperature, pool=config.knn.pool or None,
                        batch_size=config.batch_size)
  result = {**result, "k": config.knn.k, "temperature": config.knn.temperature,
            "init_from": config.init_from, "pretrain_step": step,
            "random_init": bool(config.random_init), "method": pre.method}
  with tf.io.gfile.GFile(os.path.join(workdir, "knn.json"), "w") as f:
    json.dump(result, f, indent=2)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write(step or 0, {"knn_top1": result["knn_top1"]})
  writer.close()
  origin = "random init" if config.random_init else f"step {step}"
  print(f"k-NN top-1 {result['knn_top1']:.4f} ({pre.method} {origin}, k={config.knn.k}, "
        f"T={config.knn.temperature})", flush=True)
  return result
