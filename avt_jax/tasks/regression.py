"""Continuous attributes (arousal, valence, dominance): MSE or CCC loss; CCC per attribute and their mean."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from avt_jax import losses, metrics
from avt_jax.models import avt
from avt_jax.tasks import base

LOSSES = {"mse": losses.mse_loss, "ccc": losses.ccc_loss}


@base.register("regression")
class Regression(base.Task):
  batch_keys = ("audio", "visual", "mask", "targets", "weight")
  default_selection = "ccc_mean"

  def __init__(self, config):
    super().__init__(config)
    loss_cfg = config.get("loss", None) or {}
    kind = loss_cfg.get("regression", "mse")
    if kind not in LOSSES:
      raise ValueError(f"config.loss.regression={kind!r}; expected one of {sorted(LOSSES)}")
    self.loss_fn = LOSSES[kind]
    # Columns of the record's `targets` (arousal, valence, dominance) this run predicts, and their names.
    self.target_indices = tuple(int(i) for i in loss_cfg.get("target_indices", (0, 1)))
    self.target_names = tuple(loss_cfg.get("target_names", metrics.DEFAULT_TARGET_NAMES[:len(self.target_indices)]))

  def build_model(self, model_config):
    return avt.FinetuneModel(model_config, num_outputs=int(model_config.num_targets))

  def targets(self, batch):
    return batch["targets"][:, jnp.asarray(self.target_indices)]

  def loss(self, params, batch, rng, train):
    _, dropout_rng = self.split_rng(rng)
    out = self.apply(params, batch, dropout_rng, train)["output"]
    loss, n = self.loss_fn(out, self.targets(batch), batch["weight"])
    return loss, {"output": out, "count": n}

  def eval_stats(self, params, batch, rng):
    loss, aux = self.loss(params, batch, rng, False)
    targets = self.targets(batch)
    n = aux["count"]  # known target values; a clip counts once if it has any
    clips = jnp.sum(batch["weight"].astype(jnp.float32) * jnp.isfinite(targets).any(axis=1))
    ccc = metrics.CCC.for_targets(self.target_names).from_model_output(
        predictions=aux["output"], targets=targets, weight=batch["weight"])
    return {"loss_sum": loss * n, "count": n, "clips": clips, "metrics": ccc}

  def finish(self, stats):
    out = {"loss": float(stats["loss_sum"]) / max(float(stats["count"]), 1.0), "clips": float(stats["clips"])}
    named = {k: float(v) for k, v in stats["metrics"].compute_named().items()}
    out.update(named)
    out["ccc_mean"] = float(np.mean(list(named.values())))
    return out
