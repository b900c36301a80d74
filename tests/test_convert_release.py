"""Release weight import: names/shapes, a float64 numpy re-implementation of the release forward, errors, CLI.

The numpy reference below is written from PAPER.md's description of the release (fairseq-style attention with a
packed in_proj, pre-LN layers whose first LayerNorm also normalises the key/value stream, sqrt(E) input scaling,
1-based sinusoidal positions taken from the unscaled input's channel 0, final LayerNorm, residual-MLP heads) and
reads only the raw state_dict arrays.
"""

import hashlib
import json
import glob
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from avt_jax import checkpointing
from avt_jax import convert_release as cr
from avt_jax.models import avt, frontends, layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIXES = ("visual_cross_acoustic", "acoustic_cross_visual", "trans_mem")


# ----------------------------------------------------------------------------------------------------------------
# A release-format state_dict, generated from PAPER.md's list of names and shapes.
# ----------------------------------------------------------------------------------------------------------------

def make_release_state_dict(rng, d, num_layers, da=512, dv=17, extras=True):
  sd = {}

  def lin(name, out_dim, in_dim):
    sd[name + ".weight"] = rng.normal(size=(out_dim, in_dim)) / np.sqrt(in_dim)
    sd[name + ".bias"] = 0.1 * rng.normal(size=(out_dim,))

  def norm(name, dim):
    sd[name + ".weight"] = 1.0 + 0.1 * rng.normal(size=(dim,))
    sd[name + ".bias"] = 0.1 * rng.normal(size=(dim,))

  sd["proj_a.weight"] = rng.normal(size=(d, da, 1)) / np.sqrt(da)
  sd["proj_v.weight"] = rng.normal(size=(d, dv, 1)) / np.sqrt(dv)
  for prefix in PREFIXES:
    e = 2 * d if prefix == "trans_mem" else d
    for i in range(num_layers):
      p = f"{prefix}.layers.{i}."
      sd[p + "self_attn.in_proj_weight"] = rng.normal(size=(3 * e, e)) / np.sqrt(e)
      sd[p + "self_attn.in_proj_bias"] = 0.1 * rng.normal(size=(3 * e,))
      lin(p + "self_attn.out_proj", e, e)
      lin(p + "fc1", 4 * e, e)
      lin(p + "fc2", e, 4 * e)
      norm(p + "layer_norms.0", e)
      norm(p + "layer_norms.1", e)
    norm(f"{prefix}.layer_norm", e)
    if extras:
      sd[f"{prefix}.version"] = np.array([2.0])
      sd[f"{prefix}.embed_positions._float_tensor"] = np.zeros((1,))
  for m in ("a", "v"):
    lin(f"proj1_{m}", 2 * d, 2 * d)
    lin(f"proj2_{m}", 2 * d, 2 * d)
  lin("out_layer_a", da, 2 * d)
  lin("out_layer_v", dv, 2 * d)
  if extras:
    lin("proj1", 2 * d, 2 * d)
    lin("proj2", 2 * d, 2 * d)
  return {k: v.astype(np.float32) for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------------
# Independent float64 reference of the release forward (eval mode).
# ----------------------------------------------------------------------------------------------------------------

def np_layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def np_sinusoid(positions, dim):
  """Rows for integer positions (0 -> zeros): sine half then cosine half, freq exp(-k ln(1e4)/(half-1))."""
  half = dim // 2
  freq = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))
  ang = positions[..., None].astype(np.float64) * freq
  emb = np.concatenate([np.sin(ang), np.cos(ang)], axis=-1)
  return np.where(positions[..., None] == 0, 0.0, emb)


def np_embed(x, quirk=True):
  """sqrt(E) * x + positions 1..T, where frames whose unscaled channel 0 is exactly 0 get position 0."""
  b, t, e = x.shape
  pos = np.broadcast_to(np.arange(1, t + 1), (b, t))
  if quirk:
    pos = np.where(x[..., 0] != 0, pos, 0)
  return np.sqrt(e) * x + np_sinusoid(pos, e)


