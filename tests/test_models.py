"""Model tests: parameter counts, attention vs numpy, masking invariances, readout, bf16 vs fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from avt_jax.models import avt, layers


def _count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _feature_batch(rng, b=2, t=12, da=24, dv=7, lengths=None):
  a = rng.normal(size=(b, t, da)).astype(np.float32)
  v = rng.normal(size=(b, t, dv)).astype(np.float32)
  lengths = lengths or [t] * b
  mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
  a[~mask] = 0
  v[~mask] = 0
  return {"audio": jnp.asarray(a), "visual": jnp.asarray(v), "mask": jnp.asarray(mask)}


def _tiny(**kw):
  base = dict(audio_frontend=dict(type="features"), visual_frontend=dict(type="features"),
              audio_target_dim=24, visual_target_dim=7)
  base.update(kw)
  return avt.model_config("tiny", **base)


@pytest.mark.parametrize("size,expected", [("base", 16_767_600), ("large", 85_300_608)])
def test_encoder_parameter_count_matches_release(size, expected):
  # Release counts (PAPER.md): base 16.77M / large 85.30M in the encoder path (projections + 3 encoders).
  cfg = avt.model_config(size)
  batch = {"audio": jnp.zeros((1, 4, 512)), "visual": jnp.zeros((1, 4, 17)), "mask": jnp.ones((1, 4), bool)}
  shapes = jax.eval_shape(lambda: avt.PretrainModel(cfg).init(jax.random.key(0), batch))
  params = nn.meta.unbox(shapes["params"])
  assert _count(params["encoder"]) == expected
  # Heads: two residual MLPs (2d x 2d twice) + output layers; the release's unused proj1/proj2 are not built.
  e = 2 * cfg.width
  heads = 2 * 2 * (e * e + e) + (512 * e + 512) + (17 * e + 17)
  assert _count(params) == expected + heads


def _numpy_mha(p, xq, xkv, mask, num_heads):
  """Independent multi-head attention in numpy from the module's parameter arrays."""
  e = xq.shape[-1]
  h = e // num_heads
  wq = np.asarray(p["query"]["kernel"]).reshape(e, e)
  wk = np.asarray(p["key"]["kernel"]).reshape(e, e)
  wv = np.asarray(p["value"]["kernel"]).reshape(e, e)
  bq, bk, bv = (np.asarray(p[n]["bias"]).reshape(e) for n in ("query", "key", "value"))
  wo = np.asarray(p["out"]["kernel"]).reshape(e, e)
  bo = np.asarray(p["out"]["bias"])
  q = (xq @ wq + bq) * h ** -0.5
  k = xkv @ wk + bk
  v = xkv @ wv + bv
  b, t, _ = xq.shape
  s = xkv.shape[1]
  out = np.zeros((b, t, e))
  for bi in range(b):
    for n in range(num_heads):
      sl = slice(n * h, (n + 1) * h)
      logits = q[bi, :, sl] @ k[bi, :, sl].T
      logits = np.where(mask[bi], logits, -np.inf)
      w = np.exp(logits - logits.max(axis=1, keepdims=True))
      w /= w.sum(axis=1, keepdims=True)
      out[bi, :, sl] = w @ v[bi, :, sl]
  return out @ wo + bo


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_numpy_with_causal_and_padding_masks(causal):
  rng = np.random.default_rng(0)
  b, t, e, n = 3, 7, 16, 4
  xq = rng.normal(size=(b, t, e)).astype(np.float32)
  xkv = rng.normal(size=(b, t, e)).astype(np.float32)
  lengths = np.array([7, 4, 1])
  valid = np.arange(t)[None] < lengths[:, None]
  mask = layers.attention_mask(None, jnp.asarray(valid), t, t, causal)
  mod = layers.MultiHeadAttention(num_heads=n)
  params = nn.meta.unbox(mod.init(jax.random.key(1), xq, xkv, xkv, mask, True))["params"]
  got = np.asarray(mod.apply({"params": params}, xq, xkv, xkv, mask, True))
  # Reference mask built by hand: keys valid, and (causal) key index <= query index.
  ref_mask = np.broadcast_to(valid[:, None, :], (b, t, t)).copy()
  if causal:
    ref_mask &= np.tril(np.ones((t, t), bool))[None]
  want = _numpy_mha(params, xq.astype(np.float64), xkv.astype(np.float64), ref_mask, n)
  # Compare on valid query rows (padded rows are masked downstream).
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-5)


