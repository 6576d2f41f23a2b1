"""The analyses of `python -m mae_jax.analyze`: each writes OUT/<name>.png and OUT/<name>.json.

  recon               N images: original / masked input / reconstruction /
                      reconstruction with the visible patches pasted back (methods with a
                      `reconstruct` hook: MAE, ConvMAE, SimMIM, SplitMask).
  attention_distance  averaged attention distance (input pixels) per layer and head of the
                      encoder on whole images (no mask), [CLS] dropped, rows renormalized (the
                      JSON also has the raw values); one dot per head, the mean as a line, the
                      uniform-attention distance dashed.
  head_diversity      per head, the mean KL divergence to the layer's other heads.
  cka                 linear CKA between every two layers' patch tokens (per batch, averaged).
  droppos             DropPos: which dropped positions the model recovers (figure: outlines and
                      the visible patches placed where the model puts them; droppos_accuracy.png:
                      accuracy per true position).

The images are a split of the run's dataset (eval transform), or the user's own files
(`open_workdir(images=FILE_OR_FOLDER)`, the same transform, no dataset opened). Definitions of the
numbers: mae_jax.analyze.metrics. Every ViT encoder of our methods works, and ConvMAE's stage-3
transformer blocks (16 px per token); an imported encoder-only release gets the attention
analyses. One process, the first local device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from flax import traverse_util

from mae_jax import api, configlib, data
from mae_jax import workdir as workdirs
from mae_jax.analyze import metrics
from mae_jax.atomic import write_atomic
from mae_jax.errors import UserError
from mae_jax.evaluators import panels as image_panels
from mae_jax.methods import get_method
from mae_jax.models.vit import Block, ViT

ANALYSES = ("recon", "attention_distance", "head_diversity", "cka", "droppos")
ATTENTION_ANALYSES = ("attention_distance", "head_diversity", "cka")
DEFAULT_OUT = "analysis"  # under the workdir


@dataclasses.dataclass
class Loaded:
  """A pretraining workdir's model, ready for analysis."""
  config: ml_collections.ConfigDict  # float32, unrolled blocks (they sow the attention maps)
  method: Any
  params: Any
  step: int
  whole: bool  # params hold the whole model; False: the encoder alone (an encoder-only import)


def encoder_for(method, params) -> Any:
  """The encoder module of params[method.encoder_key]: the method's own, or for a ViT whose params
  carry a `pos_embed` (an imported supervised ViT's learned one) that ViT with
  learnable_pos_embed, so the stored embedding is used instead of the sin-cos constant."""
  module = method.encoder_module
  if (isinstance(module, ViT) and not module.learnable_pos_embed
      and "pos_embed" in params[method.encoder_key]):
    return module.clone(parent=None, learnable_pos_embed=True)
  return module


def check_params(method, params, image_size, where: str) -> bool:
  """UserError (one line) unless `params` fit `method` at `image_size`: the whole tree, or its
  encoder alone (an encoder-only release; a learned ViT pos_embed included). True for the whole
  tree."""
  images = jnp.zeros((1, *configlib.image_hw(image_size), 3), jnp.float32)
  expected = jax.eval_shape(method.init_params, jax.random.PRNGKey(0), images)
  key = method.encoder_key
  encoder = encoder_for(method, params) if key in params else method.encoder_module
  if encoder is not method.encoder_module:
    expected = {**expected, key: jax.eval_shape(encoder.init, jax.random.PRNGKey(0),
                                                images)["params"]}
  if key in params and set(params) == {key} != set(expected):
    workdirs.check_fits(expected[key], params[key], f"{where} (encoder only)")
    return False
  workdirs.check_fits(expected, params, where)
  return True


def load_model(workdir: str, step: int = 0) -> Loaded:
  """The config and params of checkpoint `step` (0 = latest) of a pretraining workdir; UserError
  for a missing workdir or checkpoint, another task's workdir, or a checkpoint of another model."""
  config = workdirs.read_config(workdir, "a pretraining workdir")
  if config.get("task", "pretrain") != "pretrain":
    raise UserError(f"{workdir} is a {config.task!r} workdir; a pretraining workdir is needed")
  if "compute" in config:  # float32, unrolled blocks: scanned blocks sow no attention maps.
    config.compute.update(dtype="float32", remat=False, scan=False)
  method = get_method(config)
  params, meta = workdirs.load_params(workdir, step or None)
  whole = check_params(method, params, config.image_size, f"checkpoint of {workdir}")
  return Loaded(config=config, method=method, params=params, step=int(meta.get("step", step)),
                whole=whole)


