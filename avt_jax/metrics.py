"""Evaluation metrics as `clu.metrics.Metric` classes.

Every metric keeps sufficient statistics, so merging over batches (`merge`) and over devices or hosts (gather, then
`reduce`) gives the same result as computing on the whole evaluation set at once; per-batch values are never
averaged.

- Classification: `ConfusionMatrix` holds the weighted [C, C] confusion matrix (rows = true class, columns =
  predicted class); `Accuracy` (weighted average recall, WAR), `UAR` (unweighted average recall) and `MacroF1` are
  views of it. The class count is static: use `Accuracy.with_classes(6)` etc., or `confusion_metrics(6)` for a
  `clu.metrics.Collection` holding all three.
- Regression: `CCC` is the concordance correlation coefficient per target attribute; `CCC.for_targets(names)`
  fixes the attribute count. Its state is (weight sum, mean, centred second moments) per attribute, merged with the
  parallel-variance formula of Chan, Golub and LeVeque, so float32 stays accurate for ratings with a large mean
  and a small spread (sums of squares would cancel catastrophically).
- Losses: `clu.metrics.Average` (total and count) is already exact under merging and is used as is.

Counts are float32: integer counts stay exact up to 2**24 per confusion-matrix cell.
"""

from __future__ import annotations

import functools
from typing import ClassVar, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

DEFAULT_TARGET_NAMES = ("arousal", "valence", "dominance")


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _combined_weight(shape, weight, mask) -> jnp.ndarray:
  """Multiplies optional `weight` and `mask` (clu passes `mask`) into one float32 weight of `shape`."""
  w = jnp.ones(shape, jnp.float32)
  for name, value in (("weight", weight), ("mask", mask)):
    if value is None:
      continue
    value = jnp.asarray(value)
    if value.shape != tuple(shape[:value.ndim]):
      raise ValueError(f"{name} has shape {value.shape}, expected a prefix of {tuple(shape)}")
    value = value.reshape(value.shape + (1,) * (len(shape) - value.ndim))
    w = w * value.astype(jnp.float32)
  return w


def _check_same_shape(name, a, b):
  if a.shape != b.shape:
    raise ValueError(f"{name}.merge: states have shapes {a.shape} and {b.shape} (different class or target counts?)")


# ----------------------------------------------------------------------------------------------------------------
# Classification.


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """Weighted confusion matrix; `compute()` returns it ([C, C], rows = true class, columns = predicted class).

  `from_model_output(logits, labels, weight=None, mask=None)`: logits [..., C], integer labels [...]. Rows with
  weight (times mask) 0, e.g. padding clips, and labels < 0 do not count. Labels >= C are an error when the labels
  are concrete; under `jax.jit` they cannot be checked and are dropped.
  """

  counts: jnp.ndarray
  num_classes: ClassVar[int] = 0

  @classmethod
  def with_classes(cls, num_classes: int):
    """Returns the subclass of `cls` for `num_classes` classes (the same class object for the same arguments)."""
    return _with_classes(cls, int(num_classes))

  @classmethod
  def _check_classes(cls) -> int:
    if cls.num_classes <= 0:
      raise TypeError(f"{cls.__name__} has no class count: use {cls.__name__}.with_classes(num_classes)")
    return cls.num_classes

  @classmethod
  def empty(cls):
    c = cls._check_classes()
    return cls(counts=jnp.zeros((c, c), jnp.float32))

  @classmethod
  def from_model_output(cls, logits, labels, weight=None, mask=None, **_):
    c = cls._check_classes()
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.shape[-1] != c:
      raise ValueError(f"{cls.__name__}: logits have {logits.shape[-1]} classes (shape {logits.shape}), expected {c}")
    if labels.shape != logits.shape[:-1]:
      raise ValueError(f"{cls.__name__}: labels have shape {labels.shape}, expected {logits.shape[:-1]} "
                       f"(the logits' shape {logits.shape} without the class axis)")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"{cls.__name__}: labels must be integers, got dtype {labels.dtype}")
    if _is_concrete(labels) and labels.size and int(jnp.max(labels)) >= c:
      raise ValueError(f"{cls.__name__}: label {int(jnp.max(labels))} is out of range for {c} classes "
                       "(use a negative label to ignore a row)")
    w = _combined_weight(labels.shape, weight, mask) * (labels >= 0)
    true = jax.nn.one_hot(labels, c, dtype=jnp.float32) * w[..., None]  # Zero rows for ignored labels.
    pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), c, dtype=jnp.float32)
    counts = jnp.einsum("...t,...p->tp", true, pred)
    return cls(counts=counts)

  def merge(self, other):
    _check_same_shape(type(self).__name__, self.counts, other.counts)
    return type(self)(counts=self.counts + other.counts)

  def compute(self):
    return self.counts

  # Quantities shared by the subclasses; classes absent from a sum are excluded, never counted as 0 or 1.
  def _recall_terms(self):
    true_total = self.counts.sum(axis=-1)
    present = true_total > 0
    recall = jnp.diagonal(self.counts, axis1=-2, axis2=-1) / jnp.where(present, true_total, 1.0)
    return recall, present


