"""Masked-frame pretraining: reconstruct the masked audio and face frames (L1), as in the paper."""

from __future__ import annotations

from avt_jax import masking
from avt_jax.models import avt
from avt_jax.tasks import base


@base.register("pretrain")
class Pretrain(base.Task):
  batch_keys = ("audio", "visual", "mask", "audio_target", "visual_target", "weight")
  train_metrics = ("l1_audio", "l1_visual")
  default_selection = "masked_l1"
  minimize = frozenset({"masked_l1", "l1_audio", "l1_visual", "loss", "zeroed_l1"})
  train_mode = "pretrain"

  def __init__(self, config):
    super().__init__(config)
    m = config.get("masking", None) or {}
    self.ratio, self.span = float(m.get("ratio", 0.05)), int(m.get("span", 3))
    self.probs = tuple(m.get("probs", (0.8, 0.1, 0.1)))

  def build_model(self, model_config):
    return avt.PretrainModel(model_config)

  def _reconstruct(self, params, batch, rng, train):
    """(model outputs on the masked batch, the masking plan): one draw of masks and dropout from `rng`."""
    mask_rng, dropout_rng = self.split_rng(rng)
    masked, plan = masking.mask_batch(mask_rng, batch, ratio=self.ratio, span=self.span, probs=self.probs)
    return self.apply(params, masked, dropout_rng, train), plan

  def loss(self, params, batch, rng, train):
    out, plan = self._reconstruct(params, batch, rng, train)
    return masking.pretrain_loss(out, batch, plan)

  def eval_stats(self, params, batch, rng):
    out, plan = self._reconstruct(params, batch, rng, False)
    _, aux = masking.pretrain_loss(out, batch, plan)
    n = aux["masked_frames"]
    zeroed = masking.zeroed_frame_l1(out, batch, plan)
    return {"l1_audio": aux["l1_audio"] * n, "l1_visual": aux["l1_visual"] * n, "masked_frames": n,
            **{f"zeroed_{k}": v for k, v in zeroed.items()}}

  def finish(self, stats):
    n = max(float(stats["masked_frames"]), 1.0)
    la, lv = float(stats["l1_audio"]) / n, float(stats["l1_visual"]) / n
    out = {"masked_l1": la + lv, "l1_audio": la, "l1_visual": lv, "masked_frames": float(stats["masked_frames"])}
    # The reconstruction gate (masking.zeroed_frame_l1): the model and two input-only predictors on zeroed frames.
    z = max(float(stats["zeroed_frames"]), 1.0)
    out.update(zeroed_l1=float(stats["zeroed_model"]) / z, zeroed_l1_past_mean=float(stats["zeroed_past_mean"]) / z,
               zeroed_l1_clip_mean=float(stats["zeroed_clip_mean"]) / z, zeroed_frames=float(stats["zeroed_frames"]))
    return out

  def predict(self, params, batch):
    raise ValueError("a pretraining model has no emotion output: fine-tune it first (configs/finetune_*.py)")
