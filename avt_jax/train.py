"""The trainer: one loop for every task (pretraining, classification, regression, ...), and evaluation-only runs.

What differs between objectives lives in the task (avt_jax/tasks), what is measured in the evaluators
(avt_jax/evaluators), and how the model, its sharded state and the restore precedence are built in avt_jax/setup;
this file holds no task-specific code. Sections, in order: config checks -> input -> the train step ->
evaluation-only runs -> the training run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from avt_jax import checkpointing, config_lib, costs, evaluators, input_pipeline, records, sharding, tasks, writers
from avt_jax import setup as setup_lib

MODES = ("pretrain", "finetune", "eval")


class TrainingError(RuntimeError):
  """The run cannot continue (e.g. the loss became NaN); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------------------------
# Config checks.


REQUIRED = ("mode", "task", "total_steps", "batch_size", "seed", "log_every_steps", "eval_every_steps",
            "checkpoint_every_steps", "keep_checkpoints", "init_from", "mesh", "model", "data", "optimizer")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the config up front; raises ValueError naming the field and what was expected."""
  missing = [k for k in REQUIRED if k not in config]
  if missing:
    raise ValueError(f"config lacks required fields {missing}")
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r}; expected one of {MODES}")
  task = tasks.get(config.task)
  if config.mode != "eval" and task.train_mode != config.mode:
    raise ValueError(f"config.task={config.task!r} trains with config.mode={task.train_mode!r}, not "
                     f"{config.mode!r}")
  for k in ("total_steps", "batch_size", "log_every_steps", "keep_checkpoints"):
    if not isinstance(config[k], int) or config[k] < 1:
      raise ValueError(f"config.{k}={config[k]!r}; expected a positive integer")
  for k in ("eval_every_steps", "checkpoint_every_steps"):
    if not isinstance(config[k], int) or config[k] < 0:
      raise ValueError(f"config.{k}={config[k]!r}; expected an integer >= 0 (0 = only at the end)")
  epochs = config.get("num_epochs", 0.0)
  if not isinstance(epochs, (int, float)) or epochs < 0:
    raise ValueError(f"config.num_epochs={epochs!r}; expected a number >= 0 (0 = use total_steps)")
  if config.mode == "eval" and not config.init_from:
    raise ValueError("config.mode='eval' needs config.init_from (the run to evaluate)")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the process count "
                     f"{jax.process_count()}")
  evals = evaluators.configs(config)
  if config.mode == "eval":
    if not evals:
      raise ValueError("config.mode='eval': no evaluator has data (config.evals names splits of config.data; "
                       "give e.g. --config.data.eval=<prepared dir>)")
  elif not config.data.get("train"):
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


# Fields a resumed run may change without being asked: they say how long and how often, not what is trained.
# `mesh` is safe because checkpoints restore onto any mesh.
RESUME_SAFE = ("total_steps", "optimizer.total_steps", "log_every_steps", "eval_every_steps", "eval_max_batches",
               "checkpoint_every_steps", "keep_checkpoints", "compilation_cache_dir", "peak_flops", "eval_batch_size",
               "data.worker_count", "data.device_prefetch", "workdir", "allow_resume_changes", "mesh",
               "reuse_host_memory")
# Fields added after runs were first written, with the value that does what those runs did: absent from a saved
# config and at this value now is no change.
ADDED_FIELDS = {"prng_impl": "", "model.fused_qkv": False, "model.dropout_masks": "jax"}
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
    if a == b or (a == "<absent>" and field in ADDED_FIELDS and b == ADDED_FIELDS[field]):
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
        "continues the data order exactly).")
  return changed


# ----------------------------------------------------------------------------------------------------------------
# Input.


def _eval_specs(config, skip_train: bool = True) -> list[tuple[str, Any]]:
  """(name for messages, dataset spec) of every dataset the evaluators read (data.train excepted: it is opened
  for training)."""
  out: dict[str, Any] = {}
  for name, ev in evaluators.configs(config).items():
    for key in ("data", "fit"):
      value = ev.get(key)
      if not value or (skip_train and value == "train"):
        continue
      split = isinstance(value, str) and value in config_lib.DATA_SPLITS
      out.setdefault(f"data.{value}" if split else f"evals.{name}.{key}", evaluators.data_spec(config, value))
  return list(out.items())


def _check_fits(label: str, sources, g, reference: str, ref_sources, geometry) -> None:
  if g != geometry:
    diff = [f"{f.name}: {getattr(geometry, f.name)} ({reference}) vs {getattr(g, f.name)}"
            for f in dataclasses.fields(g) if getattr(geometry, f.name) != getattr(g, f.name)]
    raise ValueError(f"{label} ({', '.join(s.name for s in sources)}) does not fit {reference} "
                     f"({', '.join(s.name for s in ref_sources)}): " + "; ".join(diff))


def open_eval_sources(config, train_sources, geometry: input_pipeline.Geometry) -> None:
  """Opens the evaluators' data before the first step: every source is read, and fits the training data."""
  for label, spec in _eval_specs(config):
    sources, g = input_pipeline.open_sources(spec)
    _check_fits(label, sources, g, "data.train", train_sources, geometry)
    for source in sources:
      if not len(source):
        raise ValueError(f"{label}: {source.name} has no clips (after filtering)")
      source[0]  # pylint: disable=pointless-statement  (decodes and checks one record now, not at step N)


