"""The cross-modal audio-visual Transformer (Tran & Soleymani, ICASSP 2022), its heads and the model configs.

Encoder path: per-modality frontends -> two cross-modal encoders (vision queries over audio keys/values and audio
queries over vision; the key/value stream is the embedded other modality, fixed across layers) -> concatenation on
the feature axis (vision-query stream first, width 2d) -> joint self-attention encoder at 2d.

Models:
- `AVEncoder`: batch -> features h [B, T, 2d].
- `PretrainModel`: encoder + per-modality reconstruction heads (residual MLP + linear to the target width).
- `FinetuneModel`: encoder + readout (last valid frame or masked mean) + MLP head (classes or continuous targets).
Both keep the encoder under the parameter name `encoder`, so a fine-tuning run restores exactly that subtree.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from avt_jax.models.frontends import make_frontend
from avt_jax.models.layers import Dropout, Encoder, attention_mask, default_kernel_init, logical

PRESETS = {
    "tiny": dict(width=32, num_heads=2, num_layers=1),
    "small": dict(width=96, num_heads=4, num_layers=2),
    "base": dict(width=240, num_heads=10, num_layers=4),
    "large": dict(width=384, num_heads=12, num_layers=8),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config(size: str = "base", **overrides) -> ml_collections.ConfigDict:
  """Default model config; `size` selects a preset (width, heads, layers), overrides win."""
  if size not in PRESETS and size != "custom":
    raise ValueError(f"unknown model size {size!r}; expected one of {sorted(PRESETS)} or 'custom'")
  cfg = ml_collections.ConfigDict(dict(
      size=size,
      width=240, num_heads=10, num_layers=4, mlp_ratio=4,
      embed_dropout=0.25, residual_dropout=0.1, relu_dropout=0.1,
      cross_attention_dropout=0.0, joint_attention_dropout=0.1,
      causal=True,                # as released; False = bidirectional
      padding_mask=True,          # hide padded keys (the release has no padding mask)
      release_positions=False,    # release quirk: frames whose projected channel 0 is exactly 0 get no position
      readout="last",             # 'last' valid frame (as released) or masked 'mean'
      head_hidden=16, head_dropout=0.0, recon_dropout=0.0,
      audio_frontend=dict(type="features", dim=512),
      visual_frontend=dict(type="features", dim=17),
      audio_target_dim=512, visual_target_dim=17,
      num_classes=6, num_targets=2,
      dtype="float32",            # compute dtype; parameters are always float32
      attention_impl="",          # '' = jax default, or 'xla' / 'cudnn'
      fused_qkv=False,            # self-attention Q/K/V as one matrix product (same parameters, same layout)
      dropout_masks="counter",    # keep masks: 'counter' (threefry of element counters, fused) or 'jax' (bernoulli)
      remat=False,                # rematerialise each layer's activations in the backward pass
      scan_layers=False,          # scan over stacked layers (faster compiles; checkpoint layout [L, ...])
  ))
  if size in PRESETS:
    cfg.update(PRESETS[size])
  cfg.update(overrides)
  return cfg


def dropout_masks(cfg) -> str:
  """The model's dropout mask generator; configs saved before the field existed used jax.random.bernoulli."""
  return cfg.get("dropout_masks", "jax")


def _dtype(cfg) -> Any:
  try:
    return DTYPES[cfg.dtype]
  except KeyError:
    raise ValueError(f"model.dtype={cfg.dtype!r}; expected one of {sorted(DTYPES)}") from None


