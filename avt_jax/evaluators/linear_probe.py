"""Linear probe on frozen encoder features: how much of the labels a linear model reads off the representation.

Every evaluation, the encoder (of whatever task is training, pretraining included) embeds the clips of a labelled
`fit` set and of the `data` set; each clip's features are pooled over its valid frames (masked mean), standardised
with the fit set's mean and std, and a probe is fitted on the fit set: multinomial logistic regression with L2
penalty (classification, labels >= 0) or ridge regression (regression, finite targets). Reported on `data`:
accuracy and UAR, or CCC per attribute and their mean, plus the clip counts used for fitting and scoring.

Config (an entry of config.evals):
  {"type": "linear_probe", "data": <split of config.data or a dataset spec>, "fit": <same>,
   "target": "label" | "targets", "C": 1.0 (logistic: inverse penalty), "alpha": 1.0 (ridge penalty),
   "target_indices": (0, 1), "target_names": ("arousal", "valence"), "when": "during"}

The logistic fit minimises 0.5 ||W||^2 + C sum_i cross-entropy_i (intercepts unpenalised), scikit-learn's
objective, by Newton's method in float64; ridge minimises ||y - X w - b||^2 + alpha ||w||^2 in closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from avt_jax import input_pipeline, metrics, sharding
from avt_jax.evaluators import data_spec
from avt_jax.models import avt


# ----------------------------------------------------------------------------------------------------------------
# The probes (numpy, float64).


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, c: float = 1.0, max_iter: int = 100,
                 tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
  """(W [D, K], b [K]) minimising 0.5 ||W||^2 + C * sum cross-entropy(softmax(x W + b), y)."""
  x = np.asarray(x, np.float64)
  n, d = x.shape
  k = int(num_classes)
  onehot = np.eye(k)[np.asarray(y)]
  xb = np.concatenate([x, np.ones((n, 1))], axis=1)          # [N, D + 1]: the last row of theta is the intercept
  penalty = np.ones(d + 1)
  penalty[-1] = 0.0
  theta = np.zeros((d + 1, k))

  def objective(t):
    z = xb @ t
    z = z - z.max(axis=1, keepdims=True)
    ce = -(onehot * (z - np.log(np.exp(z).sum(axis=1, keepdims=True)))).sum()
    return 0.5 * float((penalty[:, None] * t * t).sum()) + c * ce

  value = objective(theta)
  for _ in range(max_iter):
    p = _softmax(xb @ theta)
    grad = c * xb.T @ (p - onehot) + penalty[:, None] * theta   # [D + 1, K]
    # Hessian of the softmax cross-entropy: sum_i x_i x_i^T (x) (diag(p_i) - p_i p_i^T), plus the penalty.
    h = np.zeros((d + 1, k, d + 1, k))
    for a in range(k):
      for b in range(k):
        w = p[:, a] * ((a == b) - p[:, b])
        h[:, a, :, b] = c * (xb * w[:, None]).T @ xb
    flat = h.reshape((d + 1) * k, (d + 1) * k) + np.diag(np.repeat(penalty, k))
    # The intercepts are unpenalised and the softmax ignores a common shift: lstsq picks the minimum-norm step.
    step = np.linalg.lstsq(flat, grad.reshape(-1), rcond=None)[0].reshape(d + 1, k)
    scale = 1.0
    while scale > 1e-8:
      trial = theta - scale * step
      new = objective(trial)
      if new <= value:
        break
      scale *= 0.5
    theta, old, value = trial, value, new
    if old - value <= tol * max(1.0, abs(value)):
      break
  return theta[:-1], theta[-1]


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """(W [D, K], b [K]) minimising ||y - x W - b||^2 + alpha ||W||^2 (intercept unpenalised)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mx, my = x.mean(axis=0), y.mean(axis=0)
  xc, yc = x - mx, y - my
  w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
  return w, my - mx @ w


# ----------------------------------------------------------------------------------------------------------------
# The evaluator.


