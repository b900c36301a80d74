"""Fine-tuning losses: weighted cross-entropy over labelled clips, MSE or CCC loss for continuous attributes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def classification_loss(logits: jax.Array, labels: jax.Array, weight: jax.Array | None = None):
  """Mean softmax cross-entropy over clips with a label (>= 0), weighted. Returns (loss, number of clips)."""
  w = (labels >= 0).astype(jnp.float32)
  if weight is not None:
    w = w * weight.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(labels, 0))
  n = w.sum()
  return (ce * w).sum() / jnp.maximum(n, 1.0), n


def _valid(targets, weight):
  valid = jnp.isfinite(targets)
  w = valid.astype(jnp.float32)
  if weight is not None:
    w = w * weight.astype(jnp.float32)[:, None]
  return jnp.where(valid, targets, 0.0), w


def mse_loss(pred: jax.Array, targets: jax.Array, weight: jax.Array | None = None):
  """Mean squared error over known (finite) targets [B, K]."""
  y, w = _valid(targets.astype(jnp.float32), weight)
  err = (pred.astype(jnp.float32) - y) ** 2
  return (err * w).sum() / jnp.maximum(w.sum(), 1.0), w.sum()


def ccc_loss(pred: jax.Array, targets: jax.Array, weight: jax.Array | None = None, eps: float = 1e-8):
  """1 - mean over attributes of the batch CCC (population moments), over known targets."""
  y, w = _valid(targets.astype(jnp.float32), weight)
  x = pred.astype(jnp.float32)
  n = jnp.maximum(w.sum(axis=0), 1.0)
  mx = (w * x).sum(0) / n
  my = (w * y).sum(0) / n
  vx = (w * (x - mx) ** 2).sum(0) / n
  vy = (w * (y - my) ** 2).sum(0) / n
  cov = (w * (x - mx) * (y - my)).sum(0) / n
  ccc = 2.0 * cov / (vx + vy + (mx - my) ** 2 + eps)
  return 1.0 - ccc.mean(), w.sum()
