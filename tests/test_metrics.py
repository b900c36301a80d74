"""Tests for avt_jax.metrics against scikit-learn and numpy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from avt_jax import metrics

BATCH_SIZES = (1, 7, 33, 2, 100, 57, 64, 3, 250)  # Uneven on purpose; sum = 517.
NUM_CLASSES = 6


def _split(n, sizes=BATCH_SIZES):
  bounds = np.cumsum((0,) + tuple(sizes))
  assert bounds[-1] == n
  return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _classification_data(seed, n=sum(BATCH_SIZES), c=NUM_CLASSES):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  # Predictions right about half the time, so all metrics are away from 0 and 1.
  pred = np.where(rng.random(n) < 0.5, labels, rng.integers(0, c, n))
  logits = rng.normal(size=(n, c)).astype(np.float32)
  logits[np.arange(n), pred] += 10.0
  return logits, labels, pred


def _merged(cls, batches):
  out = cls.empty()
  for kwargs in batches:
    out = out.merge(cls.single_from_model_output(**kwargs) if hasattr(cls, "single_from_model_output")
                    else cls.from_model_output(**kwargs))
  return out


def _sklearn_scores(labels, pred, sample_weight=None):
  return {
      "accuracy": skm.accuracy_score(labels, pred, sample_weight=sample_weight),
      "uar": skm.balanced_accuracy_score(labels, pred, sample_weight=sample_weight),
      "macro_f1": skm.f1_score(labels, pred, average="macro", sample_weight=sample_weight, zero_division=0),
  }


def test_classification_merged_over_uneven_batches_matches_sklearn():
  logits, labels, pred = _classification_data(0)
  coll = metrics.confusion_metrics(NUM_CLASSES)
  merged = _merged(coll, [dict(logits=logits[s], labels=labels[s]) for s in _split(len(labels))])
  got = merged.compute()
  want = _sklearn_scores(labels, pred)
  for key in want:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-6, err_msg=key)
  np.testing.assert_array_equal(np.asarray(merged.accuracy.counts),
                                skm.confusion_matrix(labels, pred, labels=range(NUM_CLASSES)))


def test_classification_ignores_padding_and_negative_labels():
  logits, labels, pred = _classification_data(1)
  rng = np.random.default_rng(1)
  weight = (rng.random(len(labels)) > 0.2).astype(np.float32)  # 0 = padding clip.
  labels = np.where(rng.random(len(labels)) < 0.1, -1, labels)
  coll = metrics.confusion_metrics(NUM_CLASSES)
  merged = _merged(coll, [dict(logits=logits[s], labels=labels[s], weight=weight[s]) for s in _split(len(labels))])
  keep = (weight > 0) & (labels >= 0)
  assert 0 < keep.sum() < len(keep)
  want = _sklearn_scores(labels[keep], pred[keep])
  got = merged.compute()
  for key in want:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-6, err_msg=key)
  assert float(merged.accuracy.counts.sum()) == keep.sum()


def test_classification_with_float_weights_matches_sklearn_sample_weight():
  logits, labels, pred = _classification_data(2)
  weight = np.random.default_rng(2).uniform(0.1, 3.0, len(labels)).astype(np.float32)
  coll = metrics.confusion_metrics(NUM_CLASSES)
  merged = _merged(coll, [dict(logits=logits[s], labels=labels[s], weight=weight[s]) for s in _split(len(labels))])
  got = merged.compute()
  for key, value in _sklearn_scores(labels, pred, sample_weight=weight).items():
    np.testing.assert_allclose(float(got[key]), value, rtol=1e-5, err_msg=key)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_absent_classes_follow_sklearn():
  # Class 3 appears only in the predictions (F1 0, counted by macro F1, not by UAR); class 4 appears nowhere.
  labels = np.array([0, 0, 1, 2, 2, 2, 1])
  pred = np.array([0, 3, 1, 2, 0, 2, 3])
  logits = np.eye(5, dtype=np.float32)[pred]
  got = metrics.confusion_metrics(5).single_from_model_output(logits=logits, labels=labels).compute()
  want = _sklearn_scores(labels, pred)
  # Independent hand values: recalls 1/2, 1/2, 2/3; F1 per class 2/4, 2/3, 4/5, 0.
  np.testing.assert_allclose(want["uar"], (1 / 2 + 1 / 2 + 2 / 3) / 3)
  np.testing.assert_allclose(want["macro_f1"], (2 / 4 + 2 / 3 + 4 / 5 + 0) / 4)
  for key in want:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-6, err_msg=key)


def test_classification_inside_jit_and_device_reduce():
  logits, labels, pred = _classification_data(3, n=64)
  coll = metrics.confusion_metrics(NUM_CLASSES)

  @jax.jit
  def step(state, logits, labels):
    return state.merge(coll.single_from_model_output(logits=logits, labels=labels))

  state = coll.empty()
  for s in _split(64, (16, 16, 16, 16)):
    state = step(state, logits[s], labels[s])
  want = _sklearn_scores(labels, pred)
  for key, value in state.compute().items():
    np.testing.assert_allclose(float(value), want[key], rtol=1e-6)

  # The per-device path: states stacked on a leading axis (what all_gather gives), then `reduce`.
  per_device = [coll.single_from_model_output(logits=logits[s], labels=labels[s]) for s in _split(64, (8,) * 8)]
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_device)
  reduced = stacked.reduce()
  for key, value in reduced.compute().items():
    np.testing.assert_allclose(float(value), want[key], rtol=1e-6)


def test_classification_bad_input_errors():
  acc = metrics.Accuracy.with_classes(3)
  with pytest.raises(ValueError, match="out of range"):
    acc.from_model_output(jnp.zeros((2, 3)), jnp.array([0, 3]))
  with pytest.raises(ValueError, match="expected 3"):
    acc.from_model_output(jnp.zeros((2, 4)), jnp.array([0, 1]))
  with pytest.raises(ValueError, match="labels have shape"):
    acc.from_model_output(jnp.zeros((2, 3)), jnp.array([0, 1, 2]))
  with pytest.raises(TypeError, match="with_classes"):
    metrics.Accuracy.empty()
  assert metrics.UAR.with_classes(3) is metrics.UAR.with_classes(3)


# ----------------------------------------------------------------------------------------------------------------
# CCC.


def _ccc_reference(x, y, w):
  """Weighted population CCC per column in float64; entries with NaN target or zero weight are dropped."""
  x, y, w = (np.asarray(a, np.float64) for a in (x, y, w))
  out = []
  for k in range(y.shape[1]):
    keep = np.isfinite(y[:, k]) & (w[:, k] != 0)
    xk, yk, wk = x[keep, k], y[keep, k], w[keep, k]
    mx, my = np.average(xk, weights=wk), np.average(yk, weights=wk)
    vx, vy = np.average((xk - mx) ** 2, weights=wk), np.average((yk - my) ** 2, weights=wk)
    cov = np.average((xk - mx) * (yk - my), weights=wk)
    out.append(2 * cov / (vx + vy + (mx - my) ** 2))
  return np.array(out)


def _rating_data(seed, n=10_000, k=3):
  rng = np.random.default_rng(seed)
  y = rng.normal(3.0, 1.0, size=(n, k))
  x = 0.1 + 0.7 * y + rng.normal(0.0, 0.6, size=(n, k)) + 0.2  # Correlated, shifted, shrunk.
  return x.astype(np.float32), y.astype(np.float32)


def _uneven_sizes(n):
  # A few distinct sizes, repeated (each new shape costs an eager compile), with a shorter last batch.
  pattern = (1, 7, 33, 256, 703)
  sizes = []
  while sum(sizes) < n:
    sizes.append(pattern[len(sizes) % len(pattern)])
  sizes[-1] -= sum(sizes) - n
  return tuple(sizes)


def test_ccc_merged_matches_float64_on_ratings():
  x, y = _rating_data(0)
  cls = metrics.CCC.for_targets()
  state = cls.empty()
  for s in _split(len(y), _uneven_sizes(len(y))):
    state = state.merge(cls.from_model_output(predictions=x[s], targets=y[s]))
  got = np.asarray(state.compute())
  want = _ccc_reference(x, y, np.ones_like(y))
  assert 0.3 < want.min() and want.max() < 0.95
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Summary statistics (means) are exact too.
  np.testing.assert_allclose(np.asarray(state.mean_y), y.astype(np.float64).mean(0), atol=1e-5)
  named = state.compute_named()
  assert list(named) == ["ccc_arousal", "ccc_valence", "ccc_dominance"]
  np.testing.assert_allclose(float(named["ccc_valence"]), want[1], atol=1e-5)


def test_ccc_nan_targets_and_weights():
  x, y = _rating_data(1, n=5_000, k=2)
  rng = np.random.default_rng(1)
  y[rng.random(y.shape) < 0.05] = np.nan  # Missing attribute annotations.
  clip_weight = (rng.random(len(y)) > 0.1).astype(np.float32)  # 0 = padding clip.
  clip_weight *= rng.uniform(0.5, 2.0, len(y)).astype(np.float32)
  cls = metrics.CCC.for_targets(("arousal", "valence"))
  state = cls.empty()
  for s in _split(len(y), _uneven_sizes(len(y))):
    state = state.merge(cls.from_model_output(predictions=x[s], targets=y[s], weight=clip_weight[s]))
  want = _ccc_reference(x, y, np.repeat(clip_weight[:, None], 2, axis=1))
  np.testing.assert_allclose(np.asarray(state.compute()), want, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(state.compute())))


def test_ccc_hand_values():
  cls = metrics.CCC.for_targets(1)
  t = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]], np.float32)
  assert float(cls.from_model_output(predictions=t, targets=t).compute()[0]) == pytest.approx(1.0, abs=1e-6)
  # Constant offset 1: var = 2, cov = 2, so CCC = 2*2 / (2 + 2 + 1) = 0.8 (Pearson would still be 1).
  got = cls.from_model_output(predictions=t + 1.0, targets=t).compute()[0]
  assert float(got) == pytest.approx(0.8, abs=1e-6)
  # Scaled predictions x = 2 t: var x = 8, cov = 4, mean diff 3: 8 / (8 + 2 + 9).
  got = cls.from_model_output(predictions=2 * t, targets=t).compute()[0]
  assert float(got) == pytest.approx(8 / 19, abs=1e-6)
  # The same split into one-sample batches, with an empty state in the middle.
  state = cls.empty()
  for i in range(5):
    state = state.merge(cls.from_model_output(predictions=2 * t[i:i + 1], targets=t[i:i + 1])).merge(cls.empty())
  assert float(state.compute()[0]) == pytest.approx(8 / 19, abs=1e-6)


def test_ccc_inside_jit_and_device_reduce():
  x, y = _rating_data(2, n=800, k=3)
  cls = metrics.CCC.for_targets()
  want = _ccc_reference(x, y, np.ones_like(y))

  @jax.jit
  def step(state, x, y):
    return state.merge(cls.from_model_output(predictions=x, targets=y))

  state = cls.empty()
  for s in _split(800, (200,) * 4):
    state = step(state, x[s], y[s])
  np.testing.assert_allclose(np.asarray(state.compute()), want, atol=1e-5)

  per_device = [cls.from_model_output(predictions=x[s], targets=y[s]) for s in _split(800, (100,) * 8)]
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_device)
  np.testing.assert_allclose(np.asarray(stacked.reduce().compute()), want, atol=1e-5)


def test_ccc_bad_input_errors():
  cls = metrics.CCC.for_targets(("arousal", "valence"))
  with pytest.raises(ValueError, match="expected"):
    cls.from_model_output(predictions=jnp.zeros((4, 3)), targets=jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match="predictions have shape"):
    cls.from_model_output(predictions=jnp.zeros((4, 1)), targets=jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match="weight has shape"):
    cls.from_model_output(predictions=jnp.zeros((4, 2)), targets=jnp.zeros((4, 2)), weight=jnp.ones(5))
  with pytest.raises(TypeError, match="for_targets"):
    metrics.CCC.empty()
  assert np.isnan(np.asarray(cls.empty().compute())).all()
