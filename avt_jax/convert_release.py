"""Imports the published PyTorch weights of the model (`base.pt` / `large.pt`) as an avt_jax checkpoint.

The release is a PyTorch state_dict (float32). Names for one encoder `P` in {visual_cross_acoustic (vision
queries over audio), acoustic_cross_visual (audio queries over vision), trans_mem (joint)} and layer i:
  P.layers.i.self_attn.in_proj_weight (3E, E), .in_proj_bias (3E)     rows [0:E] query, [E:2E] key, [2E:3E] value
  P.layers.i.self_attn.out_proj.{weight (E, E), bias (E)}
  P.layers.i.fc1.{weight (4E, E), bias}, P.layers.i.fc2.{weight (E, 4E), bias}
  P.layers.i.layer_norms.{0,1}.{weight, bias}, P.layer_norm.{weight, bias}
plus proj_a.weight (d, 512, 1), proj_v.weight (d, 17, 1) (kernel-1 Conv1d, no bias), and the reconstruction heads
proj1_a / proj2_a / out_layer_a and proj1_v / proj2_v / out_layer_v. PyTorch Linear weights are (out, in).
Ignored: the unused heads proj1 / proj2 and the buffers P.version and P.embed_positions._float_tensor.

The converted model is `PretrainModel(release_model_config(...))`: features frontends, causal attention, no padding
mask and the release's position rule (frames whose projected channel 0 is exactly 0 get no position). In eval mode
it reproduces the release's forward.

Usage:
  python -m avt_jax.convert_release --input=base.npz --output=/path/to/avt_base [--size=auto] [--check=inputs.npz]
Paths may be relative to the current directory. --output must be new (or an empty directory): everything is
written to a temporary sibling and renamed into place at the end, so a failed or interrupted run leaves no
half-written output and never touches an existing one.
A `.pt` input needs PyTorch installed; otherwise export it to `.npz` first (see `EXPORT_HINT`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
from typing import Any, Mapping, Optional

import numpy as np

ENCODERS = {  # release prefix -> avt_jax encoder name
    "visual_cross_acoustic": "cross_visual_audio",
    "acoustic_cross_visual": "cross_audio_visual",
    "trans_mem": "joint",
}
HEADS = {  # avt_jax head -> release names of (proj1, proj2, out)
    "recon_audio": ("proj1_a", "proj2_a", "out_layer_a"),
    "recon_visual": ("proj1_v", "proj2_v", "out_layer_v"),
}
UNUSED = ("proj1.weight", "proj1.bias", "proj2.weight", "proj2.bias")
BUFFERS = ("version", "embed_positions._float_tensor")
RELEASE_SIZES = ("base", "large")
AUDIO_DIM, VISUAL_DIM = 512, 17

EXPORT_HINT = (
    "python -c \"import torch, numpy as np; sd=torch.load('base.pt', map_location='cpu', weights_only=True); "
    "np.savez('base.npz', **{k: v.numpy() for k, v in sd.items()})\"")

_LAYER_RE = re.compile(r"^(%s)\.layers\.(\d+)\." % "|".join(ENCODERS))


class ReleaseFormatError(ValueError):
  """The state_dict does not have the names and shapes of the release."""


# ----------------------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------------------

def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state_dict from an .npz (keys = state_dict names) or, if PyTorch is installed, a .pt file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as data:
        out = {k: np.asarray(data[k]) for k in data.files}
    except ValueError as e:
      raise ReleaseFormatError(f"{path}: cannot read as a plain-array .npz ({e})") from None
    return out
  if path.endswith((".pt", ".pth", ".bin")):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(
          f"{path}: reading a PyTorch file needs torch, which is not installed here. Export it to .npz on a "
          f"machine with torch:\n  {EXPORT_HINT}\nand pass --input=base.npz") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
      for key in ("state_dict", "model"):  # A training checkpoint that wraps the state_dict.
        if isinstance(obj.get(key), Mapping):
          obj = obj[key]
          break
    if not isinstance(obj, Mapping):
      raise ReleaseFormatError(f"{path}: expected a state_dict (name -> tensor), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
      if not isinstance(v, torch.Tensor):
        raise ReleaseFormatError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
      v = v.detach().cpu()
      out[k] = (v.float() if v.is_floating_point() else v).numpy()
    return out
  raise ValueError(f"{path}: unknown file type; expected .npz (or .pt with torch installed)")


# ----------------------------------------------------------------------------------------------------------------
# Expected names and shapes.
# ----------------------------------------------------------------------------------------------------------------

def release_shapes(width: int, num_layers: int, audio_dim: int = AUDIO_DIM,
                   visual_dim: int = VISUAL_DIM) -> dict[str, tuple[int, ...]]:
  """Every learned tensor the converter needs, with its release shape (ignored tensors not included)."""
  d, e2 = width, 2 * width
  shapes = {"proj_a.weight": (d, audio_dim, 1), "proj_v.weight": (d, visual_dim, 1)}
  for prefix in ENCODERS:
    e = e2 if prefix == "trans_mem" else d
    for i in range(num_layers):
      p = f"{prefix}.layers.{i}."
      shapes.update({
          p + "self_attn.in_proj_weight": (3 * e, e), p + "self_attn.in_proj_bias": (3 * e,),
          p + "self_attn.out_proj.weight": (e, e), p + "self_attn.out_proj.bias": (e,),
          p + "fc1.weight": (4 * e, e), p + "fc1.bias": (4 * e,),
          p + "fc2.weight": (e, 4 * e), p + "fc2.bias": (e,),
      })
      for j in (0, 1):
        shapes.update({f"{p}layer_norms.{j}.weight": (e,), f"{p}layer_norms.{j}.bias": (e,)})
    shapes.update({f"{prefix}.layer_norm.weight": (e,), f"{prefix}.layer_norm.bias": (e,)})
  for (p1, p2, out), dim in zip(HEADS.values(), (audio_dim, visual_dim)):
    shapes.update({f"{p1}.weight": (e2, e2), f"{p1}.bias": (e2,), f"{p2}.weight": (e2, e2), f"{p2}.bias": (e2,),
                   f"{out}.weight": (dim, e2), f"{out}.bias": (dim,)})
  return shapes


def is_ignored(name: str) -> bool:
  """The release's unused heads and non-learned buffers."""
  if name in UNUSED:
    return True
  prefix, _, rest = name.partition(".")
  return prefix in ENCODERS and rest in BUFFERS


