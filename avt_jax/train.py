"""The trainer: pretraining (masked-frame reconstruction), fine-tuning (classification / regression) and
evaluation-only runs, one loop for all of them.

Sections, in order: config checks -> mesh -> input -> model/optimizer -> sharded state -> steps -> restore ->
evaluation -> loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import linen as nn

from avt_jax import checkpointing, config_lib, input_pipeline, losses, masking, metrics, optim, records, sharding, summary
from avt_jax.models import avt

MODES = ("pretrain", "finetune", "eval")
TASKS = ("classification", "regression")


class TrainingError(RuntimeError):
  """The run cannot continue (e.g. the loss became NaN); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------------------------
# Config checks.


REQUIRED = ("mode", "total_steps", "batch_size", "seed", "log_every_steps", "eval_every_steps",
            "checkpoint_every_steps", "keep_checkpoints", "init_from", "mesh", "model", "data", "optimizer")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the config up front; raises ValueError naming the field and what was expected."""
  missing = [k for k in REQUIRED if k not in config]
  if missing:
    raise ValueError(f"config lacks required fields {missing}")
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r}; expected one of {MODES}")
  if config.mode != "pretrain" and config.get("task") not in TASKS:
    raise ValueError(f"config.task={config.get('task')!r}; expected one of {TASKS} for mode {config.mode!r}")
  for k in ("total_steps", "batch_size", "log_every_steps", "keep_checkpoints"):
    if not isinstance(config[k], int) or config[k] < 1:
      raise ValueError(f"config.{k}={config[k]!r}; expected a positive integer")
  for k in ("eval_every_steps", "checkpoint_every_steps"):
    if not isinstance(config[k], int) or config[k] < 0:
      raise ValueError(f"config.{k}={config[k]!r}; expected an integer >= 0 (0 = only at the end)")
  if config.mode == "eval" and not config.init_from:
    raise ValueError("config.mode='eval' needs config.init_from (the run to evaluate)")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the process count "
                     f"{jax.process_count()}")
  if not config.data.get("train"):
    raise ValueError("config.data.train is empty: give a prepared dataset directory (python -m data.prepare)")
  if config.data.max_tokens < 1:
    raise ValueError(f"config.data.max_tokens={config.data.max_tokens}; expected >= 1")
  accum = config.get("grad_accum_steps", 1)
  if not isinstance(accum, int) or accum < 1 or config.batch_size % accum:
    raise ValueError(f"config.grad_accum_steps={accum!r}; expected a positive divisor of batch_size "
                     f"{config.batch_size}")
  mesh_devices = math.prod(v for k, v in config.mesh.items() if k in sharding.AXES and v != -1)
  if config.batch_size % mesh_devices and -1 not in [config.mesh.get(a, 1) for a in sharding.AXES]:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the mesh size {mesh_devices}")


def geometry_from_model(config) -> input_pipeline.Geometry | None:
  """The input geometry implied by a features-kind model config with explicit widths, else None."""
  a, v = config.model.audio_frontend, config.model.visual_frontend
  if a.get("type") == v.get("type") == "features" and a.get("dim", 0) > 0 and v.get("dim", 0) > 0:
    return input_pipeline.Geometry(kind="features", audio_frames=1, audio_dim=int(a.dim), visual_frames=1,
                                   visual_dim=int(v.dim), visual_size=0, target_size=0)
  return None


def fill_model_config(config: ml_collections.ConfigDict, geometry: input_pipeline.Geometry) -> None:
  """Sets the frontends' types and the reconstruction target widths from the dataset geometry."""
  m = config.model
  with m.unlocked():
    if m.size in avt.PRESETS:   # `--config.model.size=large` sets width, heads and layers; 'custom' keeps them.
      m.update(avt.PRESETS[m.size])
    elif m.size != "custom":
      raise ValueError(f"config.model.size={m.size!r}; expected one of {sorted(avt.PRESETS)} or 'custom'")
    raw = geometry.kind == "raw"
    want_a, want_v = ("logmel", "face") if raw else ("features", "features")
    for key, want in (("audio_frontend", want_a), ("visual_frontend", want_v)):
      kind = m[key].get("type", "auto")
      if kind == "auto":
        m[key].type = want
      elif kind != want:
        raise ValueError(f"config.model.{key}.type={kind!r} does not fit the {geometry.kind!r} dataset "
                         f"(expected {want!r})")
    m.audio_target_dim = geometry.audio_dim
    m.visual_target_dim = geometry.target_size ** 2 if raw else geometry.visual_dim
    m.audio_frontend.dim = geometry.audio_dim
    m.visual_frontend.dim = geometry.visual_dim if not raw else 3