@functools.lru_cache(maxsize=None)
def _with_classes(cls, num_classes: int):
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  sub = type(f"{cls.__name__}{num_classes}", (cls,), {"num_classes": num_classes, "__module__": cls.__module__})
  return flax.struct.dataclass(sub)


@flax.struct.dataclass
class Accuracy(ConfusionMatrix):
  """Accuracy = weighted average recall (WAR): weight of correct rows / weight of all rows."""

  def compute(self):
    return jnp.trace(self.counts, axis1=-2, axis2=-1) / self.counts.sum(axis=(-2, -1))


@flax.struct.dataclass
class UAR(ConfusionMatrix):
  """Unweighted average recall: mean over the classes present in the labels of each class's recall."""

  def compute(self):
    recall, present = self._recall_terms()
    return jnp.sum(jnp.where(present, recall, 0.0), axis=-1) / jnp.sum(present, axis=-1)


@flax.struct.dataclass
class MacroF1(ConfusionMatrix):
  """Macro F1 over the classes present in the labels or the predictions (scikit-learn's `average='macro'`).

  Per class F1 = 2 TP / (2 TP + FP + FN); a class present only in the predictions has F1 0.
  """

  def compute(self):
    tp = jnp.diagonal(self.counts, axis1=-2, axis2=-1)
    true_total = self.counts.sum(axis=-1)
    pred_total = self.counts.sum(axis=-2)
    denom = true_total + pred_total  # = 2 TP + FP + FN.
    present = denom > 0
    f1 = 2.0 * tp / jnp.where(present, denom, 1.0)
    return jnp.sum(jnp.where(present, f1, 0.0), axis=-1) / jnp.sum(present, axis=-1)


@functools.lru_cache(maxsize=None)
def confusion_metrics(num_classes: int) -> type[clu_metrics.Collection]:
  """A Collection with `accuracy`, `uar` and `macro_f1`; built from `logits=..., labels=..., weight=...`."""
  return clu_metrics.Collection.create(
      accuracy=Accuracy.with_classes(num_classes),
      uar=UAR.with_classes(num_classes),
      macro_f1=MacroF1.with_classes(num_classes))


# ----------------------------------------------------------------------------------------------------------------
# Regression.


