"""Shared pieces of the run configs in configs/ (ml_collections)."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from avt_jax.models.avt import model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "sample", "prepared")
# The synthetic audio-visual benchmark (written by `python -m data.synth`, see README).
SYNTH = os.path.join(REPO, "sample", "avt_synth")
# Its v2 ("nonlinear views"): generated, not committed (`python -m data.synth --version=2 --output=<this>`; the
# sweep configs/sweeps/synth_v2.py writes it when it is missing).
SYNTH_V2 = os.path.join(REPO, "sample", "avt_synth_v2")


def from_json(value: Any) -> Any:
  """A JSON value as a config value: lists become tuples (configs hold tuples, which overrides accept), recursively."""
  if isinstance(value, list):
    return tuple(from_json(v) for v in value)
  if isinstance(value, dict):
    return {k: from_json(v) for k, v in value.items()}
  return value


def absolute_path(path: str) -> str:
  """`path` made absolute against the current directory; '' and remote paths (gs://...) are returned as they are.

  Orbax refuses relative checkpoint paths, and a run's config.json must name the same files from any directory,
  so every path a command line gives is made absolute once, at the entry point, before anything is written.
  """
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def _absolute_spec(spec: Any) -> Any:
  """A dataset spec (path, 'tfds:<name>/<split>', mapping or list of them) with its file paths made absolute."""
  if isinstance(spec, str):
    return spec if spec.startswith("tfds:") else absolute_path(spec)
  if isinstance(spec, (list, tuple)):
    return type(spec)(_absolute_spec(s) for s in spec)
  if isinstance(spec, (dict, ml_collections.ConfigDict)):
    out = dict(spec.items())
    if isinstance(out.get("path"), str):
      out["path"] = _absolute_spec(out["path"])
    for key in ("data_dir", "info_dir"):
      if isinstance(out.get(key), str):
        out[key] = absolute_path(out[key])
    return type(spec)(out) if isinstance(spec, ml_collections.ConfigDict) else out
  return spec


DATA_SPLITS = ("train", "eval", "test")


def make_paths_absolute(config: ml_collections.ConfigDict) -> None:
  """Makes the config's paths absolute in place: init_from, data.<split>, the datasets evaluators name directly,
  compilation_cache_dir, workdir."""
  with config.unlocked():
    if config.get("init_from"):
      config.init_from = absolute_path(config.init_from)
    if config.get("workdir"):
      config.workdir = absolute_path(config.workdir)
    cache = config.get("compilation_cache_dir", "")
    if cache and cache.lower() != "none":
      config.compilation_cache_dir = absolute_path(cache)
    data = config.get("data")
    if data is not None:
      with data.unlocked():
        for split in DATA_SPLITS:
          if data.get(split):
            data[split] = _absolute_spec(data[split])
    for ev in (config.get("evals") or {}).values():
      for key in ("data", "fit"):  # a split name stays; a dataset given directly is a path
        value = ev.get(key)
        if value and not (isinstance(value, str) and value in DATA_SPLITS):
          with ev.unlocked():
            ev[key] = _absolute_spec(value)


def data_spec(config: ml_collections.ConfigDict, split: str):
  """The dataset spec of config.data.<split>, with config.data.<split>_filter (a mapping) applied to a path.

  Paths stay plain strings in configs (so --config.data.train=<dir> works); filters such as
  {"where": {"speaker": [...]}} or {"clip_ids": [...]} live in <split>_filter. A list (mixture) is used as is.
  None when the split is empty.
  """
  spec = config.data.get(split)
  if not spec:
    return None
  flt = config.data.get(f"{split}_filter")
  if isinstance(spec, str) and flt:
    return {"path": spec, **(flt.to_dict() if hasattr(flt, "to_dict") else dict(flt))}
  return spec.to_dict() if hasattr(spec, "to_dict") else spec


def use_data(c: ml_collections.ConfigDict, path: str, data_filter: dict | None = None) -> None:
  """Trains, validates and tests on one prepared directory (the same `data_filter` on every split)."""
  for split in DATA_SPLITS:
    c.data[split] = path
    if data_filter is not None:
      c.data[f"{split}_filter"] = data_filter


def base_config(mode: str = "pretrain") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = mode                     # pretrain | finetune | eval
  c.task = "pretrain" if mode == "pretrain" else "classification"  # a name of avt_jax/tasks: pretrain | classification | regression
  c.workdir = ""                    # default for --workdir
  c.seed = 0
  c.total_steps = 200
  c.num_epochs = 0.0                # > 0: total_steps = ceil(num_epochs * training clips / batch_size), set at start
  c.batch_size = 8                  # global, over all processes
  c.grad_accum_steps = 1            # micro-batches per step (batch_size must be divisible by it)
  c.eval_batch_size = 8
  c.log_every_steps = 10
  c.eval_every_steps = 100          # 0 = only at the end
  c.eval_max_batches = 0            # 0 = the whole eval split
  c.checkpoint_every_steps = 100    # 0 = only at the end
  c.keep_checkpoints = 3
  c.init_from = ""                  # pretrained run dir / checkpoint to take the encoder from
  c.select_metric = ""              # validation metric selecting the checkpoint ('' = the task's default)
  c.compilation_cache_dir = ""      # '' = ~/.cache/avt_jax/xla, 'none' = off
  c.peak_flops = 0.0                # per device, for MFU; 0 = from the device kind table
  c.allow_resume_changes = ""       # comma-separated config fields (or 'process_count') a resume may change
  c.prng_impl = ""                  # dropout / masking keys of the train step: threefry | rbg | unsafe_rbg | ''
  c.reuse_host_memory = True        # keep freed host memory for the next step (avt_jax/host_memory.py)

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.mesh.rules = ()                 # () = avt_jax.sharding.DEFAULT_RULES

  c.model = model_config("base")
  c.model.audio_frontend = dict(type="auto", dim=0, channels=(128, 128))
  c.model.visual_frontend = dict(type="auto", dim=0, channels=(16, 32, 64))

  c.data = ml_collections.ConfigDict()
  c.data.train = SAMPLE             # prepared dir, 'tfds:<name>/<split>', a mapping or a list (mixture)
  c.data.eval = SAMPLE              # validation split ('' = none)
  c.data.test = ""                  # test split: evaluated once at the end, at the selected checkpoint
  c.data.max_tokens = 16            # T: clips are cropped / zero-padded to this many tokens (5 per second)
  c.data.worker_count = 0
  c.data.device_prefetch = 2        # training batches transferred to the devices ahead of use (0 = at the step)
  c.data.normalization = "encoder"  # input statistics: encoder (init_from's, else dataset) | dataset | train | none

  # Evaluators by name (avt_jax/evaluators/<type>.py): "during" ones run every eval_every_steps and at the end,
  # the one with select=True picks the checkpoint; "final" ones run once, on that checkpoint.
  c.evals = ml_collections.ConfigDict(dict(
      eval=dict(type="task_metrics", data="eval", when="during", select=True),
      test=dict(type="task_metrics", data="test", when="final")))

  c.masking = ml_collections.ConfigDict(dict(ratio=0.05, span=3, probs=(0.8, 0.1, 0.1)))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="bert_adam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, max_grad_norm=1.0,
      per_tensor_clip=1.0, schedule="warmup_linear", warmup_fraction=0.1, end_lr=0.0,
      total_steps=ml_collections.FieldReference(None, field_type=int), param_groups=()))
  c.optimizer.total_steps = c.get_ref("total_steps")

  c.loss = ml_collections.ConfigDict(dict(regression="mse", target_indices=(0, 1),
                                          target_names=("arousal", "valence")))
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a seconds-long CPU run (tests, smoke checks)."""
  c.model.update(dict(size="tiny", width=32, num_heads=2, num_layers=1))
  c.model.audio_frontend.channels = (8, 8)
  c.model.visual_frontend.channels = (4, 8)
  c.total_steps = 6
  c.batch_size = 4
  c.eval_batch_size = 4
  c.log_every_steps = 2
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 3
  c.data.max_tokens = 8
  return c