# Fields a resumed run may change without being asked: they say how long and how often, not what is trained.
# `mesh` is safe because checkpoints restore onto any mesh.
RESUME_SAFE = ("total_steps", "optimizer.total_steps", "log_every_steps", "eval_every_steps", "eval_max_batches",
               "checkpoint_every_steps", "keep_checkpoints", "compilation_cache_dir", "peak_flops", "eval_batch_size",
               "data.worker_count", "workdir", "allow_resume_changes", "mesh")
PROCESS_COUNT = "process_count"


def _flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flat_config(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def _covered(field: str, patterns) -> bool:
  return any(field == p or field.startswith(p + ".") for p in patterns)


def allowed_resume_changes(config) -> tuple[str, ...]:
  raw = config.get("allow_resume_changes", "") or ""
  items = raw.split(",") if isinstance(raw, str) else list(raw)
  return tuple(i.strip() for i in items if i.strip())


def check_resume(config, saved: Mapping[str, Any], saved_path: str, stored_processes: int | None) -> list[str]:
  """Refuses to resume when the config differs from the one the checkpoints were written with.

  `saved` is the run's config.json. Differences in RESUME_SAFE fields are allowed (and returned, to be logged);
  any other field, and a different process count (the iterator state is per process), must be named in
  config.allow_resume_changes. Raises ValueError naming each refused field with both values.
  """
  now = _flat_config(json.loads(json.dumps(config.to_dict(), default=str)))
  before = _flat_config(saved)
  allowed = allowed_resume_changes(config)
  changed, refused = [], []
  for field in sorted(set(now) | set(before)):
    a, b = before.get(field, "<absent>"), now.get(field, "<absent>")
    if a == b:
      continue
    line = f"{field}: {a!r} in {saved_path}, {b!r} now"
    (changed if _covered(field, RESUME_SAFE + allowed) else refused).append(line)
  if stored_processes is not None and stored_processes != jax.process_count():
    line = (f"{PROCESS_COUNT}: {stored_processes} in the checkpoint's iterator state, {jax.process_count()} now")
    (changed if PROCESS_COUNT in allowed else refused).append(line)
  if refused:
    names = ",".join(sorted({r.split(":")[0] for r in refused}))
    raise ValueError(
        f"cannot resume {os.path.dirname(saved_path)}: the config differs from the one its checkpoints were written "
        "with:\n  " + "\n  ".join(refused) + "\nUse a new --workdir, or, if resuming with this change is intended, "
        f"add --config.allow_resume_changes={names} (a different model can never resume; a different process count "
        "repeats the data order exactly only with data.worker_count=0).")
  return changed


# ----------------------------------------------------------------------------------------------------------------
# Model, optimizer and the sharded train state.


# Model switches that change the computation but not the parameters: a restored encoder silently accepts them.
BEHAVIOUR_KEYS = ("causal", "padding_mask", "release_positions", "scan_layers")


def warn_model_differences(init_from: str, model_cfg) -> list[str]:
  """Logs a warning for each parameter-free model switch that differs from the run `init_from` was trained with."""
  path = epath.Path(init_from) / "config.json"
  if not path.exists():
    return []
  saved = json.loads(path.read_text())
  saved = saved.get("model", saved)
  diffs = [f"{k}: {saved[k]} there, {model_cfg.get(k)} here" for k in BEHAVIOUR_KEYS
           if k in saved and saved[k] != model_cfg.get(k)]
  for d in diffs:
    logging.warning("model.%s differs from %s (the encoder was trained that way)", d, path)
  return diffs


def build_model(config) -> nn.Module:
  if config.mode == "pretrain":
    return avt.PretrainModel(config.model)
  return avt.FinetuneModel(config.model, task=config.task)


def _target_indices(config) -> list[int]:
  return list(config.get("loss", {}).get("target_indices", [0, 1]))


def create_state(config, model, dummy_batch, mesh, rules):
  """Returns (abstract state with shardings, jitted init function, optimizer, schedule)."""
  rng = jax.random.key(config.seed)

  def init_variables(key):
    k_params, k_drop = jax.random.split(key)
    return model.init({"params": k_params, "dropout": k_drop}, dummy_batch, deterministic=True)

  boxed = jax.eval_shape(init_variables, rng)["params"]
  param_shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract_params = sharding.strip_boxes(boxed)
  tx, schedule = optim.make_optimizer(config.optimizer, abstract_params)

  def init_state(key):
    params = nn.meta.unbox(init_variables(key)["params"])
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init_state, rng)
  repl = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_state["opt_state"], param_shardings,
      transform_non_params=lambda _: repl)
  state_shardings = {"step": repl, "params": param_shardings, "opt_state": opt_shardings}
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_state, state_shardings)
  init_fn = jax.jit(init_state, out_shardings=state_shardings)
  return abstract_state, state_shardings, (lambda: init_fn(rng)), tx, schedule