def _detect(sd: Mapping[str, np.ndarray]) -> tuple[Optional[int], int, int, int]:
  """(width or None, layers, audio_dim, visual_dim) read from the state_dict."""
  pa, pv = sd.get("proj_a.weight"), sd.get("proj_v.weight")
  width = int(pa.shape[0]) if pa is not None and pa.ndim == 3 else None
  audio_dim = int(pa.shape[1]) if pa is not None and pa.ndim == 3 else AUDIO_DIM
  visual_dim = int(pv.shape[1]) if pv is not None and pv.ndim == 3 else VISUAL_DIM
  # Layers per encoder (highest index + 1); the most common count wins, so one stray or missing layer in a
  # single encoder is reported as unexpected or missing tensors rather than changing the size.
  per_encoder = {}
  for m in filter(None, map(_LAYER_RE.match, sd)):
    per_encoder[m.group(1)] = max(per_encoder.get(m.group(1), 0), int(m.group(2)) + 1)
  counts = sorted(per_encoder.values())
  layers = max(counts, key=lambda n: (counts.count(n), n)) if counts else 0
  return width, layers, audio_dim, visual_dim


def check_state_dict(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], source: str = "") -> None:
  """Raises ReleaseFormatError listing every missing, unexpected, mis-shaped or unusable tensor."""
  missing = [k for k in expected if k not in sd]
  unexpected = sorted(k for k in sd if k not in expected and not is_ignored(k))
  bad = []
  for k, shape in expected.items():
    if k not in sd:
      continue
    v = sd[k]
    if tuple(v.shape) != tuple(shape):
      bad.append(f"{k}: expected {tuple(shape)}, found {tuple(v.shape)}")
    elif not np.issubdtype(v.dtype, np.floating):
      bad.append(f"{k}: expected a floating-point tensor, found dtype {v.dtype}")
    elif not np.all(np.isfinite(v)):
      bad.append(f"{k}: contains NaN or infinite values")
  if missing or unexpected or bad:
    where = f"{source}: " if source else ""
    lines = [f"{where}state_dict does not match the release format:"]
    if missing:
      lines.append(f"  missing ({len(missing)}):\n    " + "\n    ".join(missing))
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}):\n    " + "\n    ".join(unexpected))
    if bad:
      lines.append(f"  wrong shape or values ({len(bad)}):\n    " + "\n    ".join(bad))
    raise ReleaseFormatError("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Conversion.
# ----------------------------------------------------------------------------------------------------------------

def release_model_config(size: str = "base", audio_dim: int = AUDIO_DIM, visual_dim: int = VISUAL_DIM, **overrides):
  """The avt_jax model config that reproduces the release (use it for fine-tuning from converted weights too)."""
  from avt_jax.models import avt  # pylint: disable=g-import-not-at-top
  return avt.model_config(
      size, causal=True, padding_mask=False, release_positions=True,
      audio_frontend=dict(type="features", dim=audio_dim), visual_frontend=dict(type="features", dim=visual_dim),
      audio_target_dim=audio_dim, visual_target_dim=visual_dim, **overrides)


def _resolve_size(sd, size: Optional[str], num_heads: Optional[int]):
  """Returns (size label, width, layers, heads, audio_dim, visual_dim) and checks them against the request.

  A released size is recognised by its width (proj_a.weight); a wrong layer count then shows up as missing or
  unexpected tensors in the full listing. Other widths need num_heads and convert as 'custom'.
  """
  from avt_jax.models.avt import PRESETS  # pylint: disable=g-import-not-at-top
  width, layers, audio_dim, visual_dim = _detect(sd)
  size = None if size in (None, "", "auto") else size
  if size is not None and size not in RELEASE_SIZES + ("custom",):
    raise ValueError(f"size={size!r}; expected auto, {', '.join(RELEASE_SIZES)} or custom")
  if size in RELEASE_SIZES:
    want = PRESETS[size]
    if width is not None and width != want["width"]:
      raise ReleaseFormatError(
          f"size={size} expects d={want['width']} and {want['num_layers']} layers, but the state_dict has "
          f"d={width} (proj_a.weight {tuple(sd['proj_a.weight'].shape)}) and {layers} layers")
    if num_heads not in (None, want["num_heads"]):
      raise ValueError(f"size={size} has {want['num_heads']} heads; num_heads={num_heads} contradicts it "
                       "(use size=custom)")
    return size, want["width"], want["num_layers"], want["num_heads"], audio_dim, visual_dim
  if width is None:
    raise ReleaseFormatError("cannot detect the model size: proj_a.weight is missing or is not a (d, "
                             f"{AUDIO_DIM}, 1) Conv1d kernel")
  if size is None:
    for name in RELEASE_SIZES:
      p = PRESETS[name]
      if width == p["width"] and num_heads is None:
        return name, width, p["num_layers"], p["num_heads"], audio_dim, visual_dim
      if (width, layers, num_heads) == (p["width"], p["num_layers"], p["num_heads"]):
        return name, width, layers, num_heads, audio_dim, visual_dim
  if layers == 0:
    raise ReleaseFormatError("cannot detect the model size: no '<encoder>.layers.<i>.' tensors for any of "
                             f"{', '.join(ENCODERS)}")
  if num_heads is None:
    sizes = "; ".join(f"{n}: d={PRESETS[n]['width']}, {PRESETS[n]['num_layers']} layers" for n in RELEASE_SIZES)
    raise ReleaseFormatError(f"state_dict with d={width} and {layers} layers is not a released size ({sizes}); "
                             "pass num_heads (--num_heads) to convert it as a custom size")
  if width % num_heads:
    raise ValueError(f"num_heads={num_heads} does not divide the width d={width}")
  return "custom", width, layers, num_heads, audio_dim, visual_dim


def _linear(w, b=None):
  out = {"kernel": np.ascontiguousarray(w.T)}
  if b is not None:
    out["bias"] = b
  return out


def _layer(sd, p: str, e: int, heads: int) -> dict[str, Any]:
  hd = e // heads
  w, b = sd[p + "self_attn.in_proj_weight"], sd[p + "self_attn.in_proj_bias"]
  attn = {}
  for j, name in enumerate(("query", "key", "value")):
    attn[name] = {"kernel": np.ascontiguousarray(w[j * e:(j + 1) * e].T).reshape(e, heads, hd),
                  "bias": b[j * e:(j + 1) * e].reshape(heads, hd)}
  attn["out"] = {"kernel": np.ascontiguousarray(sd[p + "self_attn.out_proj.weight"].T).reshape(heads, hd, e),
                 "bias": sd[p + "self_attn.out_proj.bias"]}
  ln = lambda j: {"scale": sd[f"{p}layer_norms.{j}.weight"], "bias": sd[f"{p}layer_norms.{j}.bias"]}
  return {"attention": attn, "ln_attention": ln(0), "ln_mlp": ln(1),
          "fc1": _linear(sd[p + "fc1.weight"], sd[p + "fc1.bias"]),
          "fc2": _linear(sd[p + "fc2.weight"], sd[p + "fc2.bias"])}


def _stack(trees):
  """Stacks identically structured trees on a new leading axis."""
  if isinstance(trees[0], Mapping):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def _flat_shapes(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else k
    out.update(_flat_shapes(v, path) if isinstance(v, Mapping) else {path: tuple(v.shape)})
  return out


def convert(state_dict: Mapping[str, np.ndarray], size: Optional[str] = None, num_heads: Optional[int] = None,
            source: str = "", scan_layers: bool = False):
  """Maps a release state_dict to a PretrainModel parameter tree.

  size: None/'auto' (base or large recognised by proj_a's width; a wrong layer count then shows up as missing or
  unexpected tensors), 'base', 'large' (an error if the file's width differs), or 'custom' (width and layer count
  read from the file; needs num_heads, as does any width that is not a released one). scan_layers: write the
  layout of `model.scan_layers=True` (each encoder's layers stacked on a leading axis). Returns (params, model_config): params is a nested dict of float32
  numpy arrays {'encoder': ..., 'recon_audio': ..., 'recon_visual': ...}; model_config the ConfigDict to build
  `PretrainModel` / `FinetuneModel` with. Raises ReleaseFormatError naming every problem tensor.
  """
  sd = dict(state_dict)
  label, width, layers, heads, audio_dim, visual_dim = _resolve_size(sd, size, num_heads)
  check_state_dict(sd, release_shapes(width, layers, audio_dim, visual_dim), source)
  sd = {k: np.asarray(v, np.float32) for k, v in sd.items() if not is_ignored(k)}
  overrides = {} if label in RELEASE_SIZES else dict(width=width, num_layers=layers, num_heads=heads)
  overrides["scan_layers"] = bool(scan_layers)
  cfg = release_model_config(label, audio_dim, visual_dim, **overrides)

  encoder = {"audio_frontend": {"proj": {"kernel": np.ascontiguousarray(sd["proj_a.weight"][:, :, 0].T)}},
             "visual_frontend": {"proj": {"kernel": np.ascontiguousarray(sd["proj_v.weight"][:, :, 0].T)}}}
  for prefix, name in ENCODERS.items():
    e = 2 * width if prefix == "trans_mem" else width
    per_layer = [_layer(sd, f"{prefix}.layers.{i}.", e, heads) for i in range(layers)]
    if scan_layers:
      enc = {"layers": _stack(per_layer)}
    else:
      enc = {f"layer_{i}": tree for i, tree in enumerate(per_layer)}
    enc["ln_final"] = {"scale": sd[f"{prefix}.layer_norm.weight"], "bias": sd[f"{prefix}.layer_norm.bias"]}
    encoder[name] = enc
  params = {"encoder": encoder}
  for head, (p1, p2, out) in HEADS.items():
    params[head] = {n: _linear(sd[f"{r}.weight"], sd[f"{r}.bias"]) for n, r in zip(("proj1", "proj2", "out"),
                                                                                   (p1, p2, out))}
  _check_against_model(params, cfg)
  return params, cfg


def _check_against_model(params, cfg) -> None:
  """The mapped tree must be exactly the model's parameter tree (names and shapes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from avt_jax.models import avt  # pylint: disable=g-import-not-at-top
  batch = {"audio": jnp.zeros((1, 2, cfg.audio_frontend.dim)), "visual": jnp.zeros((1, 2, cfg.visual_frontend.dim)),
           "mask": jnp.ones((1, 2), bool)}
  shapes = jax.eval_shape(lambda: avt.PretrainModel(cfg).init(jax.random.key(0), batch))
  want = _flat_shapes(nn.meta.unbox(shapes["params"]))
  got = _flat_shapes(params)
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))
    raise RuntimeError(f"converted tree does not match the model's parameters: {diff[:10]}")


def forward(params, cfg, audio: np.ndarray, visual: np.ndarray) -> dict[str, np.ndarray]:
  """Runs the converted PretrainModel in eval mode on [B, T, D] inputs (every frame valid)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from avt_jax.models import avt  # pylint: disable=g-import-not-at-top
  model = avt.PretrainModel(cfg)
  batch = {"audio": jnp.asarray(audio, jnp.float32), "visual": jnp.asarray(visual, jnp.float32),
           "mask": jnp.ones(audio.shape[:2], bool)}
  out = jax.jit(lambda p, b: model.apply({"params": p}, b, deterministic=True))(params, batch)
  return {k: np.asarray(out[k]) for k in ("recon_audio", "recon_visual", "features")}


def _load_check_inputs(path: str, cfg) -> tuple[np.ndarray, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    missing = [k for k in ("audio", "visual") if k not in data.files]
    if missing:
      raise ValueError(f"{path}: missing arrays {missing}; expected 'audio' [B, T, {cfg.audio_frontend.dim}] and "
                       f"'visual' [B, T, {cfg.visual_frontend.dim}]")
    audio, visual = np.asarray(data["audio"]), np.asarray(data["visual"])
  for name, x, dim in (("audio", audio, cfg.audio_frontend.dim), ("visual", visual, cfg.visual_frontend.dim)):
    if x.ndim != 3 or x.shape[-1] != dim:
      raise ValueError(f"{path}: '{name}' has shape {x.shape}, expected [B, T, {dim}]")
  if audio.shape[:2] != visual.shape[:2]:
    raise ValueError(f"{path}: 'audio' {audio.shape} and 'visual' {visual.shape} must share [B, T]")
  return audio, visual


def check_output_free(output: str) -> str:
  """The absolute --output path; raises FileExistsError if it is a file or a non-empty directory."""
  output = os.path.abspath(output)
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise FileExistsError(f"--output={output} exists and is not an empty directory; choose a new one")
  return output


def write_checkpoint(output: str, params, cfg, source: Optional[str] = None,
                     check_inputs: Optional[str] = None) -> str:
  """Writes the converted checkpoint (and check_outputs.npz) to a fresh local directory, all or nothing."""
  from avt_jax import checkpointing, input_pipeline, records  # pylint: disable=g-import-not-at-top
  from avt_jax import setup as setup_lib  # pylint: disable=g-import-not-at-top
  output = check_output_free(output)
  checks = _load_check_inputs(check_inputs, cfg) if check_inputs else None
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp-", dir=parent)
  try:
    config = cfg.to_dict()
    if source:
      config["converted_from"] = {"file": os.path.abspath(source), "sha256": records.file_sha256(source)}
    checkpointing.save_pretrained(tmp, params, config)
    # The release feeds raw TRILL / action-unit features: a fine-tuning run from this encoder must not z-score them.
    records.write_atomic(os.path.join(tmp, setup_lib.NORMALIZATION), json.dumps(
        dict(input_pipeline.NO_NORMALIZATION, source="the release (raw TRILL / AU features)"), indent=1))
    if checks is not None:
      outs = forward(params, cfg, *checks)
      np.savez(os.path.join(tmp, "check_outputs.npz"), **outs)
    if os.path.isdir(output):
      os.rmdir(output)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return output


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------

def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("input", None, "release state_dict: .npz (keys = state_dict names) or .pt (needs torch)")
  flags.DEFINE_string("output", None, "new local directory for the converted checkpoint")
  flags.DEFINE_enum("size", "auto", ["auto", "base", "large", "custom"], "model size; auto detects it")
  flags.DEFINE_integer("num_heads", None, "attention heads; only for --size=custom or a non-released shape")
  flags.DEFINE_bool("scan_layers", False, "write the layout of model.scan_layers=True (stacked layers)")
  flags.DEFINE_string("check", None, "optional .npz with 'audio' [B,T,512] and 'visual' [B,T,17]: writes "
                      "<output>/check_outputs.npz with recon_audio, recon_visual and features")
  flags.mark_flags_as_required(["input", "output"])
  return flags.FLAGS


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag = flags.FLAGS
  # A SIGTERM (job schedulers, `kill`) becomes SystemExit, so write_checkpoint removes its temporary directory.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  # Every path is made absolute once, here, so relative arguments work from any directory.
  source = os.path.abspath(flag.input)
  check = os.path.abspath(flag.check) if flag.check else None
  output = check_output_free(flag.output)  # before the conversion, which can take a while
  sd = load_state_dict(source)
  ignored = sorted(k for k in sd if is_ignored(k))
  params, cfg = convert(sd, flag.size, flag.num_heads, source=source, scan_layers=flag.scan_layers)
  out = write_checkpoint(output, params, cfg, source=source, check_inputs=check)
  n = sum(int(np.prod(x.shape)) for x in _iter_leaves(params))
  print(f"converted {source} ({cfg.size}: d={cfg.width}, {cfg.num_heads} heads, {cfg.num_layers} layers; "
        f"{len(sd) - len(ignored)} tensors, {n:,} parameters) -> {out}")
  print(f"ignored ({len(ignored)}): {', '.join(ignored)}")
  if check:
    print(f"wrote {os.path.join(out, 'check_outputs.npz')}")


def _iter_leaves(tree):
  for v in tree.values():
    if isinstance(v, Mapping):
      yield from _iter_leaves(v)
    else:
      yield v


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