class Evaluator:

  def __init__(self, name: str, eval_config, setup):
    self.name, self.config, self.setup = name, dict(eval_config), setup
    run_config = setup.config
    if jax.process_count() > 1:  # the targets stay on the host that read them; the features are global
      raise ValueError(f"config.evals.{name}: the linear probe runs in single-process jobs only")
    if "fit" not in self.config:
      raise ValueError(f"config.evals.{name}: a linear probe needs 'fit' (the labelled clips it is fitted on)")
    self.fit_spec = data_spec(run_config, self.config["fit"])
    self.spec = data_spec(run_config, self.config["data"])
    self.target = self.config.get("target", "label")
    if self.target not in ("label", "targets"):
      raise ValueError(f"config.evals.{name}.target={self.target!r}; expected 'label' or 'targets'")
    self.batch_size = int(self.config.get("batch_size") or run_config.get("eval_batch_size", run_config.batch_size))
    self.target_indices = tuple(int(i) for i in self.config.get("target_indices", (0, 1)))
    self.target_names = tuple(self.config.get("target_names", metrics.DEFAULT_TARGET_NAMES[:len(self.target_indices)]))
    task = setup.task
    keys = task.batch_keys

    def embed(params, batch):
      out = task.apply(params, batch, None, False)
      return avt.readout(out["features"], batch["mask"], "mean")

    self._keys = keys
    self._embed = jax.jit(embed, in_shardings=(setup.param_shardings, {k: setup.batch_shardings[k] for k in keys}),
                          out_shardings=sharding.replicated(setup.mesh))

  def features(self, params, spec) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features [N, 2d], targets [N] labels or [N, K]) of every clip of `spec`, in record order."""
    setup = self.setup
    keys = tuple(dict.fromkeys(self._keys + ("label", "targets", "weight")))
    ds = input_pipeline.make_dataset(spec, split="eval", global_batch_size=self.batch_size, seed=0,
                                     max_tokens=setup.max_tokens, worker_count=0, keys=keys,
                                     normalization=setup.normalization)
    feats, ys, weights = [], [], []
    with setup.scope():
      for local in ds:
        batch = sharding.global_batch({k: local[k] for k in self._keys}, setup.mesh)
        feats.append(np.asarray(jax.device_get(self._embed(params, batch)), np.float64))
        # The probe's targets are host data: the same rows, gathered over processes by the batch layout.
        ys.append(np.asarray(local["label"] if self.target == "label" else local["targets"]))
        weights.append(np.asarray(local["weight"]))
    x, y, w = np.concatenate(feats), np.concatenate(ys), np.concatenate(weights)
    keep = w > 0
    if self.target == "label":
      keep &= y >= 0
      return x[keep], y[keep].astype(np.int64)
    y = y[:, list(self.target_indices)]
    keep &= np.isfinite(y).all(axis=1)
    return x[keep], y[keep]

  def run(self, params, max_batches: int = 0) -> dict[str, float]:
    del max_batches  # a probe needs every clip of both sets
    x_fit, y_fit = self.features(params, self.fit_spec)
    x_val, y_val = self.features(params, self.spec)
    if not len(x_fit) or not len(x_val):
      raise ValueError(f"config.evals.{self.name}: no labelled clips to fit ({len(x_fit)}) or score "
                       f"({len(x_val)}) the probe")
    mean, std = x_fit.mean(axis=0), np.maximum(x_fit.std(axis=0), 1e-6)
    x_fit, x_val = (x_fit - mean) / std, (x_val - mean) / std
    out = {"fit_clips": float(len(x_fit)), "clips": float(len(x_val))}
    if self.target == "label":
      num_classes = int(max(y_fit.max(), y_val.max()) + 1)
      w, b = fit_logistic(x_fit, y_fit, num_classes, c=float(self.config.get("C", 1.0)))
      logits = x_val @ w + b
      confusion = metrics.confusion_metrics(num_classes).single_from_model_output(
          logits=jnp.asarray(logits, jnp.float32), labels=jnp.asarray(y_val, jnp.int32))
      out.update({k: float(v) for k, v in confusion.compute().items()})
    else:
      w, b = fit_ridge(x_fit, y_fit, alpha=float(self.config.get("alpha", 1.0)))
      ccc = metrics.CCC.for_targets(self.target_names).from_model_output(
          predictions=jnp.asarray(x_val @ w + b, jnp.float32), targets=jnp.asarray(y_val, jnp.float32))
      named = {k: float(v) for k, v in ccc.compute_named().items()}
      out.update(named)
      out["ccc_mean"] = float(np.mean(list(named.values())))
    return out
