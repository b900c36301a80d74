"""Optimizers and learning-rate schedules as optax transformations.

`bert_adam` is the optimizer of the released training code (BertAdam of pytorch-pretrained-bert plus the training
script's gradient clipping):

1. global clip: all gradients are scaled by min(1, max_grad_norm / (global_norm + 1e-6)). The training script does
   this before calling the optimizer, so it comes first.
2. per-tensor clip: each tensor is scaled by min(1, per_tensor_clip / (its_norm + 1e-6)), as BertAdam does for each
   parameter inside its step. After step 1 every tensor's norm is below max_grad_norm, so with the released values
   (both 1.0) this step changes nothing; it matters when per_tensor_clip < max_grad_norm or the global clip is off.
   The 1e-6 in both clips follows torch's `clip_grad_norm_`.
3. Adam moments without bias correction: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, update = m / (sqrt(v) + eps).
4. decoupled weight decay on every parameter: update += weight_decay * param.
5. param -= lr(step) * update, where step counts the updates already applied (0 for the first one, like optax).

`make_optimizer(config, params)` builds either that or optax's AdamW from a ConfigDict, with a schedule and regex
parameter groups that scale the learning rate (multiplier 0 freezes a group: its updates are exactly zero and its
gradients are left out of the global norm).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], jnp.ndarray]

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ adds this to the norm.


# ----------------------------------------------------------------------------------------------------------------
# Gradient transformations.


def _clip_scale(norm, max_norm):
  return jnp.minimum(1.0, max_norm / (norm + _CLIP_EPS))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales all gradients by min(1, max_norm / (global L2 norm + 1e-6))."""

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree_util.tree_leaves(updates)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves)) if leaves else jnp.zeros(())
    scale = _clip_scale(norm, max_norm)
    return jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clip_per_tensor_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales each gradient tensor by min(1, max_norm / (its L2 norm + 1e-6))."""

  def clip(g):
    return (g * _clip_scale(jnp.sqrt(jnp.sum(jnp.square(g))), max_norm)).astype(g.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class ScaleByBertAdamState(NamedTuple):
  mu: Any
  nu: Any


def scale_by_bert_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
  """Adam direction without bias correction: m / (sqrt(v) + eps) (eps outside the square root)."""

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p)  # pylint: disable=unnecessary-lambda-assignment
    return ScaleByBertAdamState(mu=jax.tree_util.tree_map(zeros, params), nu=jax.tree_util.tree_map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, updates)
    direction = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return direction, ScaleByBertAdamState(mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _enabled(max_norm) -> bool:
  return max_norm is not None and max_norm > 0


def bert_adam(learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
              weight_decay: float = 0.01, max_grad_norm: float | None = 1.0, per_tensor_clip: float | None = 1.0,
              weight_decay_mask: Any = None) -> optax.GradientTransformation:
  """BERT-style Adam of the release (see the module docstring for the exact steps).

  A clip threshold of None or <= 0 turns that clip off. `weight_decay_mask` (optional, optax mask semantics)
  restricts the decay; the release decays every parameter.
  """
  parts = []
  if _enabled(max_grad_norm):
    parts.append(clip_by_global_norm(max_grad_norm))
  if _enabled(per_tensor_clip):
    parts.append(clip_per_tensor_norm(per_tensor_clip))
  parts.append(scale_by_bert_adam(b1, b2, eps))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------------------------------------------
# Schedules (functions of the number of updates already applied).


def warmup_linear_decay(peak: float, total_steps: int, warmup_fraction: float = 0.1) -> Schedule:
  """Linear warm-up from 0 to `peak` over the first `warmup_fraction * total_steps` steps, then linear decay to 0
  at `total_steps` (0 afterwards). The warm-up length need not be a whole number of steps."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be > 0, got {total_steps}")
  if not 0.0 <= warmup_fraction < 1.0:
    raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
  warmup = warmup_fraction * total_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    decay = (total_steps - step) / (total_steps - warmup)
    frac = jnp.minimum(step / warmup, decay) if warmup > 0 else decay
    return peak * jnp.clip(frac, 0.0, 1.0)

  return schedule


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int, end_value: float = 0.0) -> Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to `end_value` at `total_steps`."""
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                     f"total_steps={total_steps}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=int(warmup_steps), decay_steps=int(total_steps),
      end_value=end_value)


def make_schedule(config) -> Schedule:
  """The base learning-rate schedule described by `config` (see `make_optimizer`)."""
  kind = config.get("schedule", "warmup_linear")
  lr = float(config.lr)
  if kind == "constant":
    return optax.constant_schedule(lr)
  total = config.get("total_steps", None)
  if not total or total <= 0:
    raise ValueError(f"optimizer config: schedule {kind!r} needs total_steps > 0, got {total!r}")
  frac = float(config.get("warmup_fraction", 0.1))
  if kind == "warmup_linear":
    return warmup_linear_decay(lr, int(total), frac)
  if kind == "warmup_cosine":
    warmup_steps = config.get("warmup_steps", None)
    if warmup_steps is None:
      warmup_steps = int(round(frac * total))
    return warmup_cosine(lr, int(total), int(warmup_steps), float(config.get("end_lr", 0.0)))
  raise ValueError(f"optimizer config: unknown schedule {kind!r}, expected 'warmup_linear', 'warmup_cosine' "
                   "or 'constant'")


# ----------------------------------------------------------------------------------------------------------------
# Parameter groups and the configured optimizer.


def path_name(path) -> str:
  """'/'-joined name of a pytree key path, e.g. 'params/encoder/layer_0/kernel'."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _groups(config) -> list[tuple[re.Pattern, float]]:
  groups = []
  for i, group in enumerate(config.get("param_groups", None) or ()):
    try:
      pattern, mult = group["pattern"], float(group["lr_multiplier"])
    except (KeyError, TypeError) as e:
      raise ValueError(f"optimizer config: param_groups[{i}] = {group!r} needs 'pattern' and 'lr_multiplier'") from e
    if mult < 0:
      raise ValueError(f"optimizer config: param_groups[{i}] ({pattern!r}) has lr_multiplier {mult}, expected >= 0")
    try:
      groups.append((re.compile(pattern), mult))
    except re.error as e:
      raise ValueError(f"optimizer config: param_groups[{i}] pattern {pattern!r} is not a regex: {e}") from e
  return groups