def test_attention_dropout_path_matches_fast_path_when_deterministic():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)).astype(np.float32))
  mask = layers.attention_mask(None, jnp.ones((2, 5), bool), 5, 5, True)
  mod = layers.MultiHeadAttention(num_heads=2)
  params = mod.init(jax.random.key(0), x, x, x, mask, True)
  q = jnp.asarray(rng.normal(size=(2, 5, 2, 4)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(2, 5, 2, 4)).astype(np.float32))
  v = jnp.asarray(rng.normal(size=(2, 5, 2, 4)).astype(np.float32))
  slow = layers.reference_attention(q, k, v, mask)
  fast = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0)
  np.testing.assert_allclose(slow, fast, rtol=1e-5, atol=1e-6)
  assert params


def test_sinusoidal_table_by_hand():
  tab = layers.sinusoidal_table(4, 6)  # half = 3, frequencies exp(-k ln(1e4)/2) = 1, 1e-2, 1e-4
  assert np.all(tab[0] == 0)
  pos = 2.0
  want = [np.sin(pos), np.sin(pos * 1e-2), np.sin(pos * 1e-4), np.cos(pos), np.cos(pos * 1e-2), np.cos(pos * 1e-4)]
  np.testing.assert_allclose(tab[2], want, rtol=1e-6)
  assert layers.sinusoidal_table(3, 5).shape == (3, 5)


def _init_apply(cfg, batch, task=None):
  model = avt.PretrainModel(cfg) if task is None else avt.FinetuneModel(cfg, num_outputs=cfg.num_classes if task == "classification" else cfg.num_targets)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  return model, params


@pytest.mark.parametrize("causal", [True, False])
def test_padded_frames_do_not_change_valid_outputs(causal):
  rng = np.random.default_rng(2)
  batch = _feature_batch(rng, lengths=[12, 8])
  cfg = _tiny(causal=causal)
  model, params = _init_apply(cfg, batch)
  out1 = model.apply({"params": params}, batch)
  noisy = dict(batch)
  pad = ~np.asarray(batch["mask"])
  noisy["audio"] = jnp.where(pad[..., None], 100.0, batch["audio"])
  noisy["visual"] = jnp.where(pad[..., None], -50.0, batch["visual"])
  out2 = model.apply({"params": params}, noisy)
  valid = np.asarray(batch["mask"])
  for key in ("features", "recon_audio", "recon_visual"):
    np.testing.assert_allclose(np.asarray(out1[key])[valid], np.asarray(out2[key])[valid], rtol=1e-5, atol=1e-5)


def test_causal_outputs_ignore_future_frames_and_bidirectional_do_not():
  rng = np.random.default_rng(3)
  batch = _feature_batch(rng)
  cut = 6
  changed = dict(batch)
  changed["audio"] = batch["audio"].at[:, cut:].set(3.0)
  changed["visual"] = batch["visual"].at[:, cut:].set(-3.0)
  model, params = _init_apply(_tiny(causal=True), batch)
  a = np.asarray(model.apply({"params": params}, batch)["features"])
  b = np.asarray(model.apply({"params": params}, changed)["features"])
  np.testing.assert_allclose(a[:, :cut], b[:, :cut], rtol=1e-5, atol=1e-5)
  assert np.abs(a[:, cut:] - b[:, cut:]).max() > 1e-3
  model, params = _init_apply(_tiny(causal=False), batch)
  a = np.asarray(model.apply({"params": params}, batch)["features"])
  b = np.asarray(model.apply({"params": params}, changed)["features"])
  assert np.abs(a[:, :cut] - b[:, :cut]).max() > 1e-3


def test_readout_last_valid_frame_and_masked_mean():
  h = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(avt.readout(h, mask, "last"), np.stack([np.asarray(h)[0, 2], np.asarray(h)[1, 0]]))
  want = np.stack([np.asarray(h)[0, :3].mean(0), np.asarray(h)[1, 0]])
  np.testing.assert_allclose(avt.readout(h, mask, "mean"), want)


