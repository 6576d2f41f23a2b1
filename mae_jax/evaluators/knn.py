"""k-NN top-1 of the encoder during training, and the weighted k-NN classifier behind it
(InstDisc / DINO `knn_classifier`).

  config.evals.knn = dict(type="knn", every_steps=N, k=20, temperature=0.07, pool="",
                          batch_size=0)

Features are L2-normalized; each test image takes the k training images of highest cosine
similarity, each votes for its label with weight exp(sim / T), and the class with the largest
summed weight wins. DINO's defaults: k = 20, T = 0.07. The similarity matrix is built in chunks of
test rows, so memory stays at chunk x num_train.
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import configlib, data
from mae_jax.errors import UserError
from mae_jax.evaluators.base import Context, Periodic

# pool '' = the method's default ('cls' for MAE, 'avg' for ConvMAE); batch_size 0 =
# config.batch_size.
DEFAULTS = {"k": 20, "temperature": 0.07, "pool": "", "batch_size": 0}
# Also the rules of config.knn of the 'knn' task (k, temperature, pool).
CHECKS = {"k": configlib.integer("[1, inf)"), "temperature": configlib.number("(0, inf)"),
          "pool": configlib.one_of("", "cls", "avg"), "batch_size": configlib.integer("[0, inf)")}


def check_task_config(config) -> None:
  """config.knn of the 'knn' task: k, temperature and pool as an evaluator entry's."""
  configlib.check(config.knn, {k: CHECKS[k] for k in ("k", "temperature", "pool")},
                  where="config.knn")


def check_pool(method, image_size, pool: str, where: str) -> None:
  """UserError naming `where` if `method`'s features do not take `pool` ('' = the method's
  default; ConvMAE has no cls token) at image_size (S or (H, W)); traced abstractly, nothing is
  computed."""
  images = jax.ShapeDtypeStruct((1, *configlib.image_hw(image_size), 3), jnp.float32)
  params = jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images)
  try:
    jax.eval_shape(lambda p, x: method.features(p, x, pool or None), params, images)
  except UserError as e:
    raise UserError(f"{where}={pool!r}: {e}") from None


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=16)
def _features_fn(method, pool: Optional[str]):
  """One jitted feature function per (method, pool), so both splits of an evaluation and every
  periodic k-NN eval of a run reuse one compilation."""
  return jax.jit(lambda p, x: _l2_normalize(method.features(p, x, pool)))


def extract(method, params, batches: Iterable[dict], pool: Optional[str] = None
            ) -> tuple[np.ndarray, np.ndarray]:
  """(features float32 [N, D], L2-normalized; labels int [N]) over `eval_batches`-style dicts
  {'image', 'label', 'mask'}; rows with mask 0 (padding) are dropped."""
  features_fn = _features_fn(method, pool)
  feats, labels = [], []
  for batch in batches:
    keep = np.asarray(batch["mask"]) > 0
    out = np.asarray(features_fn(params, batch["image"]))  # [B, D]
    feats.append(out[keep])
    labels.append(np.asarray(batch["label"])[keep])
  if not feats:
    raise UserError("k-NN feature extraction got no batches")
  return np.concatenate(feats), np.concatenate(labels)


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "temperature"))
def _vote(train_feats, train_labels, test_feats, *, num_classes: int, k: int,
          temperature: float) -> jax.Array:
  """Predicted labels [C] for one chunk of test rows [C, D] (all features normalized)."""
  sim = test_feats @ train_feats.T  # [C, N_train]
  top_sim, top_idx = jax.lax.top_k(sim, k)  # [C, k]
  weights = jnp.exp(top_sim / temperature)
  onehot = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=jnp.float32)  # [C, k, cls]
  votes = jnp.einsum("ck,ckn->cn", weights, onehot)
  return jnp.argmax(votes, axis=-1)


def knn_classify(train_feats, train_labels, test_feats, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 256) -> np.ndarray:
  """Predicted labels [N_test]: cosine top-k neighbours, votes exp(sim / temperature) per class.

  Features are L2-normalized here (a no-op for `extract`'s). k is capped at the training size.
  """
  if num_classes < 1:
    raise UserError("k-NN needs labels: the dataset has no classes")
  if k < 1 or temperature <= 0:
    raise UserError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, T={temperature}")
  train_feats = _l2_normalize(jnp.asarray(train_feats))
  train_labels = jnp.asarray(train_labels, jnp.int32)
  test_feats = np.asarray(test_feats, np.float32)
  k = min(k, train_feats.shape[0])
  n = test_feats.shape[0]
  preds = []
  for start in range(0, n, chunk):
    rows = test_feats[start:start + chunk]
    padded = np.zeros((chunk, rows.shape[1]), np.float32)  # one static shape: one compile.
    padded[:len(rows)] = rows
    pred = _vote(train_feats, train_labels, _l2_normalize(jnp.asarray(padded)),
                 num_classes=num_classes, k=k, temperature=float(temperature))
    preds.append(np.asarray(pred)[:len(rows)])
  return np.concatenate(preds) if preds else np.zeros((0,), np.int32)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                 k: int = 20, temperature: float = 0.07) -> float:
  """Top-1 accuracy of `knn_classify` on (test_feats, test_labels)."""
  pred = knn_classify(train_feats, train_labels, test_feats, num_classes, k, temperature)
  return float(np.mean(pred == np.asarray(test_labels)))


def evaluate_knn(config, method, params, source: data.Source, *, k: int = 20,
                 temperature: float = 0.07, pool: Optional[str] = None,
                 batch_size: Optional[int] = None) -> dict[str, float]:
  """{'knn_top1': ...}: features of config.dataset.train_split (the k-NN memory) against those of
  config.dataset.eval_split, both through the deterministic eval transform (resize, centre crop).

  One process reads both splits whole (no sharding across hosts); `params` is the full
  pretraining tree of `method`.
  """
  d = config.dataset
  batch_size = batch_size or config.batch_size

  def split_features(split):
    batches = data.eval_batches(source, d, split=split, image_size=config.image_size,
                                global_batch_size=batch_size)
    return extract(method, params, batches, pool)

  train_feats, train_labels = split_features(d.train_split)
  test_feats, test_labels = split_features(d.eval_split)
  acc = knn_accuracy(train_feats, train_labels, test_feats, test_labels, source.num_classes,
                     k, temperature)
  return {"knn_top1": acc}


class Evaluator(Periodic):
  """{'top1'}: `evaluate_knn` with the method's current parameters (train split as the memory,
  eval split scored)."""

  def __init__(self, cfg, ctx: Context):
    super().__init__(cfg.every_steps, ctx.total_steps)
    configlib.check(cfg, CHECKS, where="config.evals.knn")  # when built outside `build`.
    if ctx.source.num_classes < 2:
      raise UserError(f"a k-NN evaluator needs a labelled dataset; {ctx.source.name} has "
                      f"{ctx.source.num_classes} classes")
    ctx.source.check_split(ctx.config.dataset.eval_split)
    check_pool(ctx.trainable, ctx.config.image_size, cfg.pool, "config.evals knn: pool")
    self.cfg, self.ctx = cfg, ctx

  def run(self, state) -> dict[str, float]:
    c = self.cfg
    result = evaluate_knn(self.ctx.config, self.ctx.trainable, state.params, self.ctx.source,
                          k=c.k, temperature=c.temperature, pool=c.pool or None,
                          batch_size=c.batch_size or None)
    return {"top1": result["knn_top1"]}