def np_attention(sd, p, xq, xkv, heads):
  """fairseq-style MultiheadAttention with the packed in_proj and a causal (triu -inf) mask."""
  e = xq.shape[-1]
  hd = e // heads
  w, bias = sd[p + "self_attn.in_proj_weight"], sd[p + "self_attn.in_proj_bias"]
  q = (xq @ w[:e].T + bias[:e]) * hd ** -0.5
  k = xkv @ w[e:2 * e].T + bias[e:2 * e]
  v = xkv @ w[2 * e:].T + bias[2 * e:]
  b, t, _ = q.shape
  s = k.shape[1]
  split = lambda x, n: x.reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
  q, k, v = split(q, t), split(k, s), split(v, s)
  scores = q @ k.transpose(0, 1, 3, 2)
  scores = scores + np.triu(np.full((t, s), -np.inf), 1 + abs(s - t))
  scores = np.exp(scores - scores.max(-1, keepdims=True))
  probs = scores / scores.sum(-1, keepdims=True)
  out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, e)
  return out @ sd[p + "self_attn.out_proj.weight"].T + sd[p + "self_attn.out_proj.bias"]


def np_layer(sd, p, x, kv, heads):
  ln0 = lambda z: np_layer_norm(z, sd[p + "layer_norms.0.weight"], sd[p + "layer_norms.0.bias"])
  h = ln0(x)
  x = x + np_attention(sd, p, h, h if kv is None else ln0(kv), heads)
  h = np_layer_norm(x, sd[p + "layer_norms.1.weight"], sd[p + "layer_norms.1.bias"])
  h = np.maximum(h @ sd[p + "fc1.weight"].T + sd[p + "fc1.bias"], 0.0)
  return x + h @ sd[p + "fc2.weight"].T + sd[p + "fc2.bias"]


def np_encoder(sd, prefix, x, kv, heads, num_layers, quirk=True):
  h = np_embed(x, quirk)
  kv = None if kv is None else np_embed(kv, quirk)
  for i in range(num_layers):
    h = np_layer(sd, f"{prefix}.layers.{i}.", h, kv, heads)
  return np_layer_norm(h, sd[prefix + ".layer_norm.weight"], sd[prefix + ".layer_norm.bias"])


def np_head(sd, m, h):
  z = np.maximum(h @ sd[f"proj1_{m}.weight"].T + sd[f"proj1_{m}.bias"], 0.0)
  z = z @ sd[f"proj2_{m}.weight"].T + sd[f"proj2_{m}.bias"] + h
  return z @ sd[f"out_layer_{m}.weight"].T + sd[f"out_layer_{m}.bias"]


def release_forward(sd, audio, visual, heads, num_layers, quirk=True):
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  a = np.asarray(audio, np.float64) @ sd["proj_a.weight"][:, :, 0].T
  v = np.asarray(visual, np.float64) @ sd["proj_v.weight"][:, :, 0].T
  v_a = np_encoder(sd, "visual_cross_acoustic", v, a, heads, num_layers, quirk)
  a_v = np_encoder(sd, "acoustic_cross_visual", a, v, heads, num_layers, quirk)
  h = np_encoder(sd, "trans_mem", np.concatenate([v_a, a_v], -1), None, heads, num_layers, quirk)
  return {"recon_audio": np_head(sd, "a", h), "recon_visual": np_head(sd, "v", h), "features": h}


# ----------------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------------

SMALL = dict(d=16, heads=2, num_layers=2)


def small_state_dict(seed=0):
  return make_release_state_dict(np.random.default_rng(seed), SMALL["d"], SMALL["num_layers"])


def random_inputs(rng, b, t, da=512, dv=17):
  audio = rng.normal(size=(b, t, da)).astype(np.float32)
  visual = rng.uniform(0.1, 5.0, size=(b, t, dv)).astype(np.float32)
  return audio, visual


