"""Orbax checkpoints: the train state and the data iterator saved together; encoder restore for fine-tuning.

Layout of a run directory (a local path or any path Orbax/etils understands, e.g. gs://):
  <workdir>/checkpoints/<step>/state       train state {step, params, opt_state}
  <workdir>/checkpoints/<step>/data_iter   Grain iterator state (per process)
  <workdir>/config.json                    the run's full config (model config included)
  <workdir>/best/checkpoints/<step>/state  parameters of the step selected on validation, with best/best.json

`init_from` accepts a run directory, its `checkpoints/` folder, or one `checkpoints/<step>` folder, and restores
only `params/encoder` onto whatever shardings the new run asks for.
"""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import re
from typing import Any, Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from avt_jax import records

STATE, DATA_ITER = "state", "data_iter"


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters do not fit the model that should receive them."""


class CheckpointError(RuntimeError):
  """No intact checkpoint could be restored, or a save failed; the message says what was tried and what is kept."""


def make_manager(workdir: str, *, keep: int, save_interval_steps: int = 1, async_save: bool = True,
                 with_data_iter: bool = True) -> ocp.CheckpointManager:
  if "://" not in workdir and not os.path.isabs(workdir):
    raise ValueError(f"checkpoint directory {workdir!r} must be absolute (entry points make paths absolute)")
  names = (STATE, DATA_ITER) if with_data_iter else (STATE,)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=save_interval_steps, enable_async_checkpointing=async_save,
      create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", item_names=names, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter=None, force: bool = False) -> bool:
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iter is not None:
    items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter=None):
  """Restores the state (onto the shardings of `abstract_state`) and, if given, the iterator in place."""
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE]


def stored_process_count(directory: epath.Path | str) -> int | None:
  """The process count a checkpoint step's iterator state was written for (process_<i>-of-<n>.json), if any."""
  d = epath.Path(directory) / DATA_ITER
  if not d.exists():
    return None
  counts = {int(m.group(1)) for f in d.iterdir() if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name))}
  return max(counts) if counts else None


def has_iterator_state(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint `step` holds this process's iterator state for the current process count."""
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  return (epath.Path(manager.directory) / str(step) / DATA_ITER / name).exists()


def position_iterator(data_iter, batch_index: int) -> None:
  """Moves a fresh training iterator (Grain's in-process one or `batch_workers`', or a `sharding.DevicePrefetch` of
  either) to batch `batch_index`."""
  state = data_iter.get_state()
  encoded = isinstance(state, bytes)  # DevicePrefetch speaks Grain's JSON-bytes protocol
  state = json.loads(state) if encoded else state
  if not isinstance(state, dict) or "next_index" not in state:
    raise ValueError(f"cannot position this data iterator (its state {state!r} holds no batch position): resume "
                     "with the process count the checkpoint was written with")
  state = dict(state, next_index=int(batch_index))
  data_iter.set_state(json.dumps(state).encode() if encoded else state)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flat(v, path))
    else:
      out[path] = v
  return out