@pytest.mark.parametrize("task,dim", [("classification", 6), ("regression", 2)])
def test_finetune_heads_shapes_and_padding_invariance(task, dim):
  rng = np.random.default_rng(4)
  batch = _feature_batch(rng, lengths=[12, 5])
  model, params = _init_apply(_tiny(readout="last"), batch, task)
  out = model.apply({"params": params}, batch)["output"]
  assert out.shape == (2, dim)
  noisy = dict(batch, audio=jnp.where(~batch["mask"][..., None], 9.0, batch["audio"]))
  np.testing.assert_allclose(out, model.apply({"params": params}, noisy)["output"], rtol=1e-5, atol=1e-5)
  assert set(params) == {"encoder", "head"}


def test_raw_frontends_shapes():
  rng = np.random.default_rng(5)
  b, t = 2, 3
  batch = {"audio": jnp.asarray(rng.normal(size=(b, t, 20, 16)).astype(np.float32)),
           "visual": jnp.asarray(rng.integers(0, 255, size=(b, t, 5, 16, 16, 3)).astype(np.uint8)),
           "mask": jnp.ones((b, t), bool)}
  cfg = avt.model_config("tiny", audio_frontend=dict(type="logmel", channels=(8, 8)),
                         visual_frontend=dict(type="face", channels=(4, 8)),
                         audio_target_dim=16, visual_target_dim=64)
  model, params = _init_apply(cfg, batch)
  out = model.apply({"params": params}, batch)
  assert out["recon_audio"].shape == (b, t, 16) and out["recon_visual"].shape == (b, t, 64)
  assert out["features"].shape == (b, t, 64)


def test_release_positions_switch_only_differs_where_channel0_is_zero():
  rng = np.random.default_rng(6)
  batch = _feature_batch(rng)
  model, params = _init_apply(_tiny(release_positions=True, padding_mask=False), batch)
  model_std, _ = _init_apply(_tiny(release_positions=False, padding_mask=False), batch)
  a = model.apply({"params": params}, batch)["features"]
  b = model_std.apply({"params": params}, batch)["features"]
  # No projected channel 0 is exactly zero on random inputs: both rules give every frame its position.
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_close_to_float32():
  from avt_jax import masking
  rng = np.random.default_rng(7)
  batch = _feature_batch(rng, b=4, t=16, lengths=[16, 12, 9, 16])
  batch["audio_target"] = batch["audio"]
  batch["visual_target"] = batch["visual"]
  cfg32 = avt.model_config("small", audio_frontend=dict(type="features"), visual_frontend=dict(type="features"),
                           audio_target_dim=24, visual_target_dim=7)
  cfg16 = avt.model_config("small", audio_frontend=dict(type="features"), visual_frontend=dict(type="features"),
                           audio_target_dim=24, visual_target_dim=7, dtype="bfloat16")
  model32, params = _init_apply(cfg32, batch)
  model16 = avt.PretrainModel(cfg16)
  masked, plan = masking.mask_batch(jax.random.key(3), batch)
  l32, _ = masking.pretrain_loss(model32.apply({"params": params}, masked), batch, plan)
  l16, _ = masking.pretrain_loss(model16.apply({"params": params}, masked), batch, plan)
  assert l16.dtype == jnp.float32
  # Documented tolerance: bf16 compute (8-bit mantissa) keeps the masked L1 within 2% of float32.
  assert abs(float(l16) - float(l32)) <= 0.02 * abs(float(l32))