# ----------------------------------------------------------------------------------------------------------------
# Steps.


def make_loss_fn(config, model) -> Callable:
  """loss_fn(params, batch, rng, train) -> (loss, aux dict of scalars / arrays)."""
  mcfg = config.get("masking", ml_collections.ConfigDict(dict(ratio=0.05, span=3, probs=(0.8, 0.1, 0.1))))

  def loss_fn(params, batch, rng, train: bool):
    mask_rng, drop_rng = jax.random.split(rng)
    rngs = {"dropout": drop_rng} if train else {}
    if config.mode == "pretrain":
      masked, plan = masking.mask_batch(mask_rng, batch, ratio=mcfg.ratio, span=mcfg.span, probs=tuple(mcfg.probs))
      out = model.apply({"params": params}, masked, deterministic=not train, rngs=rngs)
      loss, aux = masking.pretrain_loss(out, batch, plan)
      return loss, aux
    out = model.apply({"params": params}, batch, deterministic=not train, rngs=rngs)["output"]
    if config.task == "classification":
      loss, n = losses.classification_loss(out, batch["label"], batch["weight"])
      return loss, {"output": out, "count": n}
    targets = batch["targets"][:, jnp.asarray(_target_indices(config))]
    kind = config.get("loss", {}).get("regression", "mse")
    fn = {"mse": losses.mse_loss, "ccc": losses.ccc_loss}.get(kind)
    if fn is None:
      raise ValueError(f"config.loss.regression={kind!r}; expected 'mse' or 'ccc'")
    loss, n = fn(out, targets, batch["weight"])
    return loss, {"output": out, "count": n}

  return loss_fn


