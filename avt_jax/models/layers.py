"""Transformer building blocks of the cross-modal audio-visual Transformer (MulT-style, pre-LayerNorm).

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`-like `feature` for inputs) so
that a sharding rule table in the config can place it; nothing here knows about meshes.

Shapes: B batch, T query time, S key time, E width, N heads, H head dim.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
default_kernel_init = nn.initializers.xavier_uniform()
# Logical axis names of activations; the trainer maps them to mesh axes (or leaves them unconstrained).
BATCH_TIME_EMBED = ("activation_batch", "activation_length", "activation_embed")


def logical(init: Callable, names: tuple[str | None, ...]) -> Callable:
  return nn.with_logical_partitioning(init, names)


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  """LayerNorm with the release's epsilon (1e-5) and logical axis names on its parameters."""
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name, scale_init=logical(nn.initializers.ones, ("embed",)),
                      bias_init=logical(nn.initializers.zeros, ("embed",)))


def sinusoidal_table(num_positions: int, dim: int) -> np.ndarray:
  """Table of sinusoidal embeddings for positions 0..num_positions-1; row 0 (padding) is zero.

  Sine half then cosine half; frequency k is exp(-k ln(10000) / (half - 1)); an odd width gets a zero column.
  """
  half = dim // 2
  scale = math.log(10000.0) / max(half - 1, 1)
  freqs = np.exp(np.arange(half, dtype=np.float64) * -scale)
  angles = np.arange(num_positions, dtype=np.float64)[:, None] * freqs[None, :]
  table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  if dim % 2:
    table = np.concatenate([table, np.zeros((num_positions, 1))], axis=1)
  table[0] = 0.0
  return table.astype(np.float32)


def position_ids(valid: jax.Array) -> jax.Array:
  """1-based positions t+1 where `valid`, 0 (the zero embedding) elsewhere. valid: [B, T] bool."""
  t = jnp.arange(1, valid.shape[1] + 1, dtype=jnp.int32)[None, :]
  return jnp.where(valid, t, 0)


def attention_mask(q_valid: jax.Array | None, kv_valid: jax.Array | None, q_len: int, kv_len: int,
                   causal: bool) -> jax.Array | None:
  """Boolean mask [B or 1, 1, T, S], True where a query may attend to a key.

  Causal masking follows the release: query t sees keys s <= t + |S - T| (the usual lower triangle for S == T).
  Key padding: keys where kv_valid is False are hidden.
  """
  mask = None
  if causal:
    offset = abs(kv_len - q_len)
    tri = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + offset
    mask = tri[None, None]
  if kv_valid is not None:
    key_mask = kv_valid[:, None, None, :]
    mask = key_mask if mask is None else jnp.logical_and(mask, key_mask)
  del q_valid  # Padded query rows produce values that are masked downstream; they still see valid keys.
  return mask


# Threefry-2x32 (Salmon et al., SC 2011): 5 groups of 4 rounds, the key schedule injected after each group.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
DROPOUT_MASKS = ("counter", "jax")


