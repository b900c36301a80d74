"""Tests for avt_jax.optim against hand-written numpy updates and hand-computed schedules."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from avt_jax import optim


def _params():
  rng = np.random.default_rng(0)
  return {"big": rng.normal(size=(3, 4)).astype(np.float32), "small": rng.normal(size=(5,)).astype(np.float32)}


def _grad_sequence():
  """Five steps of gradients for `_params`; the tensors' norms differ so the clips act differently."""
  rng = np.random.default_rng(1)
  scales = [(3.0, 0.05), (0.1, 0.02), (0.4, 0.5), (0.02, 0.01), (2.0, 2.0)]  # (big, small) tensor norms.
  seq = []
  for big, small in scales:
    g_big = rng.normal(size=(3, 4))
    g_small = rng.normal(size=(5,))
    seq.append({"big": (g_big * big / np.linalg.norm(g_big)).astype(np.float32),
                "small": (g_small * small / np.linalg.norm(g_small)).astype(np.float32)})
  return seq


def _numpy_bert_adam(params, grads_seq, lr_fn, b1, b2, eps, wd, max_grad_norm, per_tensor_clip):
  """Independent float64 implementation of the release's update, returning the parameters after each step."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(val) for k, val in p.items()}
  history = []
  for step, grads in enumerate(grads_seq):
    g = {k: val.astype(np.float64) for k, val in grads.items()}
    if max_grad_norm:
      total = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
      coef = max_grad_norm / (total + 1e-6)
      if coef < 1:
        g = {k: x * coef for k, x in g.items()}
    for k in p:
      if per_tensor_clip:
        norm = float(np.linalg.norm(g[k]))
        coef = per_tensor_clip / (norm + 1e-6)
        if coef < 1:
          g[k] = g[k] * coef
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] * g[k]
      update = m[k] / (np.sqrt(v[k]) + eps) + wd * p[k]
      p[k] = p[k] - lr_fn(step) * update
    history.append({k: x.copy() for k, x in p.items()})
  return history


def _run(tx, params, grads_seq):
  params = jax.tree_util.tree_map(jnp.asarray, params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for grads in grads_seq:
    params, state = step(params, state, grads)
    history.append(jax.tree_util.tree_map(np.asarray, params))
  return history, state


@pytest.mark.parametrize("max_grad_norm,per_tensor_clip", [(1.0, 1.0), (1.0, 0.3), (None, 1.0)])
def test_bert_adam_matches_numpy(max_grad_norm, per_tensor_clip):
  grads_seq = _grad_sequence()
  global_norms = [math.sqrt(sum(float(np.sum(np.square(g))) for g in gs.values())) for gs in grads_seq]
  assert global_norms[0] > 1 and global_norms[4] > 1 and global_norms[1] < 1  # Global clip on and off.
  lr_fn = lambda step: 0.01 * (1.0 - 0.1 * step)  # pylint: disable=unnecessary-lambda-assignment
  tx = optim.bert_adam(lr_fn, weight_decay=0.01, max_grad_norm=max_grad_norm, per_tensor_clip=per_tensor_clip)
  got, _ = _run(tx, _params(), grads_seq)
  want = _numpy_bert_adam(_params(), grads_seq, lr_fn, 0.9, 0.999, 1e-6, 0.01, max_grad_norm, per_tensor_clip)
  for step, (g, w) in enumerate(zip(got, want)):
    for k in w:
      np.testing.assert_allclose(g[k], w[k], rtol=0, atol=2e-6, err_msg=f"step {step} {k}")


def test_bert_adam_clips_change_the_result():
  # Guards the reference test above: the per-tensor clip at 0.3 and the global clip must both alter the updates.
  grads_seq = _grad_sequence()
  base = _numpy_bert_adam(_params(), grads_seq, lambda s: 0.01, 0.9, 0.999, 1e-6, 0.01, None, None)[-1]
  for clips in [(1.0, None), (None, 0.3), (1.0, 0.3)]:
    other = _numpy_bert_adam(_params(), grads_seq, lambda s: 0.01, 0.9, 0.999, 1e-6, 0.01, *clips)[-1]
    assert np.abs(other["big"] - base["big"]).max() > 1e-4, clips


def test_bert_adam_first_step_has_no_bias_correction():
  # One step from zero moments, no clipping active: update = lr * ((1-b1) g / (sqrt(1-b2) |g| + eps) + wd p).
  # That is ~3.16 lr per element; with bias correction it would be ~1 lr (lr * (sign(g) + wd p)).
  p = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
  g = {"w": np.array([0.01, -0.02, 0.003], np.float32)}
  lr, wd = 0.1, 0.01
  (got,), _ = _run(optim.bert_adam(lr, weight_decay=wd), p, [g])
  gw = g["w"].astype(np.float64)
  want = p["w"] - lr * (0.1 * gw / (math.sqrt(0.001) * np.abs(gw) + 1e-6) + wd * p["w"])
  np.testing.assert_allclose(got["w"], want, atol=1e-6)
  assert np.all(np.abs(got["w"] - p["w"]) > 2.5 * lr)


def test_warmup_linear_decay_values():
  sched = optim.warmup_linear_decay(2.0, total_steps=100, warmup_fraction=0.1)
  for step, want in [(0, 0.0), (5, 1.0), (10, 2.0), (55, 1.0), (91, 0.2), (100, 0.0), (150, 0.0)]:
    assert float(sched(step)) == pytest.approx(want, abs=1e-6), step
  # Fractional warm-up (2.5 steps) and no warm-up.
  sched = optim.warmup_linear_decay(1.0, total_steps=25, warmup_fraction=0.1)
  assert float(sched(1)) == pytest.approx(0.4, abs=1e-6)
  assert float(sched(3)) == pytest.approx(22 / 22.5, abs=1e-6)
  sched = optim.warmup_linear_decay(1.0, total_steps=10, warmup_fraction=0.0)
  assert float(sched(0)) == pytest.approx(1.0) and float(sched(4)) == pytest.approx(0.6, abs=1e-6)
  with pytest.raises(ValueError, match="warmup_fraction"):
    optim.warmup_linear_decay(1.0, 10, 1.0)


def test_warmup_cosine_values():
  sched = optim.warmup_cosine(1.0, total_steps=110, warmup_steps=10, end_value=0.1)
  quarter = 0.1 + 0.45 * (1 + math.cos(math.pi / 4))  # A quarter of the way through the cosine part.
  for step, want in [(0, 0.0), (5, 0.5), (10, 1.0), (35, quarter), (60, 0.1 + 0.9 * 0.5), (110, 0.1), (200, 0.1)]:
    assert float(sched(step)) == pytest.approx(want, abs=1e-6), step


def _config(**overrides):
  base = dict(name="bert_adam", lr=0.01, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, max_grad_norm=1.0,
              per_tensor_clip=1.0, schedule="constant", warmup_fraction=0.1, total_steps=100, param_groups=[])
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def _model_params():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(4, 4)).astype(np.float32)
  return {"params": {"frontend": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
                     "encoder": {"layer_0": {"kernel": w.copy()}},
                     "head": {"kernel": w.copy()}}}


def test_make_optimizer_schedules_match_helpers():
  for name in ("warmup_linear", "warmup_cosine"):
    _, sched = optim.make_optimizer(_config(schedule=name), _model_params())
    ref = (optim.warmup_linear_decay(0.01, 100, 0.1) if name == "warmup_linear"
           else optim.warmup_cosine(0.01, 100, 10))
    for step in (0, 3, 10, 40, 99):
      assert float(sched(step)) == pytest.approx(float(ref(step)), abs=1e-9)
  _, sched = optim.make_optimizer(_config(schedule="constant"), _model_params())
  assert float(sched(1234)) == pytest.approx(0.01)
  with pytest.raises(ValueError, match="unknown schedule"):
    optim.make_optimizer(_config(schedule="step"), _model_params())
  with pytest.raises(ValueError, match="unknown name"):
    optim.make_optimizer(_config(name="sgd"), _model_params())


def test_param_groups_freeze_and_scale():
  config = _config(param_groups=[{"pattern": r"^params/frontend/", "lr_multiplier": 0.0},
                                 {"pattern": r"encoder", "lr_multiplier": 0.1}], weight_decay=0.01)
  params = _model_params()
  tx, _ = optim.make_optimizer(config, params)
  rng = np.random.default_rng(3)
  g = rng.normal(size=(4, 4)).astype(np.float32) * 0.05
  grads_seq = [{"params": {"frontend": {"kernel": rng.normal(size=(3, 4)).astype(np.float32) * 100.0},
                           "encoder": {"layer_0": {"kernel": g}}, "head": {"kernel": g}}} for _ in range(3)]
  history, state = _run(tx, params, grads_seq)
  p0 = params["params"]
  for p in history:
    np.testing.assert_array_equal(p["params"]["frontend"]["kernel"], p0["frontend"]["kernel"])  # Bit-identical.
  first = history[0]["params"]
  enc_step = first["encoder"]["layer_0"]["kernel"] - p0["encoder"]["layer_0"]["kernel"]
  head_step = first["head"]["kernel"] - p0["head"]["kernel"]
  assert np.abs(head_step).max() > 1e-3
  np.testing.assert_allclose(enc_step, 0.1 * head_step, rtol=1e-4, atol=1e-8)

  # The frozen tensor's huge gradient is left out of the global norm: the head moves exactly as in a run where the
  # frozen gradient is zero (with it included, the global clip would shrink the head's gradient ~1000x).
  zero_frozen = [jax.tree_util.tree_map(lambda x: x, gs) for gs in grads_seq]
  for gs in zero_frozen:
    gs["params"]["frontend"]["kernel"] = np.zeros((3, 4), np.float32)
  history_zero, _ = _run(tx, params, zero_frozen)
  np.testing.assert_array_equal(history[-1]["params"]["head"]["kernel"], history_zero[-1]["params"]["head"]["kernel"])

  # The frozen tensor's moments stay exactly zero; the head's do not.
  moments = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, optim.ScaleByBertAdamState))
             if isinstance(s, optim.ScaleByBertAdamState)]
  assert len(moments) == 1
  for tree in (moments[0].mu, moments[0].nu):
    assert not np.any(np.asarray(tree["params"]["frontend"]["kernel"]))
    assert np.any(np.asarray(tree["params"]["head"]["kernel"]))


@pytest.mark.parametrize("name", ["bert_adam", "adamw"])
def test_state_maps_onto_parameter_tree(name):
  # The state holds plain copies of the parameter tree, so per-parameter specs (e.g. shardings) map onto it.
  config = _config(name=name, param_groups=[{"pattern": "frontend", "lr_multiplier": 0.0},
                                            {"pattern": "encoder", "lr_multiplier": 0.5}])
  params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _model_params())
  tx, _ = optim.make_optimizer(config, params)
  state = jax.eval_shape(tx.init, params)
  names = jax.tree_util.tree_map_with_path(lambda p, _: optim.path_name(p), params)
  mapped = optim.map_state_params(tx, lambda _, n: n, state, names, non_params=lambda _: None)
  leaves = jax.tree_util.tree_leaves(mapped)
  # Two moments per trainable parameter; none for the frozen frontend (it has no optimizer state at all).
  assert leaves.count("params/frontend/kernel") == 0 and leaves.count("params/head/kernel") == 2
  moment_elements = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.shape)  # step counters are scalars
  trainable = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                  if "frontend" not in optim.path_name(p))
  assert moment_elements == 2 * trainable


def test_param_groups_bad_config():
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.make_optimizer(_config(param_groups=[{"pattern": "decoder", "lr_multiplier": 0.0}]), _model_params())
  with pytest.raises(ValueError, match="lr_multiplier"):
    optim.make_optimizer(_config(param_groups=[{"pattern": "head", "lr_multiplier": -1.0}]), _model_params())
  with pytest.raises(ValueError, match="needs 'pattern'"):
    optim.make_optimizer(_config(param_groups=[{"regex": "head"}]), _model_params())


def test_make_optimizer_bert_adam_matches_numpy():
  # The configured optimizer without groups is the release's update with the warm-up/linear-decay schedule.
  config = _config(schedule="warmup_linear", total_steps=10, warmup_fraction=0.2, weight_decay=0.01)
  params = _params()
  tx, sched = optim.make_optimizer(config, params)
  got, _ = _run(tx, params, _grad_sequence())
  lr_fn = lambda s: 0.01 * min(s / 2, (10 - s) / 8)  # pylint: disable=unnecessary-lambda-assignment
  want = _numpy_bert_adam(params, _grad_sequence(), lr_fn, 0.9, 0.999, 1e-6, 0.01, 1.0, 1.0)
  for k in want[-1]:
    np.testing.assert_allclose(got[-1][k], want[-1][k], atol=2e-6)
  assert float(sched(1)) == pytest.approx(0.005)


def test_adamw_path():
  config = _config(name="adamw", schedule="warmup_cosine", total_steps=20, weight_decay=0.05,
                   param_groups=[{"pattern": "frontend", "lr_multiplier": 0.0}])
  params = _model_params()
  tx, sched = optim.make_optimizer(config, params)
  rng = np.random.default_rng(4)
  # Gradient norms well below 1, so the global clip does not act; compare with optax.adamw on the trainable part.
  grads_seq = [jax.tree_util.tree_map(lambda x: (rng.normal(size=x.shape) * 0.01).astype(np.float32), params)
               for _ in range(4)]
  got, _ = _run(tx, params, grads_seq)
  def trainable(tree):
    return {"encoder": tree["params"]["encoder"], "head": tree["params"]["head"]}

  want, _ = _run(optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.05), trainable(params),
                 [trainable(gs) for gs in grads_seq])
  for g, w in zip(got, want):
    for a, b in zip(jax.tree_util.tree_leaves(trainable(g)), jax.tree_util.tree_leaves(w)):
      np.testing.assert_allclose(a, b, atol=1e-7)
  np.testing.assert_array_equal(got[-1]["params"]["frontend"]["kernel"], params["params"]["frontend"]["kernel"])
  assert np.abs(got[-1]["params"]["head"]["kernel"] - params["params"]["head"]["kernel"]).max() > 1e-5