def make_train_step(config, model, tx, schedule):
  loss_fn = make_loss_fn(config, model)

  accum = int(config.get("grad_accum_steps", 1))
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated(params, batch, rng):
    """Mean of the losses and gradients of `accum` micro-batches, one after another (lower peak memory)."""
    # Micro-batch i takes rows i, i + accum, ...: every device keeps its own rows (no resharding of the batch).
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

    def body(carry, xs):
      i, mb = xs
      (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), True)
      aux = {k: v for k, v in aux.items() if k in ("l1_audio", "l1_visual")}
      return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                                                          rng, True)))
    (loss, aux), grads = zeros
    aux = {k: v for k, v in aux.items() if k in ("l1_audio", "l1_visual")}
    (loss, aux, grads), _ = jax.lax.scan(body, (loss, aux, grads), (jnp.arange(accum), micro))
    return (loss / accum, jax.tree.map(lambda v: v / accum, aux)), jax.tree.map(lambda g: g / accum, grads)

  def train_step(state, batch, base_rng):
    rng = jax.random.fold_in(base_rng, state["step"])
    if accum > 1:
      (loss, aux), grads = accumulated(state["params"], batch, rng)
    else:
      (loss, aux), grads = grad_fn(state["params"], batch, rng, True)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    out = {"loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state["step"])}
    out.update({k: v for k, v in aux.items() if k in ("l1_audio", "l1_visual")})
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, out

  return train_step


def make_eval_step(config, model):
  """eval_step(params, batch, rng) -> sufficient statistics of this batch (summed over the global batch)."""
  loss_fn = make_loss_fn(config, model)
  if config.mode == "pretrain":
    def eval_step(params, batch, rng):
      loss, aux = loss_fn(params, batch, rng, False)
      n = aux["masked_frames"]
      return {"l1_audio": aux["l1_audio"] * n, "l1_visual": aux["l1_visual"] * n, "masked_frames": n}
    return eval_step

  def eval_step(params, batch, rng):
    loss, aux = loss_fn(params, batch, rng, False)
    out, n = aux["output"], aux["count"]
    stats = {"loss_sum": loss * n, "count": n}
    if config.task == "classification":
      stats["clips"] = n
    else:  # `count` counts known target values; a clip counts once if it has any.
      known = jnp.isfinite(batch["targets"][:, jnp.asarray(_target_indices(config))]).any(axis=1)
      stats["clips"] = jnp.sum(batch["weight"].astype(jnp.float32) * known)
    if config.task == "classification":
      stats["metrics"] = metrics.confusion_metrics(config.model.num_classes).single_from_model_output(
          logits=out, labels=batch["label"], weight=batch["weight"])
    else:
      stats["metrics"] = metrics.CCC.for_targets(tuple(config.loss.target_names)).from_model_output(
          predictions=out, targets=batch["targets"][:, jnp.asarray(_target_indices(config))],
          weight=batch["weight"])
    return stats
  return eval_step


def _merge_stats(acc, new):
  if acc is None:
    return new
  out = {}
  for k, v in new.items():
    out[k] = acc[k].merge(v) if hasattr(v, "merge") else acc[k] + v
  return out


def finish_eval(config, stats) -> dict[str, float]:
  if stats is None:
    return {}
  if config.mode == "pretrain":
    n = max(float(stats["masked_frames"]), 1.0)
    la, lv = float(stats["l1_audio"]) / n, float(stats["l1_visual"]) / n
    return {"masked_l1": la + lv, "l1_audio": la, "l1_visual": lv, "masked_frames": float(stats["masked_frames"])}
  out = {"loss": float(stats["loss_sum"]) / max(float(stats["count"]), 1.0), "clips": float(stats["clips"])}
  if config.task == "classification":
    out.update({k: float(v) for k, v in stats["metrics"].compute().items()})
  else:
    named = {k: float(v) for k, v in stats["metrics"].compute_named().items()}
    out.update(named)
    out["ccc_mean"] = float(np.mean(list(named.values())))
  return out


def data_spec(config, split: str):
  """The dataset spec of config.data.<split>, with config.data.<split>_filter (a mapping) applied to a path.

  Paths stay plain strings in configs (so --config.data.train=<dir> works); filters such as
  {"where": {"speaker": [...]}} or {"clip_ids": [...]} live in <split>_filter. A list (mixture) is used as is.
  """
  spec = config.data.get(split)
  if not spec:
    return None
  flt = config.data.get(f"{split}_filter")
  if isinstance(spec, str) and flt:
    return {"path": spec, **(flt.to_dict() if hasattr(flt, "to_dict") else dict(flt))}
  return spec.to_dict() if hasattr(spec, "to_dict") else spec


def selection(config) -> tuple[str, str]:
  """(validation metric that selects the checkpoint, 'max' or 'min')."""
  default = {"pretrain": "masked_l1", "classification": "accuracy", "regression": "ccc_mean"}
  metric = config.get("select_metric", "") or default["pretrain" if config.mode == "pretrain" else config.task]
  mode = "min" if metric in ("masked_l1", "loss", "l1_audio", "l1_visual") else "max"
  return metric, mode


# ----------------------------------------------------------------------------------------------------------------
# Metric writing: CLU writers (TensorBoard + log) and <workdir>/metrics.jsonl.


def _jsonl_writer_class():
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

  class JsonlWriter(metric_writers.MetricWriter):
    """Writes one JSON object per (step, split): {"step": .., "split": .., name: value, ...}.

    Scalar names are "<split>/<name>"; names without a split go to split "train".
    """

    def __init__(self, path: str):
      self._path = epath.Path(path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
      by_split: dict[str, dict[str, float]] = {}
      for name, value in scalars.items():
        split, _, key = name.rpartition("/")
        by_split.setdefault(split or "train", {})[key] = float(np.asarray(value))
      with self._path.open("a") as f:
        for split, vals in by_split.items():
          f.write(json.dumps({"step": int(step), "split": split, **vals}) + "\n")

    def write_summaries(self, step, values, metadata=None):
      pass

    def write_images(self, step, images):
      pass

    def write_videos(self, step, videos):
      pass

    def write_audios(self, step, audios, *, sample_rate):
      pass

    def write_texts(self, step, texts):
      pass

    def write_histograms(self, step, arrays, num_buckets=None):
      pass

    def write_hparams(self, hparams):
      pass

    def flush(self):
      pass

    def close(self):
      pass

  return JsonlWriter


def make_writer(workdir: str):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  JsonlWriter = _jsonl_writer_class()  # pylint: disable=invalid-name
  if jax.process_index() > 0:
    return metric_writers.LoggingWriter()
  return metric_writers.MultiWriter([metric_writers.create_default_writer(workdir, asynchronous=False),
                                     JsonlWriter(os.path.join(workdir, METRICS))])


METRICS = "metrics.jsonl"


def drop_metrics_after(workdir: str, step: int) -> int:
  """Rewrites <workdir>/metrics.jsonl without the rows after `step` (written by a run that did not reach its next
  checkpoint; the resumed run writes them again). Returns the number of rows dropped."""
  path = os.path.join(workdir, METRICS)
  if jax.process_index() > 0 or not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row_step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError) as e:  # A line cut by a kill mid-write: it is dropped with the rest.
      logging.warning("%s:%d: unreadable row dropped (%s)", path, n, e)
      continue
    if row_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  dropped = len([l for l in lines if l.strip()]) - len(kept)
  if dropped:
    records.write_atomic(path, "".join(kept))
    logging.info("%s: dropped %d rows after step %d (they are written again)", path, dropped, step)
  return dropped


# ----------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM sets a flag; the loop saves and exits at the next step boundary.


class StopSignal:
  def __init__(self):
    self.event = threading.Event()
    self._previous = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint at the next step boundary, then exiting", signum)
    self.event.set()

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class BestCheckpoint:
  """Keeps the parameters of the best validation result in <workdir>/best (with best.json)."""

  def __init__(self, workdir: str, metric: str, mode: str):
    self.metric, self.mode = metric, mode
    self.dir = epath.Path(workdir) / "best"
    self.record = self.dir / "best.json"
    self.step, self.value, self.metrics = None, None, {}
    if self.record.exists():
      saved = records.read_json(self.record, "best-checkpoint record")
      try:
        self.step, self.value, self.metrics = int(saved["step"]), float(saved["value"]), dict(saved["metrics"])
      except (KeyError, TypeError, ValueError) as e:
        raise records.RecordError(f"{self.record}: expected {{'step': int, 'value': float, 'metrics': {{...}}}}, "
                                  f"got {json.dumps(saved)[:200]} ({type(e).__name__}: {e})") from e

  def verify(self, abstract_params) -> None:
    """Checks that best/ holds the step best.json names and that it restores; a damaged one is moved aside.

    A save interrupted between the checkpoint and best.json, or a truncated file, leaves best/ unusable: it is
    renamed to best.damaged (kept) and the next validation result starts a new best.
    """
    if not self.dir.exists():
      return
    root = self.dir / "checkpoints"
    steps = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit()) if root.exists() else []
    reason = None
    if self.step is None:
      reason = "best.json is missing" if steps else None
    elif steps != [self.step]:
      reason = f"best.json names step {self.step} but the directory holds steps {steps}"
    else:
      try:
        checkpointing.check_params_fit(root / str(self.step) / checkpointing.STATE, abstract_params)
        self.restore(abstract_params)
      except checkpointing.CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any read failure: unusable)
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if reason is None:
      return
    moved = checkpointing.move_aside(self.dir) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("avt_jax_moved_damaged_best")
    logging.warning("%s is damaged (%s); moved it to %s: the next validation result starts a new best",
                    self.dir, reason, moved)
    self.step, self.value, self.metrics = None, None, {}

  def _better(self, value: float) -> bool:
    if not math.isfinite(value):
      return False
    if self.value is None:
      return True
    return value > self.value if self.mode == "max" else value < self.value

  def update(self, step: int, metrics_: Mapping[str, float], params) -> bool:
    if self.metric not in metrics_:
      raise KeyError(f"select_metric {self.metric!r} is not among the validation metrics {sorted(metrics_)}")
    value = float(metrics_[self.metric])
    if not self._better(value):
      return False
    manager = checkpointing.make_manager(os.fspath(self.dir), keep=1, async_save=False, with_data_iter=False)
    checkpointing.save(manager, step, {"step": jnp.asarray(step, jnp.int32), "params": params}, force=True)
    manager.wait_until_finished()
    manager.close()
    self.step, self.value, self.metrics = step, value, dict(metrics_)
    if jax.process_index() == 0:
      records.write_atomic(self.record, json.dumps({"step": step, "metric": self.metric, "mode": self.mode,
                                                    "value": value, "metrics": self.metrics}, indent=2))
    return True

  def restore(self, abstract_params):
    return checkpointing.restore_params(os.fspath(self.dir), abstract_params)

  def summary(self) -> dict[str, Any]:
    if self.step is None:
      return {}
    out = {"best/step": self.step, f"best/{self.metric}": self.value}
    out.update({f"best/validation/{k}": v for k, v in self.metrics.items()})
    return out