def _rotl(x: jax.Array, d: int) -> jax.Array:
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 of the counters (x0, x1) under the key (k0, k1), all uint32, in plain elementwise ops.

  The same hash as jax.random's threefry (tested against jax.extend.random.threefry_2x32); written out here because
  jax's CPU lowering runs the rounds as a loop over whole arrays in memory, which XLA cannot fuse into the consumer.
  """
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def dropout_keep(key: jax.Array, keep_prob: float, shape: tuple[int, ...], masks: str = "counter") -> jax.Array:
  """Boolean keep mask of `shape`, True with probability `keep_prob`.

  masks='counter': element i is kept when the first word of threefry-2x32 of the counter (i, 0) under `key` is below
  keep_prob * 2^32, one hash per element in elementwise ops that XLA fuses into the select using the mask (7x
  faster than jax.random.bernoulli on CPU, docs/scaling.md). masks='jax': jax.random.bernoulli (other bits).
  """
  if masks == "jax":
    return jax.random.bernoulli(key, keep_prob, shape)
  if masks != "counter":
    raise ValueError(f"model.dropout_masks={masks!r}; expected one of {DROPOUT_MASKS}")
  size = math.prod(shape)
  if size >= 2 ** 32:
    raise ValueError(f"dropout over {shape} ({size} elements): masks='counter' counts elements in 32 bits")
  words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)  # 2 words (threefry) or 4 (rbg, unsafe_rbg)
  k0, k1 = words[0], words[1]
  if words.shape[0] == 4:  # a hash of all four words (rbg keys of seeds s are [0, s, 0, s]: no XOR folding)
    k0, k1 = threefry2x32(k0, k1, words[2], words[3])
  elif words.shape[0] != 2:
    raise ValueError(f"dropout key of {words.shape[0]} words; expected 2 or 4")
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for d in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride)
    stride *= shape[d]
  bits, _ = threefry2x32(k0, k1, index, jnp.zeros(shape, jnp.uint32))
  return bits < np.uint32(min(round(keep_prob * 2 ** 32), 2 ** 32 - 1))


class Dropout(nn.Module):
  """Inverted dropout (as nn.Dropout) with the keep mask of `dropout_keep`; draws from the 'dropout' rng stream."""
  rate: float
  masks: str = "counter"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    keep = dropout_keep(self.make_rng("dropout"), keep_prob, x.shape, self.masks)
    return jnp.where(keep, x / keep_prob, 0).astype(x.dtype)


def reference_attention(q, k, v, mask, dropout_rng=None, dropout_rate=0.0, deterministic=True,
                        dropout_masks="counter"):
  """Multi-head attention with explicit softmax (used when attention dropout is active).

  q: [B, T, N, H] (already scaled), k/v: [B, S, N, H], mask: broadcastable to [B, N, T, S] or None.
  """
  logits = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if not deterministic and dropout_rate > 0.0:
    keep = dropout_keep(dropout_rng, 1.0 - dropout_rate, weights.shape, dropout_masks)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0).astype(v.dtype)
  return jnp.einsum("bnts,bsnh->btnh", weights, v)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate query and key/value streams (self-attention when they are the same)."""
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = None  # jax.nn.dot_product_attention implementation (None, 'xla', 'cudnn').
  # Self-attention as one product with the stacked Q/K/V kernels (same parameters). Off by default: no gain
  # measured on CPU (docs/scaling.md); scripts/gpu_check.sh measures it on a GPU.
  fused_qkv: bool = False
  dropout_masks: str = "counter"

  @nn.compact
  def __call__(self, x_q, x_k, x_v, mask, deterministic: bool):
    width = x_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    projections = [HeadProjection(self.num_heads, head_dim, self.dtype, name=n) for n in ("query", "key", "value")]
    if self.fused_qkv and x_k is x_q and x_v is x_q:
      # One matrix product instead of three; the kernels are stacked on a new axis, so a `heads` sharding of each
      # carries over unchanged.
      weights = [p.weights(width) for p in projections]
      kernel = jnp.stack([w for w, _ in weights], axis=1).astype(self.dtype)    # [E, 3, N, H]
      bias = jnp.stack([b for _, b in weights], axis=0).astype(self.dtype)      # [3, N, H]
      qkv = jnp.einsum("...e,ecnh->...cnh", x_q.astype(self.dtype), kernel) + bias
      q, k, v = (qkv[..., i, :, :] for i in range(3))
    else:
      q, k, v = (p(x) for p, x in zip(projections, (x_q, x_k, x_v)))
    # Queries are scaled after the projection (bias included), as in the release.
    q = q * jnp.asarray(head_dim ** -0.5, self.dtype)
    if not deterministic and self.dropout_rate > 0.0:
      out = reference_attention(q, k, v, mask, self.make_rng("dropout"), self.dropout_rate, deterministic=False,
                                dropout_masks=self.dropout_masks)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation=self.implementation)
    return HeadMerge(width, self.dtype, name="out")(out)