def assert_close(got, want, rtol=1e-4):
  """Max abs error within rtol of the reference's largest magnitude, and elementwise closeness."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  scale = np.abs(want).max()
  err = np.abs(got - want).max()
  assert err <= rtol * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def to_release(params, d, num_layers):
  """Inverse mapping (written here, independently): converted params -> release state_dict names."""
  enc = params["encoder"]
  sd = {"proj_a.weight": enc["audio_frontend"]["proj"]["kernel"].T[:, :, None],
        "proj_v.weight": enc["visual_frontend"]["proj"]["kernel"].T[:, :, None]}
  for prefix, name in zip(PREFIXES, ("cross_visual_audio", "cross_audio_visual", "joint")):
    e = 2 * d if prefix == "trans_mem" else d
    for i in range(num_layers):
      lp, p = enc[name][f"layer_{i}"], f"{prefix}.layers.{i}."
      att = lp["attention"]
      sd[p + "self_attn.in_proj_weight"] = np.concatenate(
          [att[n]["kernel"].reshape(e, e).T for n in ("query", "key", "value")])
      sd[p + "self_attn.in_proj_bias"] = np.concatenate([att[n]["bias"].reshape(e) for n in ("query", "key", "value")])
      sd[p + "self_attn.out_proj.weight"] = att["out"]["kernel"].reshape(e, e).T
      sd[p + "self_attn.out_proj.bias"] = att["out"]["bias"]
      for f in ("fc1", "fc2"):
        sd[p + f + ".weight"] = lp[f]["kernel"].T
        sd[p + f + ".bias"] = lp[f]["bias"]
      for j, ln in enumerate(("ln_attention", "ln_mlp")):
        sd[f"{p}layer_norms.{j}.weight"] = lp[ln]["scale"]
        sd[f"{p}layer_norms.{j}.bias"] = lp[ln]["bias"]
    sd[prefix + ".layer_norm.weight"] = enc[name]["ln_final"]["scale"]
    sd[prefix + ".layer_norm.bias"] = enc[name]["ln_final"]["bias"]
  for head, m in (("recon_audio", "a"), ("recon_visual", "v")):
    for ours, theirs in (("proj1", f"proj1_{m}"), ("proj2", f"proj2_{m}"), ("out", f"out_layer_{m}")):
      sd[theirs + ".weight"] = params[head][ours]["kernel"].T
      sd[theirs + ".bias"] = params[head][ours]["bias"]
  return sd


def model_outputs(params, cfg, audio, visual):
  batch = {"audio": jnp.asarray(audio), "visual": jnp.asarray(visual), "mask": jnp.ones(audio.shape[:2], bool)}
  out = jax.jit(avt.PretrainModel(cfg).apply)({"params": params}, batch)
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def base_sd():
  return make_release_state_dict(np.random.default_rng(1), 240, 4)


@pytest.fixture(scope="module")
def base_converted(base_sd):
  return cr.convert(base_sd)


# ----------------------------------------------------------------------------------------------------------------
# Mapping, names and shapes at the real base size.
# ----------------------------------------------------------------------------------------------------------------

def test_base_round_trip_exact(base_sd, base_converted):
  params, cfg = base_converted
  assert (cfg.size, cfg.width, cfg.num_heads, cfg.num_layers) == ("base", 240, 10, 4)
  assert cfg.causal and cfg.release_positions and not cfg.padding_mask
  assert cfg.audio_frontend.to_dict() == {"type": "features", "dim": 512}
  assert cfg.visual_frontend.to_dict() == {"type": "features", "dim": 17}
  back = to_release(params, 240, 4)
  ignored = {"proj1.weight", "proj1.bias", "proj2.weight", "proj2.bias"} | {
      f"{p}.{b}" for p in PREFIXES for b in ("version", "embed_positions._float_tensor")}
  assert set(back) == set(base_sd) - ignored
  for k, v in back.items():
    assert v.dtype == np.float32 and v.shape == base_sd[k].shape, k
    np.testing.assert_array_equal(v, base_sd[k], err_msg=k)


def test_base_parameter_counts_match_paper(base_sd, base_converted):
  params, _ = base_converted
  # PAPER.md: base 18.4M parameters, 16.8M in the encoder path; the total includes the unused proj1/proj2.
  assert count(params["encoder"]) == 16_767_600
  unused = sum(base_sd[k].size for k in ("proj1.weight", "proj1.bias", "proj2.weight", "proj2.bias"))
  assert round((count(params) + unused) / 1e6, 1) == 18.4
  assert count(params) + unused + sum(base_sd[f"{p}.{b}"].size for p in PREFIXES
                                      for b in ("version", "embed_positions._float_tensor")) == sum(
                                          v.size for v in base_sd.values())


def test_base_forward_matches_numpy(base_sd, base_converted):
  params, cfg = base_converted
  audio, visual = random_inputs(np.random.default_rng(2), 1, 6)
  got = model_outputs(params, cfg, audio, visual)
  want = release_forward(base_sd, audio, visual, heads=10, num_layers=4)
  for k in ("recon_audio", "recon_visual", "features"):
    assert_close(got[k], want[k])


def test_large_is_detected_from_width():
  # Only the projections of a large model: detected as large, so every large-size tensor is listed as missing.
  sd = {"proj_a.weight": np.zeros((384, 512, 1), np.float32), "proj_v.weight": np.zeros((384, 17, 1), np.float32)}
  with pytest.raises(cr.ReleaseFormatError) as e:
    cr.convert(sd)
  msg = str(e.value)
  assert "trans_mem.layers.7.self_attn.in_proj_weight" in msg and "out_layer_v.bias" in msg
  assert "trans_mem.layers.8." not in msg


def test_size_mismatch_is_an_error(base_sd):
  with pytest.raises(cr.ReleaseFormatError, match=r"size=large expects d=384.*d=240"):
    cr.convert(base_sd, size="large")
  with pytest.raises(ValueError, match="num_heads=8"):
    cr.convert(base_sd, size="base", num_heads=8)
  params, cfg = cr.convert(base_sd, size="base")
  assert cfg.size == "base"


# ----------------------------------------------------------------------------------------------------------------
# Forward equivalence on a small model.
# ----------------------------------------------------------------------------------------------------------------

def test_reference_sinusoid_by_hand():
  # dim 4: half 2, frequencies 1 and 1e-4; position 0 is the zero row.
  rows = np_sinusoid(np.array([0, 1, 3]), 4)
  np.testing.assert_allclose(rows[0], 0.0)
  np.testing.assert_allclose(rows[1], [np.sin(1), np.sin(1e-4), np.cos(1), np.cos(1e-4)])
  np.testing.assert_allclose(rows[2], [np.sin(3), np.sin(3e-4), np.cos(3), np.cos(3e-4)])
  np.testing.assert_allclose(layers.sinusoidal_table(4, 4)[[0, 1, 3]], rows, atol=1e-7)


def test_small_forward_matches_numpy():
  sd = small_state_dict()
  params, cfg = cr.convert(sd, num_heads=SMALL["heads"])
  assert (cfg.size, cfg.width, cfg.num_heads, cfg.num_layers) == ("custom", 16, 2, 2)
  audio, visual = random_inputs(np.random.default_rng(3), 2, 9)
  got = model_outputs(params, cfg, audio, visual)
  want = release_forward(sd, audio, visual, SMALL["heads"], SMALL["num_layers"])
  for k in ("recon_audio", "recon_visual", "features"):
    assert got[k].shape == want[k].shape
    assert_close(got[k], want[k])


def test_scanned_layout_matches_numpy():
  sd = small_state_dict(seed=10)
  params, cfg = cr.convert(sd, num_heads=SMALL["heads"], scan_layers=True)
  assert cfg.scan_layers
  q = params["encoder"]["joint"]["layers"]["attention"]["query"]["kernel"]
  assert q.shape == (2, 32, 2, 16)
  np.testing.assert_array_equal(q[1].reshape(32, 32), sd["trans_mem.layers.1.self_attn.in_proj_weight"][:32].T)
  audio, visual = random_inputs(np.random.default_rng(11), 2, 9)
  audio[0, 4:6] = 0.0
  got = model_outputs(params, cfg, audio, visual)
  want = release_forward(sd, audio, visual, SMALL["heads"], SMALL["num_layers"])
  for k in ("recon_audio", "recon_visual", "features"):
    assert_close(got[k], want[k])


def test_zeroed_frames_get_no_position():
  sd = small_state_dict(seed=4)
  params, cfg = cr.convert(sd, num_heads=SMALL["heads"])
  audio, visual = random_inputs(np.random.default_rng(5), 2, 9)
  audio[0, [2, 3, 4]] = 0.0    # masked span in clip 0
  visual[0, [3, 4, 5]] = 0.0
  audio[1, 6:] = 0.0           # end padding in clip 1
  visual[1, 6:] = 0.0
  a = audio.astype(np.float64) @ sd["proj_a.weight"][:, :, 0].astype(np.float64).T
  assert np.sum(a[..., 0] == 0) == 6  # these frames get the zero positional row
  got = model_outputs(params, cfg, audio, visual)
  want = release_forward(sd, audio, visual, SMALL["heads"], SMALL["num_layers"])
  for k in ("recon_audio", "recon_visual", "features"):
    assert_close(got[k], want[k])
  # The rule matters: giving every frame a position changes the outputs far beyond the tolerance.
  plain = release_forward(sd, audio, visual, SMALL["heads"], SMALL["num_layers"], quirk=False)
  assert np.abs(plain["features"] - want["features"]).max() > 1e-2


def test_sub_results_by_hand():
  sd = small_state_dict(seed=6)
  params, _ = cr.convert(sd, num_heads=SMALL["heads"])
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
  rng = np.random.default_rng(7)
  enc = params["encoder"]

  # Frontend: the Conv1d kernel-1 projection.
  x = rng.normal(size=(2, 5, 512)).astype(np.float32)
  got = frontends.FeatureProjection(16).apply({"params": enc["audio_frontend"]}, jnp.asarray(x))
  want = np.einsum("btc,dc->btd", x.astype(np.float64), sd64["proj_a.weight"][:, :, 0])
  assert_close(got, want)

  # One causal self-attention of the joint encoder (E=32), from the packed in_proj.
  x = rng.normal(size=(2, 7, 32)).astype(np.float32)
  mask = layers.attention_mask(None, None, 7, 7, causal=True)
  got = layers.MultiHeadAttention(2).apply({"params": enc["joint"]["layer_1"]["attention"]},
                                            jnp.asarray(x), jnp.asarray(x), jnp.asarray(x), mask, True)
  assert_close(got, np_attention(sd64, "trans_mem.layers.1.", x.astype(np.float64), x.astype(np.float64), 2))

  # One cross-attention layer (vision queries, audio keys/values), the first LayerNorm shared.
  xq = rng.normal(size=(2, 7, 16)).astype(np.float32)
  xkv = rng.normal(size=(2, 7, 16)).astype(np.float32)
  got = layers.EncoderLayer(2).apply({"params": enc["cross_visual_audio"]["layer_0"]}, jnp.asarray(xq),
                                     jnp.asarray(xkv), jnp.asarray(xkv), mask, True)
  want = np_layer(sd64, "visual_cross_acoustic.layers.0.", xq.astype(np.float64), xkv.astype(np.float64), 2)
  assert_close(got, want)

  # The visual reconstruction head.
  h = rng.normal(size=(2, 7, 32)).astype(np.float32)
  got = avt.ReconstructionHead(17).apply({"params": params["recon_visual"]}, jnp.asarray(h))
  assert_close(got, np_head(sd64, "v", h.astype(np.float64)))


# ----------------------------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------------------------

def test_missing_unexpected_misshaped_are_all_named(base_sd):
  sd = dict(base_sd)
  del sd["trans_mem.layers.2.fc2.bias"]
  sd["extra_head.weight"] = np.zeros((3, 3), np.float32)
  sd["acoustic_cross_visual.layers.1.fc1.weight"] = np.zeros((100, 240), np.float32)
  with pytest.raises(cr.ReleaseFormatError) as e:
    cr.convert(sd, source="mine.npz")
  msg = str(e.value)
  assert "mine.npz" in msg
  assert "missing (1)" in msg and "trans_mem.layers.2.fc2.bias" in msg
  assert "unexpected (1)" in msg and "extra_head.weight" in msg
  assert "acoustic_cross_visual.layers.1.fc1.weight: expected (960, 240), found (100, 240)" in msg


@pytest.mark.parametrize("edit,name", [
    (lambda sd: sd.pop("visual_cross_acoustic.layers.1.self_attn.in_proj_bias"),
     "visual_cross_acoustic.layers.1.self_attn.in_proj_bias"),
    (lambda sd: sd.update({"acoustic_cross_visual.layers.2.fc1.weight": np.zeros((64, 16), np.float32)}),
     "acoustic_cross_visual.layers.2.fc1.weight"),
    (lambda sd: sd.update({"out_layer_v.weight": np.zeros((17, 16), np.float32)}),
     "out_layer_v.weight: expected (17, 32), found (17, 16)"),
    (lambda sd: sd.update({"trans_mem.layer_norm.bias": np.full((32,), np.nan, np.float32)}),
     "trans_mem.layer_norm.bias: contains NaN"),
])
def test_each_error_names_the_tensor(edit, name):
  sd = small_state_dict()
  edit(sd)
  with pytest.raises(cr.ReleaseFormatError, match="does not match the release format") as e:
    cr.convert(sd, num_heads=2)
  assert name in str(e.value)


def test_unknown_width_needs_num_heads():
  with pytest.raises(cr.ReleaseFormatError, match="num_heads"):
    cr.convert(small_state_dict())


@pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is not None, reason="torch is installed")
def test_pt_without_torch_explains_the_export(tmp_path):
  path = tmp_path / "base.pt"
  path.write_bytes(b"not really a checkpoint")
  with pytest.raises(ImportError) as e:
    cr.load_state_dict(str(path))
  assert "weights_only=True" in str(e.value) and "np.savez('base.npz'" in str(e.value)


def test_npz_with_objects_is_refused(tmp_path):
  path = tmp_path / "bad.npz"
  np.savez(path, **{"proj_a.weight": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(cr.ReleaseFormatError, match="bad.npz"):
    cr.load_state_dict(str(path))


# ----------------------------------------------------------------------------------------------------------------
# Command line end to end, then the fine-tuning restore path.
# ----------------------------------------------------------------------------------------------------------------

CLI_ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_cli(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "avt_jax.convert_release", *args], cwd=cwd, env=CLI_ENV,
                        capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_and_finetune_restore(tmp_path):
  sd = small_state_dict(seed=8)
  np.savez(tmp_path / "small.npz", **sd)
  audio, visual = random_inputs(np.random.default_rng(9), 2, 9)
  audio[1, 7:] = 0.0
  visual[1, 7:] = 0.0
  np.savez(tmp_path / "inputs.npz", audio=audio, visual=visual)
  out_dir = tmp_path / "converted"
  res = run_cli(f"--input={tmp_path / 'small.npz'}", f"--output={out_dir}", "--num_heads=2",
                f"--check={tmp_path / 'inputs.npz'}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "proj1.weight" in res.stdout  # ignored tensors are reported

  with np.load(out_dir / "check_outputs.npz") as f:
    got = {k: f[k] for k in f.files}
  assert sorted(got) == ["features", "recon_audio", "recon_visual"]
  want = release_forward(sd, audio, visual, 2, 2)
  assert got["recon_audio"].shape == (2, 9, 512) and got["recon_visual"].shape == (2, 9, 17)
  assert got["features"].shape == (2, 9, 32)
  for k in got:
    assert_close(got[k], want[k])

  config = json.loads((out_dir / "config.json").read_text())
  assert config["converted_from"]["sha256"] == hashlib.sha256((tmp_path / "small.npz").read_bytes()).hexdigest()
  assert config["release_positions"] is True and config["padding_mask"] is False

  # Fine-tuning: a FinetuneModel built from the stored model config restores the encoder exactly.
  del config["converted_from"]
  cfg = avt.model_config(**config)
  batch = {"audio": jnp.asarray(audio), "visual": jnp.asarray(visual), "mask": jnp.ones((2, 9), bool)}
  model = avt.FinetuneModel(cfg, num_outputs=cfg.num_classes)
  abstract = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"])
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract_enc = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                              abstract["encoder"])
  enc = checkpointing.restore_encoder(str(out_dir), abstract_enc)
  params, _ = cr.convert(sd, num_heads=2)
  assert jax.tree.structure(enc) == jax.tree.structure(params["encoder"])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, enc), params["encoder"])
  head = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch)["params"]["head"])
  out = jax.jit(model.apply)({"params": {"encoder": enc, "head": head}}, batch)
  assert_close(out["features"], want["features"])

  # Its input scale: none. A fine-tuning run from it (default config.data.normalization='encoder') feeds the
  # features as stored, not z-scored with the dataset's statistics: checked on the batch the model would see.
  from avt_jax import config_lib, input_pipeline  # pylint: disable=g-import-not-at-top
  from avt_jax import setup as setup_lib  # pylint: disable=g-import-not-at-top
  assert json.loads((out_dir / "normalization.json").read_text())["kind"] == "none"
  ft = config_lib.base_config("finetune")
  ft.init_from = str(out_dir)
  sources, _ = input_pipeline.open_sources(config_lib.SYNTH)  # features kind, with statistics in its info
  norm = setup_lib.resolve_normalization(ft, sources)
  assert norm["kind"] == "none"
  seen = next(iter(input_pipeline.make_dataset(config_lib.SYNTH, split="eval", global_batch_size=2, seed=0,
                                               max_tokens=8, process_index=0, process_count=1, normalization=norm)))
  record = sources[0][0]
  n = min(int(record["num_tokens"]), 8)
  np.testing.assert_array_equal(seen["audio"][0, :n], record["audio"][:n])
  np.testing.assert_array_equal(seen["visual"][0, :n], record["visual"][:n])
  zscored = next(iter(input_pipeline.make_dataset(config_lib.SYNTH, split="eval", global_batch_size=2, seed=0,
                                                  max_tokens=8, process_index=0, process_count=1)))
  assert not np.allclose(zscored["audio"][0, :n], record["audio"][:n])  # the dataset default would rescale


  # Encoder features through the training input pipeline (python -m avt_jax.embed) on a features dataset that
  # data.prepare built from .npy (512-d) + OpenFace .csv files equal the converted model's forward on the arrays.
  from avt_jax import embed as embed_lib  # pylint: disable=g-import-not-at-top
  from data import prepare  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(10)
  src = tmp_path / "features_src"
  (src / "audio").mkdir(parents=True)
  (src / "openface").mkdir()
  arrays = {}
  for stem, tokens in (("clip_a", 9), ("clip_b", 6)):
    a_feat, _ = random_inputs(rng, 1, tokens)
    np.save(src / "audio" / f"{stem}.npy", a_feat[0])
    aus = rng.uniform(0.1, 5.0, (tokens * 5, 17)).round(2)  # 25 fps rows, 5 per token
    names = [f"{au}_r" for au in ("AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU12", "AU14",
                                   "AU15", "AU17", "AU20", "AU23", "AU25", "AU26", "AU45")]
    with open(src / "openface" / f"{stem}.csv", "w") as f:
      f.write(", ".join(["frame", "timestamp", "confidence", "success"] + names) + "\n")
      for i, row in enumerate(aus):
        f.write(", ".join([str(i + 1), f"{i * 0.04:.2f}", "0.9", "1"] + [str(x) for x in row]) + "\n")
    arrays[stem] = a_feat[0]
  prepared = tmp_path / "features_prepared"
  prepare.prepare(prepare.PrepareOptions(input=str(src), output=str(prepared), kind="features", progress=False))
  got = embed_lib.embed(str(out_dir), str(prepared), batch_size=2, max_tokens=12)
  assert got["features"].shape == (2, 12, 32) and got["features"].dtype == np.float32
  recs = {r["clip_id"]: r for r in (input_pipeline.open_sources(str(prepared))[0][0][i] for i in range(2))}
  for i, clip_id in enumerate(got["clip_ids"]):
    rec = recs[str(clip_id)]
    n = int(rec["num_tokens"])
    np.testing.assert_array_equal(rec["audio"], arrays[str(clip_id)][:n])
    want_h = cr.forward(params, cfg, rec["audio"][None], rec["visual"][None])["features"][0]
    assert got["mask"][i].sum() == n and not got["features"][i, n:].any()
    np.testing.assert_allclose(got["features"][i, :n], want_h, atol=1e-5)


def test_cli_refuses_existing_output_and_leaves_it_alone(tmp_path):
  np.savez(tmp_path / "small.npz", **small_state_dict())
  out_dir = tmp_path / "taken"
  out_dir.mkdir()
  (out_dir / "keep.txt").write_text("precious")
  res = run_cli(f"--input={tmp_path / 'small.npz'}", f"--output={out_dir}", "--num_heads=2")
  assert res.returncode != 0 and "not an empty directory" in res.stderr
  assert sorted(os.listdir(out_dir)) == ["keep.txt"] and (out_dir / "keep.txt").read_text() == "precious"
  assert sorted(os.listdir(tmp_path)) == ["small.npz", "taken"]  # no temporary leftovers


def test_cli_bad_state_dict_writes_nothing(tmp_path):
  sd = small_state_dict()
  del sd["proj_v.weight"]
  np.savez(tmp_path / "broken.npz", **sd)
  res = run_cli(f"--input={tmp_path / 'broken.npz'}", f"--output={tmp_path / 'out'}", "--num_heads=2")
  assert res.returncode != 0 and "proj_v.weight" in res.stderr
  assert not (tmp_path / "out").exists()


def test_cli_relative_paths_from_another_directory(tmp_path):
  np.savez(tmp_path / "small.npz", **small_state_dict(seed=12))
  audio, visual = random_inputs(np.random.default_rng(13), 1, 5)
  np.savez(tmp_path / "inputs.npz", audio=audio, visual=visual)
  res = run_cli("--input=small.npz", "--output=ckpt/small", "--num_heads=2", "--check=inputs.npz", cwd=tmp_path)
  assert res.returncode == 0, res.stderr[-3000:]
  out = tmp_path / "ckpt" / "small"
  assert f"-> {out}" in res.stdout and f"wrote {out / 'check_outputs.npz'}" in res.stdout
  assert sorted(os.listdir(out)) == ["check_outputs.npz", "checkpoints", "config.json", "normalization.json"]
  assert json.loads((out / "config.json").read_text())["converted_from"]["file"] == str(tmp_path / "small.npz")
  assert os.listdir(tmp_path / "ckpt") == ["small"]  # the temporary sibling was renamed, nothing left over


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_interrupted_after_the_checkpoint_leaves_no_output(tmp_path, sig):
  # Interrupted once the checkpoint and config.json are in the temporary directory, during the --check forward.
  np.savez(tmp_path / "small.npz", **small_state_dict(seed=14))
  audio, visual = random_inputs(np.random.default_rng(15), 8, 512)  # a forward long enough to interrupt
  np.savez(tmp_path / "inputs.npz", audio=audio, visual=visual)
  (tmp_path / "keep.txt").write_text("precious")
  proc = subprocess.Popen([sys.executable, "-m", "avt_jax.convert_release", "--input=small.npz",
                           "--output=converted", "--num_heads=2", "--check=inputs.npz"], cwd=tmp_path, env=CLI_ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          # A job started in the background inherits SIGINT ignored; a user's Ctrl-C is not.
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  deadline = time.monotonic() + 240
  while proc.poll() is None and not glob.glob(str(tmp_path / "converted.tmp-*" / "config.json")):
    assert time.monotonic() < deadline, "the converter never wrote its temporary config.json"
    time.sleep(0.005)
  assert proc.poll() is None, "the converter finished before it could be interrupted: " + proc.communicate()[1][-2000:]
  assert os.path.isdir(glob.glob(str(tmp_path / "converted.tmp-*"))[0] + "/checkpoints/0")
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0, err[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["inputs.npz", "keep.txt", "small.npz"], err[-2000:]
  assert (tmp_path / "keep.txt").read_text() == "precious"


def test_existing_output_is_refused_before_converting(tmp_path):
  # The check comes first: a broken input behind a taken --output reports the output, and nothing is touched.
  (tmp_path / "broken.npz").write_bytes(b"not an npz")
  (tmp_path / "taken").write_text("a file")
  res = run_cli("--input=broken.npz", "--output=taken", "--num_heads=2", cwd=tmp_path)
  assert res.returncode != 0
  assert f"--output={tmp_path / 'taken'} exists and is not an empty directory" in res.stderr
  assert sorted(os.listdir(tmp_path)) == ["broken.npz", "taken"] and (tmp_path / "taken").read_text() == "a file"