@flax.struct.dataclass
class CCC(clu_metrics.Metric):
  """Concordance correlation coefficient per target attribute, with population (1/N) moments.

  CCC = 2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2), x = prediction, y = target.

  `from_model_output(predictions, targets, weight=None, mask=None)`: predictions and targets [..., K]; weight and
  mask have the shape of `targets` or a prefix of it (e.g. [B] per clip). NaN targets are ignored, NaN predictions
  for a counted target propagate (they mean the model is broken). Weights act as frequency weights.

  State per attribute: total weight `count`, weighted means, and centred sums `m2_x` = sum w (x - mean x)^2,
  `m2_y`, `c_xy` = sum w (x - mean x)(y - mean y). A batch is centred on its own means (two passes), and `merge`
  combines two states exactly: with d = mean_b - mean_a and n = n_a + n_b, mean = mean_a + d n_b / n and
  m2 = m2_a + m2_b + d_x d_y n_a n_b / n. This keeps float32 accurate to ~1e-6 for 1-5 ratings.
  """

  count: jnp.ndarray
  mean_x: jnp.ndarray
  mean_y: jnp.ndarray
  m2_x: jnp.ndarray
  m2_y: jnp.ndarray
  c_xy: jnp.ndarray
  target_names: ClassVar[tuple[str, ...]] = ()

  @classmethod
  def for_targets(cls, target_names: Sequence[str] | int = DEFAULT_TARGET_NAMES):
    """Returns the subclass of `cls` for these attributes (names, or a count K for names t0..tK-1)."""
    if isinstance(target_names, (int, np.integer)):
      target_names = tuple(f"t{i}" for i in range(int(target_names)))
    return _for_targets(cls, tuple(str(n) for n in target_names))

  @classmethod
  def _check_targets(cls) -> int:
    if not cls.target_names:
      raise TypeError(f"{cls.__name__} has no target attributes: use {cls.__name__}.for_targets(names)")
    return len(cls.target_names)

  @classmethod
  def empty(cls):
    k = cls._check_targets()
    z = jnp.zeros((k,), jnp.float32)
    return cls(count=z, mean_x=z, mean_y=z, m2_x=z, m2_y=z, c_xy=z)

  @classmethod
  def from_model_output(cls, predictions, targets, weight=None, mask=None, **_):
    k = cls._check_targets()
    x = jnp.asarray(predictions, jnp.float32)
    y = jnp.asarray(targets, jnp.float32)
    if y.ndim < 1 or y.shape[-1] != k:
      raise ValueError(f"{cls.__name__}: targets have shape {y.shape}, expected [..., {k}] for {cls.target_names}")
    if x.shape != y.shape:
      raise ValueError(f"{cls.__name__}: predictions have shape {x.shape}, expected the targets' shape {y.shape}")
    w = _combined_weight(y.shape, weight, mask)
    valid = jnp.isfinite(y) & (w != 0)
    w = jnp.where(valid, w, 0.0).reshape(-1, k)
    x = jnp.where(valid, x, 0.0).reshape(-1, k)  # Zero out ignored entries: NaN * 0 would still be NaN.
    y = jnp.where(valid, y, 0.0).reshape(-1, k)
    n = w.sum(axis=0)
    safe_n = jnp.where(n > 0, n, 1.0)
    mean_x = (w * x).sum(axis=0) / safe_n
    mean_y = (w * y).sum(axis=0) / safe_n
    dx = jnp.where(valid.reshape(-1, k), x - mean_x, 0.0)
    dy = jnp.where(valid.reshape(-1, k), y - mean_y, 0.0)
    return cls(count=n, mean_x=mean_x, mean_y=mean_y,
               m2_x=(w * dx * dx).sum(axis=0), m2_y=(w * dy * dy).sum(axis=0), c_xy=(w * dx * dy).sum(axis=0))

  def merge(self, other):
    _check_same_shape(type(self).__name__, self.count, other.count)
    n = self.count + other.count
    frac_b = other.count / jnp.where(n > 0, n, 1.0)  # 0 when both are empty.
    dx = other.mean_x - self.mean_x
    dy = other.mean_y - self.mean_y
    cross = self.count * frac_b  # = n_a n_b / n.
    return type(self)(
        count=n,
        mean_x=self.mean_x + dx * frac_b,
        mean_y=self.mean_y + dy * frac_b,
        m2_x=self.m2_x + other.m2_x + dx * dx * cross,
        m2_y=self.m2_y + other.m2_y + dy * dy * cross,
        c_xy=self.c_xy + other.c_xy + dx * dy * cross)

  def compute(self):
    """CCC per attribute, [K]; NaN for an attribute without data."""
    n = self.count
    diff = self.mean_x - self.mean_y
    # All moments share the 1/N factor, so it cancels except in front of the squared mean difference.
    return 2.0 * self.c_xy / (self.m2_x + self.m2_y + n * diff * diff)

  def compute_named(self, prefix: str = "ccc_") -> dict[str, jnp.ndarray]:
    return name_values(self.compute(), self.target_names, prefix)


@functools.lru_cache(maxsize=None)
def _for_targets(cls, target_names: tuple[str, ...]):
  if not target_names:
    raise ValueError("CCC needs at least one target attribute")
  if len(set(target_names)) != len(target_names):
    raise ValueError(f"duplicate target names {target_names}")
  sub = type(f"{cls.__name__}{len(target_names)}", (cls,),
             {"target_names": target_names, "__module__": cls.__module__})
  return flax.struct.dataclass(sub)


def name_values(values, names: Sequence[str] = DEFAULT_TARGET_NAMES, prefix: str = "ccc_") -> dict[str, jnp.ndarray]:
  """{prefix + name: value} for a per-attribute vector, e.g. {'ccc_arousal': ..., 'ccc_valence': ...}."""
  values = jnp.asarray(values)
  if values.shape != (len(names),):
    raise ValueError(f"got values of shape {values.shape} for {len(names)} names {tuple(names)}")
  return {f"{prefix}{name}": values[i] for i, name in enumerate(names)}