def steps_from_epochs(config, train_sources) -> None:
  """With config.num_epochs > 0, sets total_steps (and the schedule's length) from the size of the training data."""
  epochs = float(config.get("num_epochs", 0.0) or 0.0)
  if not epochs:
    return
  clips = sum(len(s) for s in train_sources)
  steps = max(1, math.ceil(epochs * clips / config.batch_size))
  logging.info("num_epochs=%g of %d training clips at batch %d: total_steps=%d", epochs, clips, config.batch_size,
               steps)
  if config.optimizer.get("total_steps") in (None, config.total_steps):
    config.optimizer.total_steps = steps
  config.total_steps = steps


# ----------------------------------------------------------------------------------------------------------------
# The train step.


# JAX's names; "threefry" is accepted for threefry2x32.
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg", "philox4x32")
# config.prng_impl='' takes the platform's entry (measured: docs/scaling.md, "Dropout randomness").
DEFAULT_PRNG_IMPL = {"cpu": "threefry2x32", "gpu": "threefry2x32", "tpu": "threefry2x32"}


def step_key(config) -> jax.Array:
  """The base key of the train step's randomness (dropout, masking), of config.prng_impl. Parameter
  initialisation keeps the default implementation, so the initial model does not depend on this choice."""
  impl = config.get("prng_impl", "") or DEFAULT_PRNG_IMPL.get(jax.default_backend(), "threefry2x32")
  impl = "threefry2x32" if impl == "threefry" else impl
  if impl not in PRNG_IMPLS:
    raise ValueError(f"config.prng_impl={impl!r}; expected one of {PRNG_IMPLS} or '' (the platform default)")
  return jax.random.key(config.seed + 2, impl=impl)


