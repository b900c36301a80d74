"""Dynamic span masking for masked-frame pretraining, and the masked L1 reconstruction loss.

`span_mask_plan(rng, mask)` draws, for every clip, ceil(ratio * valid_length) span starts uniformly over the valid
frames, each span `span` frames long (clipped at the clip's end), so at most ratio * span of the frames are selected.
Every selected frame gets one action: zero it (80%), replace it by a random valid frame of another clip of the batch
(10%), or keep it (10%). `apply_plan` applies the same positions and actions to every modality at once.

Both are pure functions of (rng, batch): they run inside the jitted train step or in the input pipeline.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

ZERO, RANDOM, KEEP = 0, 1, 2


class MaskPlan(NamedTuple):
  selected: jax.Array   # [B, T] bool: frames scored by the loss (never padding)
  action: jax.Array     # [B, T] int32: ZERO, RANDOM or KEEP (meaningful where selected)
  source_b: jax.Array   # [B, T] int32: clip that supplies the replacement frame
  source_t: jax.Array   # [B, T] int32: frame index in that clip


def span_mask_plan(rng: jax.Array, mask: jax.Array, ratio: float = 0.05, span: int = 3,
                   probs: Sequence[float] = (0.8, 0.1, 0.1)) -> MaskPlan:
  """Draws a masking plan for a batch with validity mask [B, T] (end-padded)."""
  if span < 1 or not 0.0 < ratio <= 1.0:
    raise ValueError(f"need span >= 1 and 0 < ratio <= 1, got span={span}, ratio={ratio}")
  if len(probs) != 3 or abs(sum(probs) - 1.0) > 1e-6 or min(probs) < 0:
    raise ValueError(f"probs (zero, random, keep) must be 3 non-negative numbers summing to 1, got {probs}")
  b, t = mask.shape
  lengths = mask.sum(axis=1).astype(jnp.int32)                        # [B]
  max_starts = max(1, math.ceil(ratio * t - 1e-6))                    # ceil(ratio * T), robust to float noise
  n_starts = jnp.ceil(lengths.astype(jnp.float32) * ratio - 1e-6).astype(jnp.int32)
  k_start, k_action, k_src_b, k_src_t = jax.random.split(rng, 4)
  # Starts uniform over the frames where a whole span fits (over all valid frames for clips shorter than a span).
  room = jnp.maximum(lengths - span + 1, jnp.minimum(lengths, 1))
  u = jax.random.uniform(k_start, (b, max_starts))
  starts = jnp.minimum((u * room[:, None]).astype(jnp.int32), jnp.maximum(room[:, None] - 1, 0))
  use = jnp.arange(max_starts)[None, :] < n_starts[:, None]           # [B, S]
  pos = jnp.arange(t)[None, None, :]
  covered = (pos >= starts[..., None]) & (pos < starts[..., None] + span) & use[..., None]
  selected = covered.any(axis=1) & mask

  action = jax.random.choice(k_action, 3, shape=(b, t), p=jnp.asarray(probs, jnp.float32)).astype(jnp.int32)
  # Replacement source: another clip of the batch (the same clip only when the batch has one clip), and a valid
  # frame of it chosen uniformly.
  offset = jax.random.randint(k_src_b, (b, t), 1, max(b, 2))
  source_b = (jnp.arange(b)[:, None] + offset) % b
  src_len = jnp.maximum(lengths[source_b], 1)
  source_t = jnp.minimum((jax.random.uniform(k_src_t, (b, t)) * src_len).astype(jnp.int32), src_len - 1)
  return MaskPlan(selected, action, source_b.astype(jnp.int32), source_t)


def apply_plan(x: jax.Array, plan: MaskPlan) -> jax.Array:
  """Applies a plan to one modality x [B, T, ...] (any trailing shape and dtype)."""
  replacement = x[plan.source_b, plan.source_t]
  extra = (1,) * (x.ndim - 2)
  sel = plan.selected.reshape(plan.selected.shape + extra)
  act = plan.action.reshape(plan.action.shape + extra)
  out = jnp.where(sel & (act == RANDOM), replacement, x)
  return jnp.where(sel & (act == ZERO), jnp.zeros_like(x), out)


def mask_batch(rng: jax.Array, batch: Mapping[str, jax.Array], keys: Sequence[str] = ("audio", "visual"),
               ratio: float = 0.05, span: int = 3, probs: Sequence[float] = (0.8, 0.1, 0.1)):
  """Returns (masked batch, plan): the same plan applied to every modality in `keys`."""
  plan = span_mask_plan(rng, batch["mask"], ratio, span, probs)
  out = dict(batch)
  for k in keys:
    out[k] = apply_plan(batch[k], plan)
  return out, plan


def masked_l1(pred: jax.Array, target: jax.Array, selected: jax.Array, weight: jax.Array | None = None):
  """Mean absolute error over the selected frames and all feature dims, in float32.

  Returns (loss, number of scored frames). Frames outside `selected` (including padding) are never scored.
  """
  sel = selected.astype(jnp.float32)
  if weight is not None:
    sel = sel * weight[:, None].astype(jnp.float32)
  err = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)).mean(axis=-1)
  count = sel.sum()
  return (err * sel).sum() / jnp.maximum(count, 1.0), count


def pretrain_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], plan: MaskPlan):
  """L1 on the masked audio frames + L1 on the masked visual frames (equal weights)."""
  weight = batch.get("weight")
  la, n = masked_l1(outputs["recon_audio"], batch["audio_target"], plan.selected, weight)
  lv, _ = masked_l1(outputs["recon_visual"], batch["visual_target"], plan.selected, weight)
  return la + lv, {"l1_audio": la, "l1_visual": lv, "masked_frames": n}


def zeroed_frame_l1(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], plan: MaskPlan
                    ) -> dict[str, jax.Array]:
  """Summed L1 (audio + visual, each a mean over feature dims) on the zeroed frames only, for the model and for
  two predictors that read the same masked clip; the sums and the frame count merge over batches.

  The training loss also scores the kept and randomly replaced frames (20% of the selected ones), where the input
  itself (or nothing) is the answer; the zeroed frames are the ones whose content the model has to infer. The
  predictors: `past_mean`, the mean of the clip's earlier visible frames (what a causal model can use; the clip
  mean where no earlier frame is visible), and `clip_mean`, the mean of all visible frames of the clip. Visible =
  valid and neither zeroed nor replaced. A model that does not beat `past_mean` has not learned to reconstruct.
  """
  weight = batch.get("weight")
  zeroed = (plan.selected & (plan.action == ZERO)).astype(jnp.float32)
  if weight is not None:
    zeroed = zeroed * weight[:, None].astype(jnp.float32)
  visible = (batch["mask"].astype(bool) & ~(plan.selected & (plan.action != KEEP))).astype(jnp.float32)
  out = {"model": 0.0, "past_mean": 0.0, "clip_mean": 0.0}
  for modality in ("audio", "visual"):
    target = batch[f"{modality}_target"].astype(jnp.float32)
    target = target.reshape(target.shape[:2] + (-1,))                      # [B, T, D] (faces flattened)
    pred = outputs[f"recon_{modality}"].astype(jnp.float32).reshape(target.shape)
    seen = target * visible[..., None]
    count = visible.sum(axis=1)                                            # [B]
    clip_mean = seen.sum(axis=1) / jnp.maximum(count, 1.0)[:, None]        # [B, D]
    # Mean of the visible frames strictly before t: exclusive cumulative sums.
    past_sum = jnp.cumsum(seen, axis=1) - seen
    past_count = jnp.cumsum(visible, axis=1) - visible
    past_mean = jnp.where(past_count[..., None] > 0, past_sum / jnp.maximum(past_count, 1.0)[..., None],
                          clip_mean[:, None, :])
    for name, guess in (("model", pred), ("past_mean", past_mean), ("clip_mean", clip_mean[:, None, :])):
      err = jnp.abs(guess - target).mean(axis=-1)
      out[name] = out[name] + (err * zeroed).sum()
  out["frames"] = zeroed.sum()
  return out
