"""Span masking statistics over many draws, and the masked L1 loss vs numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from avt_jax import masking


def _draws(lengths, t, n_draws, **kw):
  mask = jnp.asarray(np.arange(t)[None, :] < np.asarray(lengths)[:, None])
  plans = jax.jit(jax.vmap(lambda k: masking.span_mask_plan(k, mask, **kw)))(
      jax.random.split(jax.random.key(0), n_draws))
  return np.asarray(mask), jax.tree.map(np.asarray, plans)


def _runs(row):
  """Lengths of runs of True in a 1-D bool array."""
  out, n = [], 0
  for v in row:
    if v:
      n += 1
    elif n:
      out.append(n)
      n = 0
  if n:
    out.append(n)
  return out


def test_masking_statistics_over_many_draws():
  lengths = [100, 60, 37, 3, 1]
  t = 100
  mask, plan = _draws(lengths, t, 2000)
  sel = plan.selected                                         # [D, B, T]
  assert not (sel & ~mask[None]).any(), "padding must never be selected"
  for i, n in enumerate(lengths):
    counts = sel[:, i].sum(axis=1)
    starts = math.ceil(0.05 * n)
    assert counts.max() <= starts * 3                         # at most ceil(5% L) spans of 3 frames
    assert counts.min() >= min(3, n)                          # at least one whole span (or the whole clip)
    if n >= 60:
      # Overlaps are rare: the mean is close to 15% of the frames.
      assert 0.13 * n <= counts.mean() <= 0.15 * n
      runs = [r for d in range(200) for r in _runs(sel[d, i])]
      assert all(r % 3 == 0 or r > 3 for r in runs) and np.mean(np.asarray(runs) == 3) > 0.8
  # Starts are uniform: each valid frame of the length-100 clip is covered with similar frequency
  # (edges lower, since a span must fit).
  cover = sel[:, 0].mean(axis=0)
  assert 0.1 < cover[2:98].min() and cover[2:98].max() < 0.2
  # 80/10/10 split of the actions over selected frames.
  acts = plan.action[sel]
  frac = np.bincount(acts, minlength=3) / acts.size
  np.testing.assert_allclose(frac, [0.8, 0.1, 0.1], atol=0.01)
  # Random replacements come from another clip, at one of its valid frames.
  b_idx = np.broadcast_to(np.arange(len(lengths))[None, :, None], sel.shape)
  assert (plan.source_b != b_idx).all()
  src_len = np.asarray(lengths)[plan.source_b]
  assert (plan.source_t < src_len).all() and (plan.source_t >= 0).all()


def test_same_positions_and_actions_in_both_modalities():
  rng = np.random.default_rng(0)
  b, t = 4, 40
  batch = {"audio": jnp.asarray(rng.normal(size=(b, t, 5)) + 10.0, jnp.float32),
           "visual": jnp.asarray(rng.integers(1, 255, size=(b, t, 2, 3, 3, 3)), jnp.uint8),
           "mask": jnp.asarray(np.arange(t)[None] < np.array([40, 30, 20, 10])[:, None])}
  masked, plan = masking.mask_batch(jax.random.key(5), batch, ratio=0.2)
  sel, act = np.asarray(plan.selected), np.asarray(plan.action)
  a0, a1 = np.asarray(batch["audio"]), np.asarray(masked["audio"])
  v0, v1 = np.asarray(batch["visual"]), np.asarray(masked["visual"])
  zero_a = (a1 == 0).all(axis=-1)
  zero_v = (v1 == 0).reshape(b, t, -1).all(axis=-1)
  np.testing.assert_array_equal(zero_a, sel & (act == masking.ZERO))
  np.testing.assert_array_equal(zero_v, zero_a)
  changed_a = (a1 != a0).any(axis=-1)
  keep = sel & (act == masking.KEEP)
  assert not changed_a[keep].any() and not changed_a[~sel].any()
  rnd = sel & (act == masking.RANDOM)
  for bi, ti in zip(*np.nonzero(rnd)):
    sb, st = plan.source_b[bi, ti], plan.source_t[bi, ti]
    np.testing.assert_array_equal(a1[bi, ti], a0[sb, st])
    np.testing.assert_array_equal(v1[bi, ti], v0[sb, st])


def test_configurable_ratio_and_span():
  mask, plan = _draws([50], 50, 500, ratio=0.1, span=5, probs=(1.0, 0.0, 0.0))
  counts = plan.selected[:, 0].sum(axis=1)
  assert counts.max() <= 5 * 5 and counts.min() >= 5
  assert (plan.action[plan.selected] == masking.ZERO).all()


def test_masked_l1_matches_numpy():
  rng = np.random.default_rng(1)
  pred = rng.normal(size=(3, 6, 4)).astype(np.float32)
  target = rng.normal(size=(3, 6, 4)).astype(np.float32)
  sel = rng.random((3, 6)) < 0.4
  sel[0, 0] = True
  weight = np.array([1.0, 0.0, 1.0], np.float32)
  loss, count = masking.masked_l1(pred, target, sel, weight)
  keep = sel & (weight[:, None] > 0)
  want = np.abs(pred - target)[keep].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert int(count) == keep.sum()
  loss0, _ = masking.masked_l1(pred, target, np.zeros((3, 6), bool))
  assert float(loss0) == 0.0


def test_zeroed_frame_l1_matches_a_loop_over_frames():
  """The gate's sums (model and the past-mean / clip-mean predictors) against a frame-by-frame computation."""
  rng = np.random.default_rng(3)
  b, t, da, dv = 3, 7, 4, 2
  lengths = np.array([7, 5, 3])
  mask = np.arange(t)[None, :] < lengths[:, None]
  selected = (rng.random((b, t)) < 0.5) & mask
  selected[2, :] = [True, False, True, False, False, False, False]   # t=0 zeroed: no earlier visible frame
  action = rng.integers(0, 3, size=(b, t)).astype(np.int32)
  action[2, 0] = masking.ZERO
  plan = masking.MaskPlan(jnp.asarray(selected), jnp.asarray(action), jnp.zeros((b, t), jnp.int32),
                          jnp.zeros((b, t), jnp.int32))
  batch = {"mask": jnp.asarray(mask), "weight": jnp.asarray([1.0, 1.0, 1.0], jnp.float32),
           "audio_target": jnp.asarray(rng.normal(size=(b, t, da)), jnp.float32),
           "visual_target": jnp.asarray(rng.normal(size=(b, t, dv, 1)), jnp.float32)}
  outputs = {"recon_audio": jnp.asarray(rng.normal(size=(b, t, da)), jnp.float32),
             "recon_visual": jnp.asarray(rng.normal(size=(b, t, dv, 1)), jnp.float32)}
  got = jax.tree.map(float, masking.zeroed_frame_l1(outputs, batch, plan))

  want = {"model": 0.0, "past_mean": 0.0, "clip_mean": 0.0, "frames": 0.0}
  for i in range(b):
    visible = [s for s in range(t) if mask[i, s] and not (selected[i, s] and action[i, s] != masking.KEEP)]
    for s in range(t):
      if not (selected[i, s] and action[i, s] == masking.ZERO):
        continue
      want["frames"] += 1
      for m in ("audio", "visual"):
        y = np.asarray(batch[f"{m}_target"][i]).reshape(t, -1)
        clip = y[visible].mean(0)
        earlier = [v for v in visible if v < s]
        past = y[earlier].mean(0) if earlier else clip
        for name, guess in (("model", np.asarray(outputs[f"recon_{m}"][i, s]).reshape(-1)), ("past_mean", past),
                            ("clip_mean", clip)):
          want[name] += np.abs(guess - y[s]).mean()
  assert want["frames"] == got["frames"] > 0
  for k in ("model", "past_mean", "clip_mean"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5)
