"""Reconstruction panels as arrays (numpy only: the held-out evaluator and the analysis tool
use them).

A method's `reconstruct(params, images, rng)` returns {'pred_pixels': [B, H, W, 3] in the input's
(dataset-normalized) pixel space, 'mask': [B, H, W, 1], 1 = hidden from the model}. Four panels
per image, as MAE's figures: the original, the masked input (hidden patches grey), the
reconstruction, and the reconstruction with the visible patches pasted back.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")
HIDDEN_GREY = 0.5  # display value of hidden patches in the masked input.


def to_display(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Dataset-normalized images -> [0, 1] RGB (x * std + mean, clipped)."""
  x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(x, 0.0, 1.0)


def panels(images: np.ndarray, recon: dict, mean, std) -> dict[str, np.ndarray]:
  """{panel name: [B, H, W, 3] in [0, 1]} of PANELS for images [B, H, W, 3] and `recon`."""
  images = np.asarray(images, np.float32)
  pred = np.asarray(recon["pred_pixels"], np.float32)
  mask = np.asarray(recon["mask"], np.float32)
  original = to_display(images, mean, std)
  return {
      PANELS[0]: original,
      PANELS[1]: original * (1.0 - mask) + HIDDEN_GREY * mask,
      PANELS[2]: to_display(pred, mean, std),
      PANELS[3]: to_display(images * (1.0 - mask) + pred * mask, mean, std),
  }


def hidden_mse(images: np.ndarray, recon: dict, mean, std) -> np.ndarray:
  """[B] mean squared error of the reconstruction on the hidden pixels, in [0, 1] RGB units."""
  shown = panels(images, recon, mean, std)
  mask = np.asarray(recon["mask"], np.float32)  # [B, H, W, 1]
  err = ((shown[PANELS[2]] - shown[PANELS[0]]) ** 2 * mask).sum(axis=(1, 2, 3))
  return err / np.maximum(mask.sum(axis=(1, 2, 3)) * 3, 1.0)


def tile(rows: Sequence[np.ndarray], gap: int = 2, scale: int = 1) -> np.ndarray:
  """uint8 [R * (H * scale + gap) - gap, B * (W * scale + gap) - gap, 3]: row r holds the B images
  of rows[r] ([B, H, W, 3] in [0, 1]) side by side, nearest-upscaled by `scale`, white gaps."""
  b, h, w, _ = rows[0].shape
  hs, ws = h * scale, w * scale
  out = np.ones((len(rows) * (hs + gap) - gap, b * (ws + gap) - gap, 3), np.float32)
  for r, row in enumerate(rows):
    big = np.repeat(np.repeat(np.asarray(row, np.float32), scale, axis=1), scale, axis=2)
    for i in range(b):
      out[r * (hs + gap):r * (hs + gap) + hs, i * (ws + gap):i * (ws + gap) + ws] = big[i]
  return np.round(out * 255).astype(np.uint8)
