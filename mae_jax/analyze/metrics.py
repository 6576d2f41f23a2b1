"""What an encoder's attention does, in numbers: attention distance, head diversity, linear CKA.

Definitions follow "Revealing the Dark Secrets of Masked Image Modeling" (Xie et al. 2022,
Sections 3-4):

- averaged attention distance of layer l, head h: the mean over images and query patches of
  sum_k A(q, k) * stride * ||g_q - g_k||, g the (row, col) grid cell of a patch and stride its
  size in input pixels (16 for ViT-B/16 and for ConvMAE's stage 3). The [CLS] row and column are
  dropped; by default each query row is then renormalized to sum 1 over the patches, so a head
  that sends most of its mass to [CLS] is measured by where the rest goes (`renormalize=False`
  keeps the raw mass: the distance then shrinks by the factor 1 - A(q, CLS)).
- head diversity of head h: the mean over the other heads h' and over queries of
  KL(A_h(q, .) || A_h'(q, .)) on the renormalized patch rows; a layer's diversity is the mean
  over its heads. Identical heads give 0; one head is never diverse (0).
- linear CKA (Kornblith et al. 2019) between two layers' patch tokens: ||Y^T X||_F^2 /
  (||X^T X||_F ||Y^T Y||_F) with column-centred X [n, d1], Y [n, d2].

Every function takes attention as the encoders sow it ('attention' intermediates,
[B, heads, T, T] with T = N or 1 + N) and works under jit.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def grid_coords(grid: tuple[int, int]) -> np.ndarray:
  """[N, 2] (row, col) of each patch, row-major (the patch order of every encoder here)."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1).astype(np.float64)


def pixel_distances(grid: tuple[int, int], stride: float) -> np.ndarray:
  """[N, N] Euclidean distance in input pixels between patch centres: stride * ||g_q - g_k||."""
  g = grid_coords(grid)
  return stride * np.sqrt(((g[:, None, :] - g[None, :, :]) ** 2).sum(-1))


def uniform_distance(grid: tuple[int, int], stride: float) -> float:
  """The attention distance of uniform attention: the mean pairwise distance of the grid."""
  return float(pixel_distances(grid, stride).mean())


def patch_attention(attn: jax.Array, num_patches: int, renormalize: bool = True) -> jax.Array:
  """[..., T, T] -> [..., N, N] patch-to-patch attention: the [CLS] row and column dropped when
  T = N + 1, rows renormalized to sum 1 unless `renormalize` is False."""
  t = attn.shape[-1]
  if t == num_patches + 1:
    attn = attn[..., 1:, 1:]
  elif t != num_patches:
    raise ValueError(f"attention over {t} tokens does not fit {num_patches} patches")
  attn = attn.astype(jnp.float32)
  if renormalize:
    attn = attn / jnp.maximum(attn.sum(axis=-1, keepdims=True), 1e-30)
  return attn


def _mean_over_images_and_queries(x: jax.Array, weights: Optional[jax.Array]) -> jax.Array:
  """[B, H, Q] -> [H]: mean over queries, then the `weights`-weighted mean over images."""
  per_image = x.mean(axis=-1)  # [B, H]
  if weights is None:
    return per_image.mean(axis=0)
  w = weights.astype(jnp.float32)
  return jnp.einsum("bh,b->h", per_image, w) / jnp.maximum(w.sum(), 1e-12)


def attention_distance(attn: jax.Array, grid: tuple[int, int], stride: float,
                       renormalize: bool = True, weights: Optional[jax.Array] = None
                       ) -> jax.Array:
  """[H] averaged attention distance in input pixels of attention [B, H, T, T].

  `weights` [B] (e.g. 0 for padding images) weighs the images of the mean.
  """
  a = patch_attention(attn, grid[0] * grid[1], renormalize)
  d = jnp.asarray(pixel_distances(grid, stride), jnp.float32)
  return _mean_over_images_and_queries(jnp.einsum("bhqk,qk->bhq", a, d), weights)


def head_diversity(attn: jax.Array, num_patches: int, weights: Optional[jax.Array] = None,
                   eps: float = 1e-12) -> jax.Array:
  """[H]: for each head, the mean over the other heads and the queries of
  KL(A_h(q, .) || A_h'(q, .)) on the renormalized patch rows (eps guards log 0)."""
  a = patch_attention(attn, num_patches, renormalize=True)  # [B, H, Q, K]
  heads = a.shape[1]
  if heads < 2:
    return jnp.zeros((heads,), jnp.float32)
  log_a = jnp.log(jnp.maximum(a, eps))
  neg_entropy = jnp.sum(a * log_a, axis=-1)  # [B, H, Q]
  cross = jnp.einsum("bhqk,bgqk->bhgq", a, log_a)  # sum_k A_h log A_g
  kl = neg_entropy[:, :, None] - cross  # [B, H, G, Q]
  others = 1.0 - jnp.eye(heads, dtype=kl.dtype)
  per_head = jnp.einsum("bhgq,hg->bhq", kl, others) / (heads - 1)
  return _mean_over_images_and_queries(per_head, weights)


def linear_cka(x: jax.Array, y: jax.Array, weights: Optional[jax.Array] = None) -> jax.Array:
  """Linear CKA of x [n, d1] and y [n, d2] (rows: examples); rows with weight 0 are left out."""
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  w = jnp.ones((x.shape[0],), jnp.float32) if weights is None else weights.astype(jnp.float32)
  total = jnp.maximum(w.sum(), 1e-12)
  x = (x - jnp.einsum("n,nd->d", w, x) / total) * w[:, None]
  y = (y - jnp.einsum("n,nd->d", w, y) / total) * w[:, None]
  xy = jnp.sum((y.T @ x) ** 2)
  xx = jnp.sqrt(jnp.sum((x.T @ x) ** 2))
  yy = jnp.sqrt(jnp.sum((y.T @ y) ** 2))
  return xy / jnp.maximum(xx * yy, 1e-30)