def _multipliers(groups, tree) -> Any:
  def mult(path, _):
    name = path_name(path)
    for pattern, m in groups:
      if pattern.search(name):
        return m
    return 1.0

  return jax.tree_util.tree_map_with_path(mult, tree)


def scale_leaves(multipliers_fn: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Multiplies each leaf by the Python float that `multipliers_fn(updates)` gives for it; 0 gives exact zeros
  (even for NaN inputs), 1 leaves the leaf untouched. Stateless."""

  def scale(g, m):
    if m == 0:
      return jnp.zeros_like(g)
    return g if m == 1 else (g * m).astype(g.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(scale, updates, multipliers_fn(updates)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def map_state_params(tx: optax.GradientTransformation, fn: Callable[[Any, Any], Any], state: Any, tree: Any,
                     non_params: Callable[[Any], Any]) -> Any:
  """`optax.tree_map_params` that also works with frozen groups: fn(state leaf, leaf of `tree` at the same
  parameter) for the moments, `non_params(x)` for everything else; frozen parameters' empty nodes are kept."""
  masked = lambda x: isinstance(x, optax.MaskedNode)  # pylint: disable=unnecessary-lambda-assignment
  return optax.tree_map_params(tx, lambda x, t: x if masked(x) else fn(x, t), state, tree,
                               transform_non_params=non_params, is_leaf=masked)


def make_optimizer(config, params) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optimizer described by `config` for parameters shaped like `params` (arrays or ShapeDtypeStructs).

  config fields (ml_collections.ConfigDict or dict-like with `.get`):
    name: 'bert_adam' or 'adamw'; lr; b1 (0.9); b2 (0.999); eps (1e-6); weight_decay (0.01);
    max_grad_norm (1.0, global clip; None/0 = off); per_tensor_clip (1.0, bert_adam only);
    schedule: 'warmup_linear' | 'warmup_cosine' | 'constant'; warmup_fraction (0.1); total_steps;
    warmup_steps and end_lr (warmup_cosine only, optional);
    param_groups: list of {pattern: regex searched in the '/'-joined parameter path, lr_multiplier: float >= 0};
      the first matching group wins, unmatched parameters use multiplier 1. A pattern that matches no parameter
      is an error (it is almost always a typo).

  Frozen parameters (multiplier 0) are split off with `optax.multi_transform`: their update is exactly 0, their
  gradients are left out of the global norm, and the optimizer holds no moments for them (`optax.masked` leaves
  an empty node in their place). The other multipliers scale the final updates leaf by leaf, so the state of the
  trainable part keeps the parameters' structure (`optax.tree_map_params` works on it).

  Returns (transformation, schedule); the schedule is the base one (multiplier 1), for logging the learning rate.
  """
  name = config.get("name", "bert_adam")
  if name not in ("bert_adam", "adamw"):
    raise ValueError(f"optimizer config: unknown name {name!r}, expected 'bert_adam' or 'adamw'")
  schedule = make_schedule(config)
  b1, b2 = float(config.get("b1", 0.9)), float(config.get("b2", 0.999))
  eps, wd = float(config.get("eps", 1e-6)), float(config.get("weight_decay", 0.01))
  max_grad_norm = config.get("max_grad_norm", 1.0)

  groups = _groups(config)
  names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for i, (pattern, _) in enumerate(groups):
    if not any(pattern.search(n) for n in names):
      raise ValueError(f"optimizer config: param_groups[{i}] pattern {pattern.pattern!r} matches no parameter; "
                       f"parameter paths look like {names[:3]}")
  used = set(jax.tree_util.tree_leaves(_multipliers(groups, params)))

  parts = []
  if _enabled(max_grad_norm):
    parts.append(clip_by_global_norm(float(max_grad_norm)))
  if name == "bert_adam":
    parts.append(bert_adam(schedule, b1, b2, eps, wd, max_grad_norm=None,
                           per_tensor_clip=config.get("per_tensor_clip", 1.0)))
  else:
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd))
  if used - {0.0, 1.0}:
    parts.append(scale_leaves(lambda t: _multipliers(groups, t)))
  tx = optax.chain(*parts)
  if 0.0 in used:
    labels = lambda t: jax.tree_util.tree_map(  # pylint: disable=unnecessary-lambda-assignment
        lambda m: "frozen" if m == 0 else "trainable", _multipliers(groups, t))
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
