"""Evaluators: the linear probe's fits equal scikit-learn's, and a probe watching a pretraining run reports what
scikit-learn gives on the same frozen features."""

import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from avt_jax import config_lib, evaluators, input_pipeline, sharding, train
from avt_jax import setup as setup_lib
from avt_jax.evaluators import linear_probe

REPO = config_lib.REPO
CACHE = os.path.join(os.environ.get("PYTEST_XLA_CACHE", "/tmp"), f"avt_jax_test_xla_{os.getuid()}")


def _blobs(rng, n=90, d=5, k=3):
  y = rng.integers(0, k, n)
  x = rng.normal(size=(n, d)) + 1.5 * np.eye(k, d)[y]
  return x, y


@pytest.mark.parametrize("c", [0.05, 1.0, 20.0])
def test_logistic_probe_equals_sklearn(c):
  x, y = _blobs(np.random.default_rng(0))
  w, b = linear_probe.fit_logistic(x, y, 3, c=c)
  ref = LogisticRegression(C=c, tol=1e-12, max_iter=10000).fit(x, y)
  np.testing.assert_allclose(linear_probe._softmax(x @ w + b), ref.predict_proba(x), atol=1e-6)
  # The penalised weights are unique (only the intercepts share a free common shift).
  np.testing.assert_allclose(w.T - w.T.mean(axis=0), ref.coef_ - ref.coef_.mean(axis=0), atol=1e-5)


def test_ridge_probe_equals_sklearn():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 4)) + 3.0
  y = x @ rng.normal(size=(4, 2)) + rng.normal(size=(50, 2)) + 7.0
  w, b = linear_probe.fit_ridge(x, y, alpha=2.5)
  ref = Ridge(alpha=2.5).fit(x, y)
  np.testing.assert_allclose(w.T, ref.coef_, atol=1e-10)
  np.testing.assert_allclose(b, ref.intercept_, atol=1e-10)


def _fold(split):
  spec = importlib.util.spec_from_file_location("finetune_synth", os.path.join(REPO, "configs", "finetune_synth.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  flt = module.fold_filters(0)[f"{split}_filter"]
  return {"path": config_lib.SYNTH, **{k: {f: list(v) for f, v in w.items()} for k, w in flt.items()}}


def test_probe_during_pretraining_reports_sklearn_on_the_frozen_features(tmp_path):
  spec = importlib.util.spec_from_file_location("pretrain_synth", os.path.join(REPO, "configs", "pretrain_synth.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config("tiny")
  cfg.compilation_cache_dir = CACHE
  cfg.eval_every_steps = 2
  cfg.checkpoint_every_steps = 0  # one checkpoint, at the end (writes from 8 fake devices are slow)
  cfg.eval_batch_size = 40
  cfg.evals.probe = dict(type="linear_probe", fit=_fold("train"), data=_fold("eval"), target="label", when="during")
  wd = str(tmp_path / "pre")
  result = train.run(cfg, wd)
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  probe_rows = [r for r in rows if r["split"] == "probe"]
  assert [r["step"] for r in probe_rows] == [2, 4]
  assert {"accuracy", "uar", "macro_f1", "clips", "fit_clips"} <= set(probe_rows[-1])

  # By hand at the last step: the encoder's features of the same clips, masked mean over frames, standardised on the
  # fit clips, scikit-learn's logistic regression.
  config = ml_collections.ConfigDict(config_lib.from_json(json.load(open(os.path.join(wd, "config.json")))))
  sources, geometry = input_pipeline.open_sources(config_lib.SYNTH)
  s = setup_lib.build(config, geometry, optimizer=False, mesh=sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  params = s.restore_params(os.path.join(wd, "checkpoints", "4"))
  apply = jax.jit(lambda p, b: s.task.apply(p, b, None, False)["features"])

  def features(split):
    xs, ys = [], []
    for batch in input_pipeline.make_dataset(_fold(split), split="eval", global_batch_size=40, seed=0,
                                             max_tokens=config.data.max_tokens):
      keep = batch["weight"] > 0
      h = np.asarray(apply(params, {k: batch[k] for k in s.task.batch_keys}), np.float64)
      m = batch["mask"][..., None]
      xs.append(((h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1))[keep])
      ys.append(batch["label"][keep])
    return np.concatenate(xs), np.concatenate(ys)

  x_fit, y_fit = features("train")
  x_val, y_val = features("eval")
  mean, std = x_fit.mean(axis=0), x_fit.std(axis=0)
  ref = LogisticRegression(C=1.0, tol=1e-12, max_iter=10000).fit((x_fit - mean) / std, y_fit)
  accuracy = float((ref.predict((x_val - mean) / std) == y_val).mean())
  assert probe_rows[-1]["fit_clips"] == len(y_fit) and probe_rows[-1]["clips"] == len(y_val)
  assert probe_rows[-1]["accuracy"] == pytest.approx(accuracy, abs=1.0 / len(y_val) + 1e-9)
  assert result["probe/accuracy"] == probe_rows[-1]["accuracy"]


def test_probe_config_errors():
  cfg = config_lib.base_config("pretrain")
  cfg.evals.probe = dict(type="linear_probe", data="eval", target="label")
  cfg.evals.bad = dict(type="no_such_evaluator", data="eval")
  assert set(evaluators.configs(cfg)) == {"eval", "probe", "bad"}
  cfg.data.eval = ""
  assert set(evaluators.configs(cfg)) == set()  # every evaluator of an empty split is left out
  cfg.evals.probe.select = True
  with pytest.raises(ValueError, match=r"\['eval', 'probe'\] all have select=True"):
    evaluators.configs(cfg)