@jax.jit
def all_finite(tree) -> jax.Array:
  return jax.tree.reduce(lambda acc, x: acc & jnp.all(jnp.isfinite(x)), tree, jnp.asarray(True))


def _finite(x) -> bool:
  return bool(np.all(np.isfinite(np.asarray(x))))


# ----------------------------------------------------------------------------------------------------------------
# The run.


def evaluate(config, eval_fn, params, mesh, spec, max_batches: int | None = None) -> dict[str, float]:
  """One pass over the eval dataset `spec`; exact metrics from summed sufficient statistics."""
  ds = input_pipeline.make_dataset(
      spec, split="eval", global_batch_size=config.get("eval_batch_size", config.batch_size), seed=config.seed,
      max_tokens=config.data.max_tokens, worker_count=0)
  rng = jax.random.key(config.seed + 1)
  stats = None
  for i, local in enumerate(ds):
    if max_batches and i >= max_batches:
      break
    batch = sharding.global_batch(local, mesh)
    stats = _merge_stats(stats, jax.device_get(eval_fn(params, batch, jax.random.fold_in(rng, i))))
  return finish_eval(config, stats)


def setup_compilation_cache(config, workdir: str) -> None:
  cache = config.get("compilation_cache_dir", "") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "avt_jax", "xla")
  if cache.lower() == "none":
    return
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  del workdir