def make_train_step(task: tasks.Task, tx: optax.GradientTransformation, schedule, accum: int = 1, *,
                    finish: input_pipeline.BatchFinisher):
  """train_step(state, batch, base_rng) -> (state, scalars): the task's loss, its gradient, one optimizer update.

  `batch` is the input pipeline's stored-scale batch; `finish` turns it into the task's model batch (normalised,
  reconstruction targets) inside the step, on the devices."""
  grad_fn = jax.value_and_grad(task.loss, has_aux=True)
  logged = tuple(task.train_metrics)

  def accumulated(params, batch, rng):
    """Mean of the losses and gradients of `accum` micro-batches, one after another (lower peak memory)."""
    # Micro-batch i takes rows i, i + accum, ...: every device keeps its own rows (no resharding of the batch).
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

    def body(carry, xs):
      i, mb = xs
      (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), True)
      aux = {k: v for k, v in aux.items() if k in logged}
      return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                                                          rng, True)))
    (loss, aux), grads = zeros
    aux = {k: v for k, v in aux.items() if k in logged}
    (loss, aux, grads), _ = jax.lax.scan(body, (loss, aux, grads), (jnp.arange(accum), micro))
    return (loss / accum, jax.tree.map(lambda v: v / accum, aux)), jax.tree.map(lambda g: g / accum, grads)

  def train_step(state, batch, base_rng):
    batch = finish(batch, jnp)
    rng = jax.random.fold_in(base_rng, state["step"])
    if accum > 1:
      (loss, aux), grads = accumulated(state["params"], batch, rng)
    else:
      (loss, aux), grads = grad_fn(state["params"], batch, rng, True)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    out = {"loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state["step"])}
    out.update({k: v for k, v in aux.items() if k in logged})
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, out

  return train_step


def jit_train_step(setup: setup_lib.Setup):
  """The train step of a setup, jitted with its shardings; the state is donated. It takes the input pipeline's
  stored-scale batches (`setup.abstract_stored_batch`) and finishes them on the devices."""
  repl = sharding.replicated(setup.mesh)
  step = make_train_step(setup.task, setup.tx, setup.schedule, int(setup.config.get("grad_accum_steps", 1)),
                         finish=setup.finisher())
  batch_shardings = {k: v.sharding for k, v in setup.abstract_stored_batch.items()}
  return jax.jit(step, in_shardings=(setup.state_shardings, batch_shardings, repl),
                 out_shardings=(setup.state_shardings, repl), donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------------------------
# Run-level helpers: preemption, finiteness, progress.


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


@jax.jit
def all_finite(tree) -> jax.Array:
  return jax.tree.reduce(lambda acc, x: acc & jnp.all(jnp.isfinite(x)), tree, jnp.asarray(True))


def _finite(x) -> bool:
  return bool(np.all(np.isfinite(np.asarray(x))))


def setup_compilation_cache(config) -> None:
  """The persistent XLA cache (config.compilation_cache_dir; '' = ~/.cache/avt_jax/xla, 'none' = off)."""
  cache = config.get("compilation_cache_dir", "") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "avt_jax", "xla")
  if cache.lower() == "none":
    return
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


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


def _write_config(wd: epath.Path, config, normalization: Mapping[str, Any]) -> None:
  # Only once the restore has succeeded: config.json always describes the model the checkpoints hold, and
  # normalization.json the input scale its encoder expects (a fine-tuning run from it reads this file).
  if jax.process_index() == 0:
    records.write_atomic(wd / "config.json", json.dumps(config.to_dict(), indent=2, default=str))
    records.write_atomic(wd / setup_lib.NORMALIZATION, json.dumps(dict(normalization), indent=1))


def _prepare(config, workdir: str) -> tuple[ml_collections.ConfigDict, epath.Path, jax.sharding.Mesh]:
  """A checked private copy of the config with absolute paths, the run directory and the mesh."""
  validate_config(config)
  config = ml_collections.ConfigDict(config.to_dict())  # A private, unlocked copy.
  config_lib.make_paths_absolute(config)
  workdir = config_lib.absolute_path(os.fspath(workdir))
  setup_compilation_cache(config)
  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for key in ("batch_size", "eval_batch_size"):
    if config.get(key, config.batch_size) % shards:
      raise ValueError(f"config.{key}={config.get(key)} must be divisible by the batch shards of the mesh "
                       f"(data x fsdp = {shards})")
  return config, wd, mesh


# ----------------------------------------------------------------------------------------------------------------
# Evaluation-only runs: the parameters of init_from on every evaluator; no training data, no optimizer state.


def evaluate_only(config, wd: epath.Path, mesh) -> dict[str, Any]:
  opened = [(label, *input_pipeline.open_sources(spec)) for label, spec in _eval_specs(config, skip_train=False)]
  first, first_sources, geometry = opened[0]
  for label, sources, g in opened[1:]:
    _check_fits(label, sources, g, first, first_sources, geometry)
  setup = setup_lib.build(config, geometry, mesh=mesh, optimizer=False)
  setup.normalization = setup_lib.resolve_normalization(config, first_sources)
  evals = evaluators.build(config, setup)
  # init_from's best/ (else its newest checkpoint); a checkpoint in the workdir itself is never read.
  logging.info("evaluating %s", config.init_from)
  params = setup.restore_params(config.init_from, prefer_best=True)
  _write_config(wd, config, setup.normalization)
  writer = writers.make_writer(os.fspath(wd))
  result = {}
  for name, ev in evals.items():
    metrics_ = {f"{name}/{k}": v for k, v in ev.run(params).items()}
    writer.write_scalars(0, metrics_)
    result.update(metrics_)
  writer.flush()
  _final_metrics(wd, result)
  return result


# ----------------------------------------------------------------------------------------------------------------
# The training run.


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs config.mode in workdir; returns the final metrics. Resumes from workdir's latest intact checkpoint."""
  config, wd, mesh = _prepare(config, workdir)
  workdir = os.fspath(wd)
  if config.mode == "eval":
    return evaluate_only(config, wd, mesh)

  # --- Input: every split is opened and checked before anything is compiled or written.
  train_sources, geometry = input_pipeline.open_sources(config_lib.data_spec(config, "train"))
  open_eval_sources(config, train_sources, geometry)
  steps_from_epochs(config, train_sources)

  # --- Task, model, optimizer, sharded state, evaluators.
  setup = setup_lib.build(config, geometry, mesh=mesh)
  setup.normalization = setup_lib.resolve_normalization(config, train_sources, workdir)
  task = setup.task
  table, n_params = costs.param_table(setup.abstract_params)
  logging.info("%s task, parameters (%d):\n%s", task.name, n_params, table)
  evals = evaluators.build(config, setup)
  during = {n: e for n, e in evals.items() if e.config.get("when", "during") == "during"}
  final = {n: e for n, e in evals.items() if e.config.get("when", "during") == "final"}
  select_on = evaluators.selecting(evals)
  train_step = jit_train_step(setup)

  # --- Restore: own checkpoint (resume) > init_from (fine-tuning) > fresh init.
  def make_manager():
    return checkpointing.make_manager(workdir, keep=config.keep_checkpoints)

  config_path = wd / "config.json"
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
      config_lib.data_spec(config, "train"), split="train", global_batch_size=config.batch_size, seed=config.seed,
      max_tokens=config.data.max_tokens, worker_count=config.data.get("worker_count", 0), keys=task.batch_keys,
      normalization=setup.normalization, finish=False)
  train_iter = iter(train_ds)
  prefetch = int(config.data.get("device_prefetch", 0))
  if prefetch:
    train_iter = sharding.DevicePrefetch(train_iter, mesh, prefetch)

  def position(step):
    # Saved by another number of processes: the iterator state does not apply. Global batch k is the same for
    # any process count, so the iterator is positioned at batch `step` instead.
    logging.warning("checkpoint %d has no data-iterator state for %d processes; positioning the iterator at "
                    "batch %d", step, jax.process_count(), step)
    checkpointing.position_iterator(train_iter, step)

  with setup.scope():
    manager, _, state = setup.initial_state(make_manager, train_iter, position)
    _write_config(wd, config, setup.normalization)
    start = int(jax.device_get(state["step"]))
    writers.drop_metrics_after(workdir, start)
    best = checkpointing.BestCheckpoint(workdir, *task.selection())
    best.verify(setup.abstract_params)
    writer = writers.make_writer(workdir)

    # --- Compile once, ahead of time: FLOPs for throughput / MFU.
    base_rng = step_key(config)
    t0 = time.time()
    compiled = train_step.lower(setup.abstract_state, setup.abstract_stored_batch, base_rng).compile()
    compile_s = time.time() - t0
    # XLA's cost analysis describes the per-device program of the partitioned step.
    flops_per_step = costs.compiled_flops(compiled) * jax.device_count()
    if jax.process_count() > 1:
      # Processes compile at different speeds (cache hits); meet before the first collective.
      ocp.multihost.sync_global_processes("avt_jax_step_compiled")
    peak = costs.peak_flops(config.get("peak_flops", 0.0))
    logging.info("train step compiled in %.1fs; %.3g FLOP/step (%.3g per clip)", compile_s, flops_per_step,
                 flops_per_step / config.batch_size)

    stop = StopSignal().install()
    saver = checkpointing.SaveMonitor(manager)
    progress = Progress(config.total_steps, start)
    step = start
    out = None
    t_log, steps_since = time.time(), 0
    result: dict[str, Any] = {}
    finished = False
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
        batch = next(train_iter) if prefetch else sharding.global_batch(next(train_iter), mesh)
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
        if do_eval:
          for name, ev in during.items():
            metrics_ = ev.run(state["params"], config.get("eval_max_batches", 0))
            writer.write_scalars(step, {f"{name}/{k}": v for k, v in metrics_.items()})
            result.update({f"{name}/{k}": v for k, v in metrics_.items()})
            if name == select_on:
              best.update(step, metrics_, state["params"])
        do_ckpt = is_last or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
        if do_ckpt:
          loss = jax.device_get(out["loss"])
          if not _finite(loss) or not bool(all_finite(state["params"])):
            raise TrainingError(f"loss is {loss} at step {step} (or the parameters are no longer finite); not "
                                f"saving. {_last_good(saver, manager)}")
          saver.save(step, state, train_iter)
        if do_eval or do_ckpt:
          t_log, steps_since = time.time(), 0  # Throughput counts training time only.
        writer.flush()
      saver.check(wait=True)
      result["step"] = step
      result.update(best.summary())
      if final:
        # Final evaluators (the test split) run once, at the checkpoint selected on validation.
        params = best.restore(setup.abstract_params) if best.step is not None else state["params"]
        for name, ev in final.items():
          metrics_ = {f"{name}/{k}": v for k, v in ev.run(params).items()}
          writer.write_scalars(step, metrics_)
          result.update(metrics_)
      _final_metrics(wd, result)
      finished = True
      return result
    finally:
      stop.uninstall()
      if prefetch:
        train_iter.close()
      saver.close()
      try:
        manager.close()  # Waits for a save in flight.
      except Exception as e:  # pylint: disable=broad-except  (a failed save was reported above; do not mask it)
        logging.warning("closing the checkpoint manager of %s: %s", manager.directory, e)
      try:
        writer.flush()
      except writers.MetricsError as e:
        if finished:
          raise
        logging.warning("%s", e)  # the error that stopped the run is the one to report