class AVEncoder(nn.Module):
  """Frontends + two cross-modal encoders + joint encoder. Returns h [B, T, 2d] in float32."""
  config: Mapping[str, Any]

  @nn.compact
  def __call__(self, audio, visual, mask, deterministic: bool = True):
    cfg = self.config
    dtype = _dtype(cfg)
    impl = cfg.attention_impl or None
    a = make_frontend(cfg.audio_frontend, cfg.width, dtype, "audio_frontend")(audio, deterministic)
    v = make_frontend(cfg.visual_frontend, cfg.width, dtype, "visual_frontend")(visual, deterministic)
    if a.shape[:2] != v.shape[:2] or a.shape[:2] != mask.shape:
      raise ValueError(f"audio tokens {a.shape[:2]}, visual tokens {v.shape[:2]} and mask {mask.shape} must share "
                       "[batch, time]")
    if cfg.release_positions:
      a_pos, v_pos = a[..., 0] != 0, v[..., 0] != 0
    else:
      a_pos = v_pos = mask
    t = mask.shape[1]
    attn_mask = attention_mask(mask, mask if cfg.padding_mask else None, t, t, cfg.causal)

    def encoder(name, dropout):
      return Encoder(cfg.num_layers, cfg.num_heads, cfg.mlp_ratio, cfg.embed_dropout, dropout,
                     cfg.residual_dropout, cfg.relu_dropout, dtype, impl, cfg.remat, cfg.get("scan_layers", False),
                     cfg.get("fused_qkv", False), dropout_masks(cfg), name=name)

    v_a = encoder("cross_visual_audio", cfg.cross_attention_dropout)(
        v, v_pos, attn_mask, deterministic, kv=a, kv_pos_valid=a_pos)
    a_v = encoder("cross_audio_visual", cfg.cross_attention_dropout)(
        a, a_pos, attn_mask, deterministic, kv=v, kv_pos_valid=v_pos)
    h = jnp.concatenate([v_a, a_v], axis=-1)
    joint_pos = (h[..., 0] != 0) if cfg.release_positions else mask
    h = encoder("joint", cfg.joint_attention_dropout)(h, joint_pos, attn_mask, deterministic)
    return h.astype(jnp.float32)


class ReconstructionHead(nn.Module):
  """out = W_o (proj2(relu(proj1(h))) + h), as released."""
  out_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  dropout_masks: str = "counter"

  @nn.compact
  def __call__(self, h, deterministic: bool = True):
    width = h.shape[-1]

    def dense(n, name, axes):
      return nn.Dense(n, dtype=self.dtype, name=name, kernel_init=logical(default_kernel_init, axes),
                      bias_init=logical(nn.initializers.zeros, (axes[1],)))

    x = nn.relu(dense(width, "proj1", ("embed", "mlp"))(h))
    x = Dropout(self.dropout, self.dropout_masks)(x, deterministic)
    x = dense(width, "proj2", ("mlp", "embed"))(x) + h
    return dense(self.out_dim, "out", ("embed", "feature"))(x).astype(jnp.float32)


class MLPHead(nn.Module):
  """2d -> hidden -> ReLU -> out (the release's fine-tuning head with hidden=16)."""
  out_dim: int
  hidden: int = 16
  dropout: float = 0.0
  dropout_masks: str = "counter"

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.Dense(self.hidden, name="hidden", kernel_init=logical(default_kernel_init, ("embed", "mlp")),
                 bias_init=logical(nn.initializers.zeros, ("mlp",)))(x)
    x = Dropout(self.dropout, self.dropout_masks)(nn.relu(x), deterministic)
    return nn.Dense(self.out_dim, name="out", kernel_init=logical(default_kernel_init, ("mlp", "classes")),
                    bias_init=logical(nn.initializers.zeros, ("classes",)))(x)


def readout(h: jax.Array, mask: jax.Array, how: str) -> jax.Array:
  """Pools h [B, T, E] to [B, E]: at each clip's last valid frame, or the masked mean over valid frames."""
  if how == "last":
    last = jnp.maximum(mask.sum(axis=1) - 1, 0)
    return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
  if how == "mean":
    w = mask.astype(h.dtype)[..., None]
    return (h * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
  raise ValueError(f"unknown readout {how!r}; expected 'last' or 'mean'")


class PretrainModel(nn.Module):
  config: Mapping[str, Any]

  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    cfg = self.config
    h = AVEncoder(cfg, name="encoder")(batch["audio"], batch["visual"], batch["mask"], deterministic)
    dtype = _dtype(cfg)
    masks = dropout_masks(cfg)
    rec_a = ReconstructionHead(cfg.audio_target_dim, cfg.recon_dropout, dtype, masks, name="recon_audio")(
        h, deterministic)
    rec_v = ReconstructionHead(cfg.visual_target_dim, cfg.recon_dropout, dtype, masks, name="recon_visual")(
        h, deterministic)
    return {"features": h, "recon_audio": rec_a, "recon_visual": rec_v}


class FinetuneModel(nn.Module):
  """Encoder + readout + MLP head with `num_outputs` outputs (class logits [B, C] or attributes [B, K]; the task
  chooses, avt_jax/tasks)."""
  config: Mapping[str, Any]
  num_outputs: int

  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    cfg = self.config
    h = AVEncoder(cfg, name="encoder")(batch["audio"], batch["visual"], batch["mask"], deterministic)
    pooled = readout(h, batch["mask"], cfg.readout)
    out = MLPHead(self.num_outputs, cfg.head_hidden, cfg.head_dropout, dropout_masks(cfg), name="head")(
        pooled, deterministic)
    return {"features": h, "pooled": pooled, "output": out}