def test_scanned_layers_with_remat_equal_the_layer_loop():
  rng = np.random.default_rng(8)
  batch = _feature_batch(rng, lengths=[12, 7])
  loop_model, loop_params = _init_apply(_tiny(num_layers=3), batch)
  scan_model = avt.PretrainModel(_tiny(num_layers=3, scan_layers=True, remat=True))
  scan_params = nn.meta.unbox(scan_model.init(jax.random.key(0), batch)["params"])
  assert scan_params["encoder"]["joint"]["layers"]["fc1"]["kernel"].shape[0] == 3
  for enc in ("cross_visual_audio", "cross_audio_visual", "joint"):
    tree = loop_params["encoder"][enc]
    layers = [tree[f"layer_{i}"] for i in range(3)]
    scan_params["encoder"][enc]["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    scan_params["encoder"][enc]["ln_final"] = tree["ln_final"]
  for key in ("audio_frontend", "visual_frontend"):
    scan_params["encoder"][key] = loop_params["encoder"][key]
  for key in ("recon_audio", "recon_visual"):
    scan_params[key] = loop_params[key]
  a = loop_model.apply({"params": loop_params}, batch)["recon_audio"]
  b = scan_model.apply({"params": scan_params}, batch)["recon_audio"]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fused_qkv_has_the_same_parameters_and_outputs_as_separate_projections():
  rng = np.random.default_rng(9)
  batch = _feature_batch(rng, lengths=[12, 7])
  model, params = _init_apply(_tiny(num_layers=2), batch)
  fused = avt.PretrainModel(_tiny(num_layers=2, fused_qkv=True))
  fused_params = nn.meta.unbox(fused.init(jax.random.key(0), batch)["params"])
  assert jax.tree.map(np.shape, fused_params) == jax.tree.map(np.shape, params)  # same names, shapes, layout
  for train in (False, True):  # with dropout: the same draws, as the random streams do not depend on it
    kw = dict(deterministic=not train, rngs={"dropout": jax.random.key(1)} if train else {})
    want = model.apply({"params": params}, batch, **kw)
    got = fused.apply({"params": params}, batch, **kw)
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_threefry2x32_in_elementwise_ops_is_jax_threefry():
  import jax.extend as jex  # pylint: disable=g-import-not-at-top
  key = jax.random.key_data(jax.random.key(42))
  counts = jnp.arange(2 * 1000, dtype=jnp.uint32)
  x0, x1 = layers.threefry2x32(key[0], key[1], counts[:1000], counts[1000:])
  np.testing.assert_array_equal(np.concatenate([x0, x1]), jex.random.threefry_2x32(key, counts))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_counter_dropout_masks_keep_the_rate_and_are_independent_between_elements(impl):
  keep = np.asarray(layers.dropout_keep(jax.random.key(3, impl=impl), 0.9, (40, 100, 250)))
  n = keep.size
  assert abs(keep.mean() - 0.9) < 4 * np.sqrt(0.9 * 0.1 / n)
  # Neighbours along every axis (the counter's low and high digits) are uncorrelated.
  for axis in range(3):
    a, b = np.moveaxis(keep, axis, 0)[:-1].ravel(), np.moveaxis(keep, axis, 0)[1:].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(a.size), axis
  again = np.asarray(layers.dropout_keep(jax.random.key(3, impl=impl), 0.9, (40, 100, 250)))
  other = np.asarray(layers.dropout_keep(jax.random.key(4, impl=impl), 0.9, (40, 100, 250)))
  np.testing.assert_array_equal(keep, again)
  assert abs(np.corrcoef(keep.ravel(), other.ravel())[0, 1]) < 4 / np.sqrt(n)


def test_dropout_masks_jax_draws_what_flax_dropout_draws():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 30, 16)), jnp.float32)
  rngs = {"dropout": jax.random.key(5)}
  want = nn.Dropout(0.25).apply({}, x, deterministic=False, rngs=rngs)
  got = layers.Dropout(0.25, "jax").apply({}, x, False, rngs=rngs)
  np.testing.assert_array_equal(got, want)
  counter = layers.Dropout(0.25).apply({}, x, False, rngs=rngs)
  kept = np.asarray(counter) != 0
  np.testing.assert_allclose(np.asarray(counter)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert 0.6 < kept.mean() < 0.9 and not np.array_equal(kept, np.asarray(want) != 0)
  np.testing.assert_array_equal(layers.Dropout(0.25).apply({}, x, True), x)
  np.testing.assert_array_equal(layers.Dropout(1.0).apply({}, x, False, rngs=rngs), np.zeros_like(x))
  with pytest.raises(ValueError, match="dropout_masks='philox'"):
    layers.Dropout(0.25, "philox").apply({}, x, False, rngs=rngs)


def test_model_dropout_masks_switch_changes_only_the_draws():
  rng = np.random.default_rng(10)
  batch = _feature_batch(rng, lengths=[12, 7])
  model, params = _init_apply(_tiny(num_layers=2), batch)
  old = avt.PretrainModel(_tiny(num_layers=2, dropout_masks="jax"))
  kw = dict(deterministic=False, rngs={"dropout": jax.random.key(1)})
  a, b = model.apply({"params": params}, batch, **kw), old.apply({"params": params}, batch, **kw)
  assert not np.allclose(a["recon_audio"], b["recon_audio"])
  for key in a:  # deterministic: no dropout, the same function
    np.testing.assert_array_equal(model.apply({"params": params}, batch)[key], old.apply({"params": params},
                                                                                        batch)[key])