class HeadProjection(nn.Module):
  """x [..., E] -> [..., N, H] with kernel [E, N, H] and bias [N, H] (Xavier-uniform over E x N*H)."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def weights(self, in_dim: int) -> tuple[jax.Array, jax.Array]:
    """(kernel [E, N, H], bias [N, H]), float32."""
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
    kernel = self.param("kernel", logical(init, ("embed", "heads", "kv")), (in_dim, self.num_heads, self.head_dim),
                        jnp.float32)
    bias = self.param("bias", logical(nn.initializers.zeros, ("heads", "kv")), (self.num_heads, self.head_dim),
                      jnp.float32)
    return kernel, bias

  def __call__(self, x):
    kernel, bias = self.weights(x.shape[-1])
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    return jnp.einsum("...e,enh->...nh", x, kernel) + bias


class HeadMerge(nn.Module):
  """[..., N, H] -> [..., E] with kernel [N, H, E] and bias [E]."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
    kernel = self.param("kernel", logical(init, ("heads", "kv", "embed")), (x.shape[-2], x.shape[-1], self.width),
                        jnp.float32)
    bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)), (self.width,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    return jnp.einsum("...nh,nhe->...e", x, kernel) + bias


class EncoderLayer(nn.Module):
  """Pre-LN Transformer layer; with a key/value stream it is a cross-attention layer.

  The first LayerNorm is shared by the query stream and the key/value streams (as released).
  """
  num_heads: int
  mlp_ratio: int = 4
  attention_dropout: float = 0.0
  residual_dropout: float = 0.1
  relu_dropout: float = 0.1
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  fused_qkv: bool = False
  dropout_masks: str = "counter"

  @nn.compact
  def __call__(self, x, x_k, x_v, mask, deterministic: bool):
    width = x.shape[-1]

    def dropout(rate):
      return Dropout(rate, self.dropout_masks)

    ln0 = layer_norm("ln_attention", self.dtype)
    h = ln0(x)
    if x_k is None:
      k = v = h
    else:
      k, v = ln0(x_k), ln0(x_v)
    h = MultiHeadAttention(self.num_heads, self.attention_dropout, self.dtype, self.attention_impl,
                           self.fused_qkv, self.dropout_masks, name="attention")(h, k, v, mask, deterministic)
    h = dropout(self.residual_dropout)(h, deterministic)
    x = x + h
    h = layer_norm("ln_mlp", self.dtype)(x)
    h = nn.Dense(self.mlp_ratio * width, dtype=self.dtype, name="fc1",
                 kernel_init=logical(default_kernel_init, ("embed", "mlp")),
                 bias_init=logical(nn.initializers.zeros, ("mlp",)))(h)
    h = nn.relu(h)
    h = dropout(self.relu_dropout)(h, deterministic)
    h = nn.Dense(width, dtype=self.dtype, name="fc2",
                 kernel_init=logical(default_kernel_init, ("mlp", "embed")),
                 bias_init=logical(nn.initializers.zeros, ("embed",)))(h)
    h = dropout(self.residual_dropout)(h, deterministic)
    x = x + h
    return nn.with_logical_constraint(x, BATCH_TIME_EMBED)


class Encoder(nn.Module):
  """A stack of pre-LN layers with input scaling, sinusoidal positions, embedding dropout and a final LayerNorm.

  With `kv` given, every layer attends from the query stream to the same (fixed) key/value stream.
  Position rule: `pos_valid` marks frames that get a positional embedding (the others get the zero row).
  """
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4
  embed_dropout: float = 0.25
  attention_dropout: float = 0.0
  residual_dropout: float = 0.1
  relu_dropout: float = 0.1
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: bool = False
  scan_layers: bool = False  # one scanned layer with stacked [L, ...] parameters (a different checkpoint layout)
  fused_qkv: bool = False
  dropout_masks: str = "counter"

  def _embed(self, x, pos_valid, deterministic):
    width = x.shape[-1]
    table = jnp.asarray(sinusoidal_table(x.shape[1] + 1, width))
    x = math.sqrt(width) * x.astype(jnp.float32) + table[position_ids(pos_valid)]
    return Dropout(self.embed_dropout, self.dropout_masks)(x, deterministic).astype(self.dtype)

  @nn.compact
  def __call__(self, x, pos_valid, mask, deterministic: bool, kv=None, kv_pos_valid=None):
    x = self._embed(x, pos_valid, deterministic)
    x_k = x_v = None
    if kv is not None:
      # The key and value streams receive independent embedding dropout, as in the release.
      x_k = self._embed(kv, kv_pos_valid, deterministic)
      x_v = self._embed(kv, kv_pos_valid, deterministic)
    args = (self.num_heads, self.mlp_ratio, self.attention_dropout, self.residual_dropout, self.relu_dropout,
            self.dtype, self.attention_impl, self.fused_qkv, self.dropout_masks)
    if self.scan_layers:
      layer_cls = nn.remat(ScanLayer, static_argnums=()) if self.remat else ScanLayer
      stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(*args, deterministic=deterministic, name="layers")(x, x_k, x_v, mask)
    else:
      layer_cls = nn.remat(EncoderLayer, static_argnums=(5,)) if self.remat else EncoderLayer
      for i in range(self.num_layers):
        x = layer_cls(*args, name=f"layer_{i}")(x, x_k, x_v, mask, deterministic)
    return layer_norm("ln_final", self.dtype)(x)


class ScanLayer(EncoderLayer):
  """EncoderLayer in the (carry, output) form of nn.scan; `deterministic` is an attribute (static)."""
  deterministic: bool = True

  def __call__(self, x, x_k, x_v, mask):  # pylint: disable=arguments-differ
    return super().__call__(x, x_k, x_v, mask, self.deterministic), None
