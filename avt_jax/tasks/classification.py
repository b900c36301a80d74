"""Emotion classes (CREMA-D's six, MSP-IMPROV's four): softmax cross-entropy; accuracy, UAR and macro F1."""

from __future__ import annotations

from avt_jax import losses, metrics
from avt_jax.models import avt
from avt_jax.tasks import base


@base.register("classification")
class Classification(base.Task):
  batch_keys = ("audio", "visual", "mask", "label", "weight")
  default_selection = "accuracy"

  def build_model(self, model_config):
    return avt.FinetuneModel(model_config, num_outputs=int(model_config.num_classes))

  def loss(self, params, batch, rng, train):
    _, dropout_rng = self.split_rng(rng)
    out = self.apply(params, batch, dropout_rng, train)["output"]
    loss, n = losses.classification_loss(out, batch["label"], batch["weight"])
    return loss, {"output": out, "count": n}

  def eval_stats(self, params, batch, rng):
    loss, aux = self.loss(params, batch, rng, False)
    n = aux["count"]
    collection = metrics.confusion_metrics(int(self.config.model.num_classes))
    return {"loss_sum": loss * n, "count": n, "clips": n,
            "metrics": collection.single_from_model_output(logits=aux["output"], labels=batch["label"],
                                                           weight=batch["weight"])}

  def finish(self, stats):
    out = {"loss": float(stats["loss_sum"]) / max(float(stats["count"]), 1.0), "clips": float(stats["clips"])}
    out.update({k: float(v) for k, v in stats["metrics"].compute().items()})
    return out
