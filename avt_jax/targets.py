"""The face reconstruction target of pretraining, shared by dataset preparation (its statistics) and training.

`data.prepare` stores `target_mean` / `target_std` of exactly this quantity in dataset_info.json, and the input
pipeline normalises the same quantity with them, so both sides call this one function.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# ITU-R BT.601 luma weights for R, G, B.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def area_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] weights of area-averaging resampling from `src` to `dst` pixels (rows sum to 1)."""
  edges = np.arange(dst + 1, dtype=np.float64) * src / dst
  lo, hi = edges[:-1, None], edges[1:, None]
  pix = np.arange(src, dtype=np.float64)[None, :]
  overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0, None)
  return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def face_target(frames: Any, target_size: int, xp: Any = np) -> Any:
  """Unnormalised face target of token windows: [..., Kv, S, S, 3] uint8 -> [..., g*g] float32 in [0, 1].

  Grayscale (BT.601 luma of RGB scaled to [0, 1]), area-averaged to g x g, mean over the Kv frames of a token.
  `xp` is numpy (host) or jax.numpy (inside a jitted step; the products then run at full float32 precision, so
  an accelerator's reduced-precision matmul default does not change the target).
  """
  s, kv = frames.shape[-2], frames.shape[-4]
  a = area_matrix(s, target_size)
  weights = LUMA_WEIGHTS / (255.0 * kv)
  # All three steps are linear: sum the frames first (exact in integers and in float32), then luma, then area
  # averaging.
  if xp is np:
    summed = frames.sum(axis=-4, dtype=np.uint32).astype(np.float32)
    small = a @ (summed @ weights) @ a.T
  else:
    summed = frames.astype(xp.float32).sum(axis=-4)
    gray = xp.matmul(summed, weights, precision="highest")
    small = xp.matmul(xp.matmul(a, gray, precision="highest"), a.T, precision="highest")
  return small.reshape(*small.shape[:-2], target_size * target_size).astype(np.float32)