def open_eval_sources(config, train_sources, geometry: input_pipeline.Geometry) -> None:
  """Opens data.eval and data.test before the first step: every source is read, and fits the training data."""
  for split in ("eval", "test"):
    spec = data_spec(config, split)
    if not spec:
      continue
    sources, g = input_pipeline.open_sources(spec)
    if g != geometry:
      diff = [f"{f.name}: {getattr(geometry, f.name)} (data.train) vs {getattr(g, f.name)}"
              for f in dataclasses.fields(g) if getattr(geometry, f.name) != getattr(g, f.name)]
      raise ValueError(f"data.{split} ({', '.join(s.name for s in sources)}) does not fit data.train "
                       f"({', '.join(s.name for s in train_sources)}): "
                       + "; ".join(diff))
    for source in sources:
      if not len(source):
        raise ValueError(f"data.{split}: {source.name} has no clips (after filtering)")
      source[0]  # pylint: disable=pointless-statement  (decodes and checks one record now, not at step N)


def _final_metrics(wd: epath.Path, result: Mapping[str, Any]) -> None:
  if jax.process_index() == 0:
    records.write_atomic(wd / "final_metrics.json", json.dumps(dict(result), indent=2, default=float))


def _last_good(saver: checkpointing.SaveMonitor, manager) -> str:
  try:
    saver.check(wait=True)  # A save still in flight counts once it has committed.
  except checkpointing.CheckpointError as e:
    logging.warning("%s", e)
  if saver.last_committed is None:
    return f"No checkpoint has been saved yet in {manager.directory}."
  return f"The last good checkpoint (step {saver.last_committed}) is kept in {manager.directory}."


