"""Mixup / CutMix in timm's `Mixup` batch mode, with static shapes (jit-able).

The batch is mixed with its reversed order (x[::-1], torch's x.flip(0)); one lambda per batch
is drawn from Beta(alpha, alpha). With both mixup and cutmix enabled, cutmix is chosen with
probability `switch_prob`. CutMix pastes a box of side int(H * sqrt(1 - lam)) x
int(W * sqrt(1 - lam)) centred at a uniform pixel, clipped to the image, from the reversed
batch, and lambda is corrected to 1 - (clipped box area) / (H * W). Targets are smoothed one-hot
(off = smoothing / num_classes, on = 1 - smoothing + off), mixed as lam * y + (1 - lam) * y[::-1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_one_hot(labels, num_classes: int, label_smoothing: float):
  off = label_smoothing / num_classes
  on = 1.0 - label_smoothing + off
  return jax.nn.one_hot(labels, num_classes) * (on - off) + off


def _cutmix_mask(rng, lam, height: int, width: int):
  """([H, W] float mask, 1 inside the box) and the area-corrected lambda."""
  ky, kx = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y_lo = jnp.clip(cy - cut_h // 2, 0, height)
  y_hi = jnp.clip(cy + cut_h // 2, 0, height)
  x_lo = jnp.clip(cx - cut_w // 2, 0, width)
  x_hi = jnp.clip(cx + cut_w // 2, 0, width)
  rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
  inside = (rows >= y_lo) & (rows < y_hi) & (cols >= x_lo) & (cols < x_hi)
  area = (y_hi - y_lo) * (x_hi - x_lo)
  return inside.astype(jnp.float32), 1.0 - area.astype(jnp.float32) / (height * width)


def mixup_cutmix(rng, images, labels, num_classes: int, mixup_alpha=0.8, cutmix_alpha=1.0,
                 switch_prob=0.5, label_smoothing=0.1):
  """images [B, H, W, C], int labels [B] -> (mixed images, soft targets [B, num_classes] f32).

  Only `num_classes` must be static; the alphas and probabilities may be traced, so one
  compilation serves every setting. An alpha of 0 disables that kind of mixing (timm's rule:
  with both enabled, cutmix is picked with probability switch_prob); with both 0 the images are
  returned unchanged (lam = 1) with smoothed one-hot targets.
  """
  k_switch, k_lam, k_box = jax.random.split(rng, 3)
  mixup_alpha = jnp.asarray(mixup_alpha, jnp.float32)
  cutmix_alpha = jnp.asarray(cutmix_alpha, jnp.float32)
  use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
  alphas = jnp.stack([jnp.where(use_mixup, mixup_alpha, 1.0),
                      jnp.where(use_cutmix, cutmix_alpha, 1.0)])
  lam_mix, lam_cut = jax.random.beta(k_lam, alphas, alphas)  # one draw for each kind.
  choose_cut = jnp.where(use_mixup & use_cutmix, jax.random.uniform(k_switch) < switch_prob,
                         use_cutmix)
  lam_mix = jnp.where(use_mixup, lam_mix, 1.0)

  flipped = images[::-1]
  height, width = images.shape[1:3]
  box, lam_cut = _cutmix_mask(k_box, lam_cut, height, width)
  box = box[None, :, :, None]
  cut = images * (1.0 - box) + flipped * box
  mixed = lam_mix * images + (1.0 - lam_mix) * flipped
  out = jnp.where(choose_cut, cut, mixed)
  lam = jnp.where(choose_cut, lam_cut, lam_mix)

  targets = smoothed_one_hot(labels, num_classes, label_smoothing)
  soft = lam * targets + (1.0 - lam) * targets[::-1]
  return out.astype(images.dtype), soft


def soft_cross_entropy(logits, soft_targets):
  """Mean over the batch of -sum_k t_k * log_softmax(logits)_k (timm SoftTargetCrossEntropy)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(soft_targets * logp, axis=-1))
