"""The analysis figures, drawn with matplotlib's object API (no pyplot state, no display needed).

Every figure is saved at DPI dots per inch without tight cropping, so its size in pixels is
figsize * DPI exactly (the sizes below; tests check them).
"""

from __future__ import annotations

import io
import textwrap
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from mae_jax.atomic import write_atomic

DPI = 100
LAYER_FIGSIZE = (6.0, 4.0)  # per-layer plots: 600 x 400 px.
CKA_FIGSIZE = (5.0, 4.2)
CELL = 1.0  # inches per image in image grids.
LABEL_W = 1.1  # inches of row labels left of an image grid.
TITLE_H = 0.4  # inches above an image grid.


def recon_figsize(num_images: int, num_rows: int) -> tuple[float, float]:
  return LABEL_W + num_images * CELL, TITLE_H + num_rows * CELL


def _save(fig: Figure, path: str) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=DPI, format="png", facecolor="white")
  write_atomic(path, buffer.getvalue())
  return path


def layer_scatter(values: np.ndarray, path: str, *, ylabel: str, title: str,
                  reference: Optional[float] = None, reference_label: str = "") -> str:
  """values [layers, heads]: one dot per head at x = layer (1-based), the mean over heads as a
  line (the layout of the attention-distance figure of Xie et al. 2022), an optional dashed
  horizontal reference."""
  values = np.asarray(values, np.float64)
  layers, heads = values.shape
  x = np.arange(1, layers + 1)
  fig = Figure(figsize=LAYER_FIGSIZE, dpi=DPI)
  ax = fig.add_subplot(1, 1, 1)
  colors = [f"C{h % 10}" for h in range(heads)]
  jitter = (np.arange(heads) - (heads - 1) / 2) * min(0.06, 0.5 / max(heads, 1))
  for h in range(heads):
    ax.scatter(x + jitter[h], values[:, h], s=22, color=colors[h], alpha=0.85,
               label=f"head {h + 1}" if heads <= 8 else None, zorder=3)
  ax.plot(x, values.mean(axis=1), "-", color="black", lw=1.5, marker="D", ms=4,
          label="mean over heads", zorder=4)
  if reference is not None:
    ax.axhline(reference, ls="--", color="grey", lw=1, label=reference_label, zorder=2)
  ax.set_xticks(x)
  ax.set_xlabel("layer")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.set_xlim(0.5, layers + 0.5)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc="best", framealpha=0.8)
  fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.13)
  return _save(fig, path)


def image_grid(rows: dict[str, np.ndarray], path: str, *, title: str,
               outlines: Optional[dict[str, Sequence[Sequence[tuple]]]] = None) -> str:
  """rows {label: [N, H, W, 3] in [0, 1]}: one row per label, one column per image.

  `outlines[label][i]` (optional): rectangles drawn on image i of that row, as
  (top, left, size, colour) in pixels of the image.
  """
  outlines = outlines or {}
  labels = list(rows)
  n = rows[labels[0]].shape[0]
  w, h = recon_figsize(n, len(labels))
  fig = Figure(figsize=(w, h), dpi=DPI)
  pad = 0.04  # inches between cells
  for r, label in enumerate(labels):
    bottom = (h - TITLE_H - (r + 1) * CELL + pad / 2) / h
    fig.text((LABEL_W - 0.08) / w, bottom + (CELL - pad) / h / 2, textwrap.fill(label, 15),
             ha="right", va="center", fontsize=8)
    for i in range(n):
      ax = fig.add_axes(((LABEL_W + i * CELL + pad / 2) / w, bottom, (CELL - pad) / w,
                         (CELL - pad) / h))
      ax.imshow(np.clip(rows[label][i], 0.0, 1.0), interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      for top, left, size, color in (outlines[label][i] if label in outlines else ()):
        ax.add_patch(_rectangle(top, left, size, color))
  fig.text(0.5, 1.0 - 0.06 / h, title, ha="center", va="top", fontsize=9)
  return _save(fig, path)


def _rectangle(top: float, left: float, size: float, color: str):
  from matplotlib.patches import Rectangle
  # imshow puts pixel (r, c) at [c - 0.5, c + 0.5] x [r - 0.5, r + 0.5].
  return Rectangle((left - 0.5 + 0.4, top - 0.5 + 0.4), size - 0.8, size - 0.8, fill=False,
                   edgecolor=color, linewidth=1.2)


def heatmap(matrix: np.ndarray, path: str, *, title: str, ticks: Sequence[str],
            figsize: tuple[float, float] = CKA_FIGSIZE, vmin: float = 0.0,
            vmax: float = 1.0, label: str = "", axis_labels: tuple[str, str] = ("", "")) -> str:
  """A square matrix with its values written in the cells (small matrices) and a colour bar."""
  matrix = np.asarray(matrix, np.float64)
  fig = Figure(figsize=figsize, dpi=DPI)
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="viridis", interpolation="nearest")
  if matrix.shape[0] <= 12 and matrix.shape[1] <= 12:
    for (r, c), v in np.ndenumerate(matrix):
      ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
              color="white" if v < (vmin + vmax) / 2 else "black")
  ax.set_xticks(range(matrix.shape[1]), ticks[:matrix.shape[1]], fontsize=7)
  ax.set_yticks(range(matrix.shape[0]), ticks[:matrix.shape[0]], fontsize=7)
  ax.set_xlabel(axis_labels[0], fontsize=8)
  ax.set_ylabel(axis_labels[1], fontsize=8)
  ax.set_title(textwrap.fill(title, 48), fontsize=9)
  fig.colorbar(im, ax=ax, label=label)
  return _save(fig, path)