class Progress:
  """Throughput and ETA from training time alone: the first step after start (warm-up) is not counted."""

  def __init__(self, total_steps: int, start: int):
    self.total, self.first = total_steps, start + 1
    self.steps_timed = 0
    self.seconds = 0.0

  def step_done(self, step: int, seconds: float) -> None:
    if step > self.first:
      self.steps_timed += 1
      self.seconds += seconds

  def eta(self, step: int) -> str:
    if not self.steps_timed:
      return "ETA after the next steps"
    rate = self.steps_timed / max(self.seconds, 1e-9)
    left = (self.total - step) / rate
    return f"{rate:.2f} steps/s, ETA {int(left // 3600)}h{int(left % 3600 // 60):02d}m{int(left % 60):02d}s"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs config.mode in workdir; returns the final metrics. Resumes from workdir's latest intact checkpoint."""
  validate_config(config)
  config = ml_collections.ConfigDict(config.to_dict())  # A private, unlocked copy.
  config_lib.make_paths_absolute(config)
  workdir = config_lib.absolute_path(os.fspath(workdir))
  setup_compilation_cache(config, workdir)
  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)

  # --- Mesh.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh.get("rules"))
  logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for key in ("batch_size", "eval_batch_size"):
    if config.get(key, config.batch_size) % shards:
      raise ValueError(f"config.{key}={config.get(key)} must be divisible by the batch shards of the mesh "
                       f"(data x fsdp = {shards})")

  # --- Input: every split is opened and checked before anything is compiled or written.
  train_sources, geometry = input_pipeline.open_sources(data_spec(config, "train"))
  fill_model_config(config, geometry)
  open_eval_sources(config, train_sources, geometry)
  dummy = input_pipeline.dummy_batch(geometry, config.batch_size, config.data.max_tokens)
  dummy = {k: jnp.asarray(v) for k, v in dummy.items()}

  # --- Model, optimizer, sharded state.
  model = build_model(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state, state_shardings, init_fn, tx, schedule = create_state(config, model, dummy, mesh, rules)
  table, n_params = summary.param_table(abstract_state["params"])
  logging.info("parameters (%d):\n%s", n_params, table)

  # --- Steps.
  repl = sharding.replicated(mesh)
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in dummy}
  train_step = jax.jit(make_train_step(config, model, tx, schedule),
                       in_shardings=(state_shardings, batch_shardings, repl),
                       out_shardings=(state_shardings, repl), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(config, model), in_shardings=(state_shardings["params"], batch_shardings, repl),
                      out_shardings=repl)

  def eval_fn(params, batch, rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return eval_step(params, batch, rng)

  config_path = wd / "config.json"

  def write_config():
    # Only once the restore has succeeded: config.json always describes the model the checkpoints hold.
    if jax.process_index() == 0:
      records.write_atomic(config_path, json.dumps(config.to_dict(), indent=2, default=str))

  if config.mode == "eval":
    # Evaluation-only: the parameters of init_from (its best/, else its newest checkpoint); the workdir only
    # receives the metrics.
    logging.info("evaluating %s", config.init_from)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      params = checkpointing.restore_params(config.init_from, abstract_state["params"], prefer_best=True)
    write_config()
    writer = make_writer(workdir)
    result = {}
    for split in ("eval", "test"):
      spec = data_spec(config, split)
      if spec:
        ev = evaluate(config, eval_fn, params, mesh, spec)
        writer.write_scalars(0, {f"{split}/{k}": v for k, v in ev.items()})
        result.update({f"{split}/{k}": v for k, v in ev.items()})
    writer.flush()
    _final_metrics(wd, result)
    return result

  # --- Restore: own checkpoint (resume) > init_from (fine-tuning) > fresh init.
  def make_manager():
    return checkpointing.make_manager(workdir, keep=config.keep_checkpoints)

  manager = make_manager()
  existing = manager.all_steps()
  if existing:
    stored = checkpointing.stored_process_count(epath.Path(manager.directory) / str(max(existing)))
    if config_path.exists():
      for line in check_resume(config, records.read_json(config_path, "run config"), os.fspath(config_path),
                               stored):
        logging.warning("resuming with a changed config: %s", line)
    else:
      logging.warning("%s has checkpoints but no config.json: cannot check that the config is unchanged", workdir)
  manager.close()
  train_ds = input_pipeline.make_dataset(
      data_spec(config, "train"), split="train", global_batch_size=config.batch_size, seed=config.seed,
      max_tokens=config.data.max_tokens, worker_count=config.data.get("worker_count", 0))
  train_iter = iter(train_ds)

  def position(step):
    # Saved by another number of processes: the iterator state does not apply. Global batch k is the same for
    # any process count, so the iterator is positioned at batch `step` instead.
    logging.warning("checkpoint %d has no data-iterator state for %d processes; positioning the iterator at "
                    "batch %d", step, jax.process_count(), step)
    checkpointing.position_iterator(train_iter, step)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    manager, latest, state = checkpointing.restore_latest_intact(make_manager, abstract_state, train_iter, position)
    if latest is not None:
      logging.info("resumed from %s at step %d", manager.directory, latest)
    else:
      state = init_fn()
      if config.init_from:
        logging.info("initialising the encoder from %s", config.init_from)
        warn_model_differences(config.init_from, config.model)
        enc = checkpointing.restore_encoder(config.init_from, abstract_state["params"]["encoder"])
        params = dict(state["params"], encoder=enc)
        state = dict(state, params=jax.device_put(params, state_shardings["params"]))
  write_config()
  start = int(jax.device_get(state["step"]))
  drop_metrics_after(workdir, start)
  best = BestCheckpoint(workdir, *selection(config))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    best.verify(abstract_state["params"])
  writer = make_writer(workdir)

  # --- Compile once, ahead of time: FLOPs for throughput / MFU.
  base_rng = jax.random.key(config.seed + 2)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in dummy.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    t0 = time.time()
    compiled = train_step.lower(abstract_state, abstract_batch, base_rng).compile()
    compile_s = time.time() - t0
  # XLA's cost analysis describes the per-device program of the partitioned step.
  flops_per_step = summary.compiled_flops(compiled) * jax.device_count()
  if jax.process_count() > 1:
    # Processes compile at different speeds (cache hits); meet before the first collective.
    ocp.multihost.sync_global_processes("avt_jax_step_compiled")
  peak = summary.peak_flops(config.get("peak_flops", 0.0))
  logging.info("train step compiled in %.1fs; %.3g FLOP/step (%.3g per clip)", compile_s, flops_per_step,
               flops_per_step / config.batch_size)

  stop = StopSignal().install()
  saver = checkpointing.SaveMonitor(manager)
  progress = Progress(config.total_steps, start)
  step = start
  out = None
  eval_spec = data_spec(config, "eval")
  t_log, steps_since = time.time(), 0
  result: dict[str, Any] = {}
  try:
    while step < config.total_steps:
      saver.check()
      if stop.event.is_set() or manager.reached_preemption(step):
        logging.warning("stopping at step %d on request; saving", step)
        if step > start and _finite(jax.device_get(out["loss"])) and bool(all_finite(state["params"])):
          saver.save(step, state, train_iter)
        saver.check(wait=True)
        result["preempted_at"] = step
        return result
      t_step = time.time()
      batch = sharding.global_batch(next(train_iter), mesh)
      state, out = compiled(state, batch, base_rng)
      step += 1
      steps_since += 1
      is_last = step == config.total_steps
      if step % config.log_every_steps == 0 or is_last:
        out = jax.device_get(out)
        progress.step_done(step, time.time() - t_step)
        if not _finite(out["loss"]):
          raise TrainingError(f"loss is {out['loss']} at step {step}; stopping. {_last_good(saver, manager)}")
        dt = time.time() - t_log
        scalars = {f"train/{k}": v for k, v in out.items()}
        scalars["train/clips_per_second"] = steps_since * config.batch_size / max(dt, 1e-9)
        scalars["train/steps_per_second"] = steps_since / max(dt, 1e-9)
        if peak:
          scalars["train/mfu"] = flops_per_step * steps_since / max(dt, 1e-9) / (peak * jax.device_count())
        writer.write_scalars(step, scalars)
        logging.info("step %d/%d: loss %.4g, %s", step, config.total_steps, float(out["loss"]), progress.eta(step))
        t_log, steps_since = time.time(), 0
      else:
        progress.step_done(step, time.time() - t_step)
      do_eval = is_last or (config.eval_every_steps and step % config.eval_every_steps == 0)
      if do_eval and eval_spec:
        ev = evaluate(config, eval_fn, state["params"], mesh, eval_spec, config.get("eval_max_batches", 0))
        writer.write_scalars(step, {f"eval/{k}": v for k, v in ev.items()})
        result.update({f"eval/{k}": v for k, v in ev.items()})
        best.update(step, ev, state["params"])
      do_ckpt = is_last or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
      if do_ckpt:
        loss = jax.device_get(out["loss"])
        if not _finite(loss) or not bool(all_finite(state["params"])):
          raise TrainingError(f"loss is {loss} at step {step} (or the parameters are no longer finite); not saving. "
                              f"{_last_good(saver, manager)}")
        saver.save(step, state, train_iter)
      if do_eval or do_ckpt:
        t_log, steps_since = time.time(), 0  # Throughput counts training time only.
      writer.flush()
    saver.check(wait=True)
    result["step"] = step
    result.update(best.summary())
    test_spec = data_spec(config, "test")
    if test_spec:
      # Test metrics are computed once, at the checkpoint selected on the validation split.
      params = best.restore(abstract_state["params"]) if best.step is not None else state["params"]
      ev = evaluate(config, eval_fn, params, mesh, test_spec)
      writer.write_scalars(step, {f"test/{k}": v for k, v in ev.items()})
      result.update({f"test/{k}": v for k, v in ev.items()})
    _final_metrics(wd, result)
    return result
  finally:
    stop.uninstall()
    saver.close()
    try:
      manager.close()  # Waits for a save in flight.
    except Exception as e:  # pylint: disable=broad-except  (a failed save was reported above; do not mask it)
      logging.warning("closing the checkpoint manager of %s: %s", manager.directory, e)
    writer.flush()
