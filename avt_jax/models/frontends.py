"""Frontends: map each modality to a sequence of width-d frame tokens on the common time grid.

- `FeatureProjection`: precomputed per-frame features of any width ([B, T, D], e.g. 512-d TRILL or 17 OpenFace AU
  intensities) -> per-frame linear map without bias, as in the release.
- `LogMelFrontend`: the log-mel frames of each token window ([B, T, Ka, F]) -> a small strided 1-D convolution over
  the window's frames, flattened, then a linear map to d.
- `FaceFrontend`: the face crops of each token window ([B, T, Kv, S, S, 3] uint8) -> a small strided 2-D CNN per
  crop, global average pooled, the Kv crop embeddings concatenated, then a linear map to d.
All return [B, T, d] in the compute dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from avt_jax.models.layers import default_kernel_init, logical

Dtype = Any


class FeatureProjection(nn.Module):
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    del deterministic
    if x.ndim != 3:
      raise ValueError(f"feature input must be [batch, time, features], got shape {x.shape}")
    return nn.Dense(self.width, use_bias=False, dtype=self.dtype, name="proj",
                    kernel_init=logical(default_kernel_init, ("feature", "embed")))(x)


class LogMelFrontend(nn.Module):
  width: int
  channels: Sequence[int] = (128, 128)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    del deterministic
    if x.ndim != 4:
      raise ValueError(f"log-mel input must be [batch, time, frames_per_token, n_mels], got shape {x.shape}")
    b, t, k, f = x.shape
    h = x.reshape(b * t, k, f).astype(self.dtype)
    for i, c in enumerate(self.channels):
      h = nn.Conv(c, kernel_size=(3,), strides=(2,), padding="SAME", dtype=self.dtype, name=f"conv_{i}",
                  kernel_init=logical(default_kernel_init, (None, "feature", "conv")),
                  bias_init=logical(nn.initializers.zeros, ("conv",)))(h)
      h = nn.gelu(h)
    h = h.reshape(b, t, -1)
    return nn.Dense(self.width, dtype=self.dtype, name="proj",
                    kernel_init=logical(default_kernel_init, ("feature", "embed")),
                    bias_init=logical(nn.initializers.zeros, ("embed",)))(h)


class FaceFrontend(nn.Module):
  width: int
  channels: Sequence[int] = (16, 32, 64)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    del deterministic
    if x.ndim != 6:
      raise ValueError(f"face input must be [batch, time, frames_per_token, size, size, channels], got {x.shape}")
    b, t, k, s1, s2, c = x.shape
    # uint8 crops -> [-1, 1]. Zeroed (masked or padded) windows become -1, a constant the model can learn.
    h = x.reshape(b * t * k, s1, s2, c).astype(self.dtype) * (2.0 / 255.0) - 1.0
    for i, ch in enumerate(self.channels):
      h = nn.Conv(ch, kernel_size=(3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype, name=f"conv_{i}",
                  kernel_init=logical(default_kernel_init, (None, None, "feature", "conv")),
                  bias_init=logical(nn.initializers.zeros, ("conv",)))(h)
      h = nn.gelu(h)
    h = h.mean(axis=(1, 2)).reshape(b, t, k * self.channels[-1])
    return nn.Dense(self.width, dtype=self.dtype, name="proj",
                    kernel_init=logical(default_kernel_init, ("feature", "embed")),
                    bias_init=logical(nn.initializers.zeros, ("embed",)))(h)


def make_frontend(cfg, width: int, dtype: Dtype, name: str) -> nn.Module:
  """Builds a frontend from a config block {type: features|logmel|face, ...}."""
  kind = cfg["type"]
  if kind == "features":
    return FeatureProjection(width, dtype=dtype, name=name)
  if kind == "logmel":
    return LogMelFrontend(width, channels=tuple(cfg.get("channels", (128, 128))), dtype=dtype, name=name)
  if kind == "face":
    return FaceFrontend(width, channels=tuple(cfg.get("channels", (16, 32, 64))), dtype=dtype, name=name)
  raise ValueError(f"unknown frontend type {kind!r} for {name}; expected one of features, logmel, face")