def resolve_state_dir(path: str, prefer_best: bool = False) -> epath.Path:
  """Finds the `state` item of the latest checkpoint under a run dir / checkpoints dir / step dir.

  With prefer_best, a run dir's `best/` (the checkpoint selected on validation) wins over `checkpoints/`.
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"init_from={path!r} does not exist")
  if (p / STATE).exists():
    return p / STATE
  if prefer_best and (p / "best").exists():
    p = p / "best"
  root = p / "checkpoints" if (p / "checkpoints").exists() else p
  steps = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit() and (c / STATE).exists())
  if not steps:
    raise FileNotFoundError(f"init_from={path!r}: no checkpoint found (expected {root}/<step>/{STATE})")
  return root / str(steps[-1]) / STATE


def _shape(x) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", ()))


def _stored_tree(state_dir) -> Any:
  """The stored tree (shapes, dtypes) of a `state` item, read by the item's handler: the step-level metadata
  lives one directory up, and asking a Checkpointer for it here only logs that it is missing."""
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
  return getattr(meta, "tree", meta)


def _raise_if_mismatch(state_dir, where: str, stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
  """Raises CheckpointMismatchError naming every missing, unexpected or mis-shaped parameter."""
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  misshaped = sorted(f"{k}: checkpoint {_shape(stored[k])} vs model {_shape(wanted[k])}"
                     for k in set(stored) & set(wanted) if _shape(stored[k]) != _shape(wanted[k]))
  if missing or unexpected or misshaped:
    lines = [f"checkpoint {state_dir} does not fit the model's {where}:"]
    if missing:
      lines.append(f"  missing in checkpoint ({len(missing)}): " + ", ".join(missing[:20]))
    if unexpected:
      lines.append(f"  not in model ({len(unexpected)}): " + ", ".join(unexpected[:20]))
    if misshaped:
      lines.append(f"  shape mismatch ({len(misshaped)}): " + "; ".join(misshaped[:20]))
    lines.append("  (check model.size / width / layers and the frontend types against the checkpoint's config.json)")
    raise CheckpointMismatchError("\n".join(lines))


def restore_params(path: str, abstract: Mapping[str, Any], subtree: str | None = None,
                   prefer_best: bool = False) -> dict[str, Any]:
  """Restores `params` (or `params/<subtree>`) of a checkpoint onto `abstract` (ShapeDtypeStructs + shardings).

  Raises CheckpointMismatchError naming every missing, unexpected or mis-shaped parameter.
  """
  state_dir = resolve_state_dir(path, prefer_best)
  checkpointer = ocp.PyTreeCheckpointer()
  meta_tree = _stored_tree(state_dir)
  where = "params" + (f"/{subtree}" if subtree else "")
  stored_tree = meta_tree.get("params") if isinstance(meta_tree, Mapping) else None
  if subtree and isinstance(stored_tree, Mapping):
    stored_tree = stored_tree.get(subtree)
  if not isinstance(stored_tree, Mapping):
    raise CheckpointMismatchError(f"{state_dir}: no {where} in this checkpoint")
  _raise_if_mismatch(state_dir, where, _flat(stored_tree), _flat(abstract))
  target = {"params": {subtree: abstract} if subtree else abstract}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  restored = checkpointer.restore(
      state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
  return restored["params"][subtree] if subtree else restored["params"]


def restore_encoder(path: str, abstract_encoder: Mapping[str, Any]) -> dict[str, Any]:
  """Restores params/encoder of a checkpoint (the fine-tuning `init_from`)."""
  return restore_params(path, abstract_encoder, subtree="encoder")


def save_pretrained(directory: str, params: Mapping[str, Any], config: Mapping[str, Any], step: int = 0) -> str:
  """Writes params (a full PretrainModel tree) as a checkpoint that `init_from` accepts, plus config.json."""
  d = epath.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  manager = make_manager(str(d), keep=1, async_save=False, with_data_iter=False)
  state = {"step": np.asarray(step, np.int32), "params": jax.tree.map(np.asarray, dict(params))}
  save(manager, step, state, force=True)
  manager.wait_until_finished()
  manager.close()
  records.write_atomic(d / "config.json", json.dumps(dict(config), indent=2, default=str))
  return os.fspath(d)


# ----------------------------------------------------------------------------------------------------------------
# Damaged checkpoints: found at restore time, moved aside (never deleted), the next older step tried.


def move_aside(path: epath.Path) -> epath.Path:
  """Renames a damaged checkpoint directory to <name>.damaged (or .damaged-2, ...) and returns the new path.

  Orbax only lists directories named by a step number, so the renamed one is ignored by every later run but kept
  for inspection.
  """
  target = path.parent / f"{path.name}.damaged"
  n = 1
  while target.exists():
    n += 1
    target = path.parent / f"{path.name}.damaged-{n}"
  path.rename(target)
  return target


def _reason(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:400]}" if text else type(e).__name__


def check_params_fit(state_dir: epath.Path, abstract_params: Mapping[str, Any]) -> None:
  """Raises CheckpointMismatchError if the stored parameter tree differs from `abstract_params`.

  Reads only the checkpoint's metadata. A model change is a config error, not damage: the checkpoint is kept.
  """
  tree = _stored_tree(state_dir)
  stored_tree = tree.get("params") if isinstance(tree, Mapping) else None
  if not isinstance(stored_tree, Mapping):
    raise ValueError(f"{state_dir}: the checkpoint metadata has no params")
  _raise_if_mismatch(state_dir, "params", _flat(stored_tree), _flat(abstract_params))


def restore_latest_intact(make: Callable[[], ocp.CheckpointManager], abstract_state: Any, data_iter=None,
                          on_other_process_count: Callable[[int], None] | None = None):
  """Restores the newest intact checkpoint of a manager's directory. Returns (manager, step or None, state).

  A step whose files are missing, truncated or unreadable is reported with the reason, moved to
  `<step>.damaged` and the next older step is tried. If checkpoints exist but none is intact, raises
  CheckpointError listing each step tried and why. A checkpoint of another model raises CheckpointMismatchError
  (nothing is moved). `make` builds the manager (it is rebuilt after a step is moved aside). When a step has no
  iterator state for this process count, only the state is restored and `on_other_process_count(step)` is called.
  """
  manager = make()
  tried = []
  while True:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      if tried:
        manager.close()
        raise CheckpointError(f"no intact checkpoint in {manager.directory}; tried (and moved aside):\n  " +
                              "\n  ".join(tried))
      return manager, None, None
    step = steps[0]
    step_dir = epath.Path(manager.directory) / str(step)
    try:
      check_params_fit(step_dir / STATE, abstract_state["params"])
      if data_iter is not None and has_iterator_state(manager, step):
        return manager, step, restore(manager, step, abstract_state, data_iter)
      state = restore(manager, step, abstract_state)
      if data_iter is not None and on_other_process_count is not None:
        on_other_process_count(step)
      return manager, step, state
    except CheckpointMismatchError:
      manager.close()
      raise
    except Exception as e:  # pylint: disable=broad-except  (any read failure means this step cannot be used)
      reason = _reason(e)
      manager.close()
      moved = None
      if jax.process_index() == 0:
        moved = move_aside(step_dir)
      if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"avt_jax_moved_damaged_{step}")
      tried.append(f"step {step}: {reason} (now {moved or step_dir.name + '.damaged'})")
      logging.warning("checkpoint step %d in %s is damaged (%s); moved it to %s and trying the next older step",
                      step, manager.directory, reason, moved)
      manager = make()


# ----------------------------------------------------------------------------------------------------------------
# Failed asynchronous saves: raised in the training thread at the next step boundary.


class _SaveFailureLog(logging_std.Handler):
  """Keeps the exception of the last failed background commit that Orbax logged (it raises nothing itself)."""

  def __init__(self):
    super().__init__(level=logging_std.ERROR)
    self.cause: str | None = None

  def emit(self, record):
    if "/orbax/" in record.pathname and record.exc_info and record.exc_info[1] is not None:
      self.cause = _reason(record.exc_info[1])


class SaveMonitor:
  """Saves through a manager and turns a failed save, synchronous or in the background, into CheckpointError.

  Orbax commits an asynchronous save in a background thread; when that commit fails (full disk, lost
  permission) it logs the error, leaves the step uncommitted and keeps the older checkpoints, but the training
  thread is not told. `check()` runs at every step boundary: once the pending save is over, the step must be
  committed, else the run stops with the cause. The last committed checkpoint is never touched.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self.pending: int | None = None
    self.last_committed = manager.latest_step()
    self._log = _SaveFailureLog()
    logging_std.getLogger("absl").addHandler(self._log)

  def close(self) -> None:
    logging_std.getLogger("absl").removeHandler(self._log)

  def _fail(self, step: int, cause: str):
    last = (f"the last committed checkpoint (step {self.last_committed}) is intact in {self.manager.directory}"
            if self.last_committed is not None else "no checkpoint has been committed yet")
    raise CheckpointError(f"saving checkpoint step {step} to {self.manager.directory} failed: {cause}; {last}")

  def check(self, wait: bool = False) -> None:
    if self.pending is None:
      return
    try:
      if wait:
        self.manager.wait_until_finished()
      elif self.manager.is_saving_in_progress():
        return
    except Exception as e:  # pylint: disable=broad-except
      step, self.pending = self.pending, None
      self._fail(step, self._log.cause or _reason(e))
    step, self.pending = self.pending, None
    step_dir = epath.Path(self.manager.directory) / str(step)
    if self._log.cause or not (step_dir.exists() and ocp.utils.is_checkpoint_finalized(step_dir)):
      self._fail(step, self._log.cause or "the step was not committed (see the log above)")
    self.last_committed = step

  def save(self, step: int, state: Any, data_iter=None) -> None:
    self.check(wait=True)
    if step == self.last_committed:
      return  # e.g. a stop request right after the periodic save of this step: Orbax refuses a second one
    try:
      save(self.manager, step, state, data_iter, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, self._log.cause or _reason(e))
    self.pending = step


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint selected on validation: <workdir>/best.


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
        check_params_fit(root / str(self.step) / STATE, abstract_params)
        self.restore(abstract_params)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any read failure: unusable)
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if reason is None:
      return
    moved = move_aside(self.dir) if jax.process_index() == 0 else None
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
    manager = make_manager(os.fspath(self.dir), keep=1, async_save=False, with_data_iter=False)
    save(manager, step, {"step": jnp.asarray(step, jnp.int32), "params": params}, force=True)
    manager.wait_until_finished()
    manager.close()
    self.step, self.value, self.metrics = step, value, dict(metrics_)
    if jax.process_index() == 0:
      records.write_atomic(self.record, json.dumps({"step": step, "metric": self.metric, "mode": self.mode,
                                                    "value": value, "metrics": self.metrics}, indent=2))
    return True

  def restore(self, abstract_params):
    return restore_params(os.fspath(self.dir), abstract_params)

  def summary(self) -> dict[str, Any]:
    if self.step is None:
      return {}
    out = {"best/step": self.step, f"best/{self.metric}": self.value}
    out.update({f"best/validation/{k}": v for k, v in self.metrics.items()})
    return out