@dataclasses.dataclass
class Run:
  """A pretraining workdir opened for analysis, and the options of this analysis."""
  workdir: str
  config: ml_collections.ConfigDict
  method: Any
  params: Any
  step: int
  source: Optional[data.Source]  # None with `images`
  split: str
  out: str
  num_images: int = 8
  stat_images: int = 256  # 0 = the whole split
  batch_size: int = 64
  seed: int = 0
  images: tuple[str, ...] = ()  # the user's image files, read instead of a split
  images_from: str = ""  # the file or folder they were given as
  whole: bool = True  # False: the params are the encoder alone (no recon, no droppos)

  @property
  def key(self) -> jax.Array:
    return jax.random.PRNGKey(self.seed)

  @property
  def label(self) -> str:
    """What the images are, for figure titles: the split, or the name of the user's folder."""
    if not self.images:
      return self.split
    return os.path.basename(os.path.normpath(self.images_from)) or self.images_from

  def header(self, analysis: str) -> dict:
    record = {"analysis": analysis, "workdir": self.workdir, "step": self.step,
              "method": self.config.method, "variant": self.config.model.get("variant"),
              "image_size": self.config.image_size, "split": self.split or None,
              "seed": self.seed}
    if self.images:
      record["images"] = os.path.abspath(self.images_from)
    return record

  def write_json(self, name: str, record: dict) -> str:
    path = os.path.join(self.out, f"{name}.json")
    write_atomic(path, json.dumps(record, indent=2))
    return path

  def _read(self, paths) -> np.ndarray:
    d = self.config.dataset
    return api.read_images(list(paths), self.config.image_size, d.mean, d.std)

  def first_images(self) -> np.ndarray:
    """The first `num_images` images of the split or of `images` (eval transform), [n, s, s, 3]."""
    if self.images:
      return self._read(self.images[:self.num_images])
    batches = data.eval_batches(self.source, self.config.dataset, split=self.split,
                                image_size=self.config.image_size,
                                global_batch_size=self.num_images)
    try:
      batch = next(batches)
    finally:
      batches.close()
    return batch["image"][batch["mask"] > 0]

  def batches(self, limit: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images [batch_size, s, s, 3], weights [batch_size]) over the split (or `images`) in order
    until `limit` images (0: all). Weight 0 marks padding and images past the limit, so every
    batch has one shape (one compilation)."""
    if self.images:
      yield from self._image_batches(limit)
      return
    batches = data.eval_batches(self.source, self.config.dataset, split=self.split,
                                image_size=self.config.image_size,
                                global_batch_size=self.batch_size)
    seen = 0
    try:
      for batch in batches:
        weights = (np.asarray(batch["mask"]) > 0).astype(np.float32)
        if limit:
          weights *= (seen + np.cumsum(weights)) <= limit
        if not weights.any():
          break
        seen += int(weights.sum())
        yield batch["image"], weights
        if limit and seen >= limit:
          break
    finally:
      batches.close()

  def _image_batches(self, limit: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    paths = self.images[:limit] if limit else self.images
    for start in range(0, len(paths), self.batch_size):
      images = self._read(paths[start:start + self.batch_size])
      weights = np.zeros(self.batch_size, np.float32)
      weights[:len(images)] = 1.0
      pad = np.zeros((self.batch_size - len(images),) + images.shape[1:], np.float32)
      yield np.concatenate([images, pad]), weights


def open_workdir(workdir: str, *, step: int = 0, split: str = "", out: str = "",
                 data_dir: str = "", images: str = "", **options) -> Run:
  """Reads WORKDIR/config.json and the params of checkpoint `step` (0 = latest), and opens the
  run's dataset, or with `images` (an image file or a folder of them, up to
  options['num_images']) only those files; UserError for a missing workdir or checkpoint, a
  checkpoint of another model, an unknown split, or no readable image files."""
  if not workdir:
    raise UserError("--workdir is required")
  if images and (split or data_dir):
    raise UserError(f"--images reads {images} instead of a dataset split: drop "
                    f"{'--split' if split else '--data_dir'}")
  loaded = load_model(workdir, step)
  config = loaded.config
  source, files = None, ()
  if images:  # checked before the output folder is made: a typo leaves nothing behind.
    files = tuple(api.image_files(images, options.get("num_images", 8)))
  else:
    if data_dir:
      config.dataset.data_dir = data_dir
    source = data.get_source(config.dataset)
    split = split or config.dataset.eval_split
    source.check_split(split)
  out = out or os.path.join(workdir, DEFAULT_OUT)
  try:
    tf.io.gfile.makedirs(out)
  except (tf.errors.OpError, OSError) as e:
    raise UserError(f"--out {out} cannot be created: {type(e).__name__}") from None
  return Run(workdir=workdir, config=config, method=loaded.method, params=loaded.params,
             step=loaded.step, source=source, split=split, out=out, images=files,
             images_from=images, whole=loaded.whole, **options)


@functools.lru_cache(maxsize=16)
def jitted(method, name: str) -> Callable:
  """`jax.jit(getattr(method, name))`, one per (method, hook): repeated analyses of one method in
  a process (a notebook, the tests) compile once per input shape."""
  return jax.jit(getattr(method, name))


def applicable(method, whole: bool = True) -> list[str]:
  """The analyses that fit `method` (attention ones: every encoder with attention layers); with
  `whole` False (params of the encoder alone) only the attention ones."""
  names = list(ATTENTION_ANALYSES)
  if whole and method.reconstruct is not None:
    names.insert(0, "recon")
  if whole and hasattr(method, "predict_positions"):
    names.append("droppos")
  return names


def resolve(what: str, method, method_name: str, whole: bool = True) -> list[str]:
  """--what (comma-separated names or 'all') -> the analyses to run, in ANALYSES order."""
  asked = [w.strip() for w in what.split(",") if w.strip()]
  if not asked:
    raise UserError(f"--what is empty; choose from {', '.join(ANALYSES)} or all")
  fits = applicable(method, whole)
  if "all" in asked:
    return fits
  for name in asked:
    if name not in ANALYSES:
      raise UserError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)} or all")
    if name not in fits:
      if name in applicable(method):
        raise UserError(f"--what={name} does not apply: the checkpoint holds the encoder alone "
                        "(an encoder-only release), not the whole model")
      why = {"recon": "predicts no pixels", "droppos": "predicts no positions (DropPos only)"}
      raise UserError(f"--what={name} does not apply: method {method_name!r} "
                      f"{why.get(name, 'has no attention layers')}")
  return [name for name in ANALYSES if name in asked]


# ----------------------------------------------------------------------------- reconstructions


def reconstruct_panels(method, params, images, key, mean, std) -> dict[str, Any]:
  """`method.reconstruct` of dataset-normalized images [B, s, s, 3] for the masks of `key`, as
  {'panels': {image_panels.PANELS name: [B, s, s, 3] in [0, 1]}, 'mask': [B, s, s, 1] (1 =
  hidden), 'hidden_mse': [B]} (numpy; the recon analysis and mae_jax.api share it)."""
  recon = jax.device_get(jitted(method, "reconstruct")(params, images, key))
  return {"panels": image_panels.panels(images, recon, mean, std),
          "mask": np.asarray(recon["mask"], np.float32),
          "hidden_mse": image_panels.hidden_mse(images, recon, mean, std)}


def reconstructions(run: Run) -> list[str]:
  from mae_jax.analyze import plots
  images = run.first_images()
  d = run.config.dataset
  got = reconstruct_panels(run.method, run.params, images, run.key, d.mean, d.std)
  shown, errors = got["panels"], got["hidden_mse"]
  hidden = got["mask"].mean(axis=(1, 2, 3))
  norm_pix = bool(run.config.get("norm_pix_loss", False))
  title = (f"{run.config.method} step {run.step}: {len(images)} {run.label} images; hidden MSE "
           f"{errors.mean():.4f}")
  png = plots.image_grid({k: shown[k] for k in image_panels.PANELS},
                         os.path.join(run.out, "recon.png"), title=title)
  record = {**run.header("recon"), "num_images": len(images), "panels": list(image_panels.PANELS),
            "norm_pix_loss": norm_pix,
            "denormalization": ("each predicted patch * sqrt(var + 1e-6) + mean of the true "
                                "patch (unbiased variance)") if norm_pix else "none",
            "hidden_fraction": hidden.round(4).tolist(),
            "hidden_mse": errors.round(6).tolist(), "hidden_mse_mean": float(errors.mean()),
            "mse_units": "[0, 1] RGB after undoing the dataset mean/std",
            "figure": os.path.basename(png)}
  return [png, run.write_json("recon", record)]


# ----------------------------------------------------------------------------- attention


def _is_block_call(module, method_name: str) -> bool:
  return isinstance(module, Block) and method_name == "__call__"


def _natural(name: str) -> tuple:
  return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def encoder_intermediates(method, params, images
                          ) -> tuple[list[str], list[jax.Array], list[jax.Array]]:
  """(layer names, attention maps [B, H, T, T], block outputs [B, T, D]) of the encoder on whole
  images, in layer order: the 'attention' the Attention modules sow and every transformer Block's
  output (flax capture_intermediates). `params` is the full tree or {encoder_key: ...} alone."""
  module = encoder_for(method, params)
  _, state = module.apply({"params": params[method.encoder_key]}, images,
                          mutable=["intermediates"], capture_intermediates=_is_block_call)
  flat = traverse_util.flatten_dict(state["intermediates"])
  attention = {"/".join(k[:-2]): v[0] for k, v in flat.items() if k[-1] == "attention"}
  outputs = {"/".join(k[:-1]): v[0] for k, v in flat.items() if k[-1] == "__call__"}
  names = sorted(attention, key=_natural)
  return names, [attention[n] for n in names], [outputs[n] for n in names]


@dataclasses.dataclass
class Geometry:
  names: list[str]
  heads: int
  grid: tuple[int, int]
  stride: float  # input pixels per token
  has_cls: bool


def geometry(run: Run) -> Geometry:
  """Layers, heads, token grid and stride of the encoder, from one abstract forward pass."""
  names: list[str] = []

  def shapes(params, images):
    got, attention, _ = encoder_intermediates(run.method, params, images)
    names.extend(got)
    return attention

  size = run.config.image_size
  attention = jax.eval_shape(shapes, run.params, jnp.zeros((1, size, size, 3), jnp.float32))
  if not attention:
    raise UserError(f"the {run.config.method} encoder has no attention layers to analyze")
  heads, tokens = attention[0].shape[1], attention[0].shape[-1]
  for has_cls in (False, True):
    side = math.isqrt(tokens - has_cls)
    if side * side == tokens - has_cls:
      return Geometry(names, heads, (side, side), size / side, has_cls)
  raise UserError(f"attention over {tokens} tokens is not a square patch grid (+ [CLS])")


def attention_stats(run: Run, geo: Geometry, with_cka: bool) -> dict[str, np.ndarray]:
  """Means over the images of the split (up to run.stat_images): 'distance', 'distance_raw' and
  'diversity' [layers, heads], 'cka' [layers, layers] (with_cka), and 'num_images'."""
  n = geo.grid[0] * geo.grid[1]
  num_layers = len(geo.names)

  @jax.jit
  def batch_stats(params, images, weights):
    _, attention, outputs = encoder_intermediates(run.method, params, images)
    out = {
        "distance": jnp.stack([metrics.attention_distance(a, geo.grid, geo.stride,
                                                          weights=weights) for a in attention]),
        "distance_raw": jnp.stack([metrics.attention_distance(a, geo.grid, geo.stride, False,
                                                              weights) for a in attention]),
        "diversity": jnp.stack([metrics.head_diversity(a, n, weights) for a in attention]),
    }
    if with_cka:
      tokens = [o[:, -n:].reshape(-1, o.shape[-1]) for o in outputs]  # patch tokens [B*N, D]
      rows = jnp.repeat(weights, n)
      cka = [[None] * num_layers for _ in range(num_layers)]
      for i in range(num_layers):
        for j in range(i, num_layers):
          cka[i][j] = cka[j][i] = metrics.linear_cka(tokens[i], tokens[j], rows)
      out["cka"] = jnp.stack([jnp.stack(r) for r in cka])
    return out

  sums: dict[str, np.ndarray] = {}
  total = 0.0
  for images, weights in run.batches(run.stat_images):
    w = float(weights.sum())
    got = jax.device_get(batch_stats(run.params, images, weights))
    for k, v in got.items():
      sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64) * w
    total += w
  if not total:
    raise UserError(f"{run.label} has no images")
  return {**{k: v / total for k, v in sums.items()}, "num_images": int(total)}


def _attention_header(run: Run, geo: Geometry, analysis: str, num_images: int) -> dict:
  return {**run.header(analysis), "num_images": num_images, "layers": geo.names,
          "heads": geo.heads, "grid": list(geo.grid), "stride_px": geo.stride,
          "cls_token": geo.has_cls}


def attention_analyses(run: Run, names: list[str]) -> list[str]:
  from mae_jax.analyze import plots
  geo = geometry(run)
  stats = attention_stats(run, geo, with_cka="cka" in names)
  count = stats["num_images"]
  where = f"{run.config.method} step {run.step}, {count} {run.label} images"
  written = []
  if "attention_distance" in names:
    uniform = metrics.uniform_distance(geo.grid, geo.stride)
    png = plots.layer_scatter(
        stats["distance"], os.path.join(run.out, "attention_distance.png"),
        ylabel="attention distance (pixels)", title=f"Averaged attention distance ({where})",
        reference=uniform, reference_label=f"uniform attention ({uniform:.1f} px)")
    record = {**_attention_header(run, geo, "attention_distance", count),
              "rows_renormalized_after_dropping_cls": True,
              "distance_px": stats["distance"].round(4).tolist(),
              "mean_distance_px": stats["distance"].mean(axis=1).round(4).tolist(),
              "uniform_attention_distance_px": round(uniform, 4),
              "figure": os.path.basename(png)}
    if geo.has_cls:  # without renormalization: the mass sent to [CLS] counts as distance 0.
      record["distance_px_not_renormalized"] = stats["distance_raw"].round(4).tolist()
    written += [png, run.write_json("attention_distance", record)]
  if "head_diversity" in names:
    png = plots.layer_scatter(
        stats["diversity"], os.path.join(run.out, "head_diversity.png"),
        ylabel="KL divergence to the other heads (nats)",
        title=f"Attention-head diversity ({where})")
    record = {**_attention_header(run, geo, "head_diversity", count),
              "diversity_nats": stats["diversity"].round(5).tolist(),
              "mean_diversity_nats": stats["diversity"].mean(axis=1).round(5).tolist(),
              "figure": os.path.basename(png)}
    written += [png, run.write_json("head_diversity", record)]
  if "cka" in names:
    ticks = [str(i + 1) for i in range(len(geo.names))]
    png = plots.heatmap(stats["cka"], os.path.join(run.out, "cka.png"), ticks=ticks,
                        title=f"Linear CKA between layers ({where})", label="linear CKA",
                        axis_labels=("layer", "layer"))
    record = {**_attention_header(run, geo, "cka", count),
              "tokens": "patch tokens of each block's output; CKA per batch, averaged",
              "cka": stats["cka"].round(5).tolist(), "figure": os.path.basename(png)}
    written += [png, run.write_json("cka", record)]
  return written


# ----------------------------------------------------------------------------- DropPos


def _cells(ids: np.ndarray, grid_w: int) -> np.ndarray:
  return np.stack([ids // grid_w, ids % grid_w], axis=-1)


def position_stats(run: Run, predict: Callable, grid: tuple[int, int]) -> dict:
  """Accuracy of the dropped positions over the split (up to stat_images), per true position."""
  n = grid[0] * grid[1]
  dropped, correct = np.zeros(n), np.zeros(n)
  kept_right = kept_total = 0.0
  err_cells, within_one = [], []
  for i, (images, weights) in enumerate(run.batches(run.stat_images)):
    out = jax.device_get(predict(run.params, images, jax.random.fold_in(run.key, i + 1)))
    true, pred = np.asarray(out["ids_keep"]), np.asarray(out["pred_ids"])
    pos = np.asarray(out["pos_mask"]) * weights[:, None]  # [B, M]
    kept = (1.0 - np.asarray(out["pos_mask"])) * weights[:, None]
    right = (true == pred).astype(np.float64)
    dropped += np.bincount(true.reshape(-1), pos.reshape(-1), minlength=n)
    correct += np.bincount(true.reshape(-1), (pos * right).reshape(-1), minlength=n)
    kept_right += float((kept * right).sum())
    kept_total += float(kept.sum())
    dist = np.linalg.norm(_cells(true, grid[1]) - _cells(pred, grid[1]), axis=-1)
    sel = pos > 0
    err_cells.append(dist[sel])
    within_one.append((dist[sel] <= 1.5).astype(np.float64))  # the 8 neighbours count
  dist = np.concatenate(err_cells)
  return {"dropped": dropped, "correct": correct,
          "accuracy": float(correct.sum() / max(dropped.sum(), 1)),
          "kept_position_accuracy": float(kept_right / max(kept_total, 1)),
          "mean_error_cells": float(dist.mean()) if dist.size else 0.0,
          "within_one_cell": float(np.concatenate(within_one).mean()) if dist.size else 0.0,
          "num_tokens": int(dropped.sum())}


def droppos_analysis(run: Run) -> list[str]:
  from mae_jax.analyze import plots
  method = run.method
  grid = tuple(method.grid)
  predict = jitted(method, "predict_positions")
  stats = position_stats(run, predict, grid)
  images = run.first_images()
  out = jax.device_get(predict(run.params, images, run.key))
  d = run.config.dataset
  shown = image_panels.to_display(images, d.mean, d.std)  # [n, s, s, 3]
  p = run.config.image_size // grid[1]
  visible_rows, placed_rows, outlines = [], [], []
  for b in range(len(images)):
    true, pred = out["ids_keep"][b], out["pred_ids"][b]
    visible = np.full_like(shown[b], image_panels.HIDDEN_GREY)
    placed = np.full_like(shown[b], image_panels.HIDDEN_GREY)
    boxes = []
    for t, q, dropped in zip(true, pred, out["pos_mask"][b]):
      (r, c), (pr, pc) = _cells(np.array(t), grid[1]), _cells(np.array(q), grid[1])
      patch = shown[b, r * p:(r + 1) * p, c * p:(c + 1) * p]
      visible[r * p:(r + 1) * p, c * p:(c + 1) * p] = patch
      if dropped:
        boxes.append((r * p, c * p, p, "lime" if t == q else "red"))
        placed[pr * p:(pr + 1) * p, pc * p:(pc + 1) * p] = patch
    for t, dropped in zip(true, out["pos_mask"][b]):  # positions given: drawn last, on top.
      if not dropped:
        (r, c) = _cells(np.array(t), grid[1])
        placed[r * p:(r + 1) * p, c * p:(c + 1) * p] = shown[b, r * p:(r + 1) * p,
                                                           c * p:(c + 1) * p]
    visible_rows.append(visible)
    placed_rows.append(placed)
    outlines.append(boxes)
  rows = {"original": shown, "visible; dropped positions boxed": np.stack(visible_rows),
          "patches where predicted": np.stack(placed_rows)}
  title = (f"DropPos step {run.step}: green = position recovered, red = wrong "
           f"({stats['accuracy']:.1%} of dropped positions over {run.label})")
  png = plots.image_grid(rows, os.path.join(run.out, "droppos.png"), title=title,
                         outlines={"visible; dropped positions boxed": outlines})
  per_position = np.where(stats["dropped"] > 0,
                          stats["correct"] / np.maximum(stats["dropped"], 1), np.nan)
  acc_grid = per_position.reshape(grid)
  ticks = [str(i) for i in range(max(grid))]
  heat = plots.heatmap(np.nan_to_num(acc_grid), os.path.join(run.out, "droppos_accuracy.png"),
                       ticks=ticks, label="accuracy when dropped",
                       axis_labels=("column", "row"),
                       title=f"DropPos: accuracy per true position (step {run.step})")
  record = {**run.header("droppos"), "grid": list(grid),
            "num_dropped_tokens": stats["num_tokens"],
            "dropped_position_accuracy": stats["accuracy"],
            "kept_position_accuracy": stats["kept_position_accuracy"],
            "mean_error_cells": stats["mean_error_cells"],
            "within_one_cell": stats["within_one_cell"],
            "accuracy_per_position": [[None if np.isnan(v) else round(float(v), 4) for v in row]
                                      for row in acc_grid],
            "figures": [os.path.basename(png), os.path.basename(heat)]}
  return [png, heat, run.write_json("droppos", record)]


def analyze(run: Run, names: list[str]) -> list[str]:
  """Runs `names` (from `resolve`); returns the files written."""
  written = []
  if "recon" in names:
    written += reconstructions(run)
  attention = [n for n in names if n in ATTENTION_ANALYSES]
  if attention:
    written += attention_analyses(run, attention)
  if "droppos" in names:
    written += droppos_analysis(run)
  return written
