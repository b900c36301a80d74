"""Orbax checkpoints: the train state and the data iterator saved together; encoder restore for fine-tuning.

Layout of a run directory (a local path or any path Orbax/etils understands, e.g. gs://):
  <workdir>/checkpoints/<step>/state       train state {step, params, opt_state}
  <workdir>/checkpoints/<step>/data_iter   Grain iterator state (per process)
  <workdir>/config.json                    the run's full config (model config included)

`init_from` accepts a run directory, its `checkpoints/` folder, or one `checkpoints/<step>` folder, and restores
only `params/encoder` onto whatever shardings the new run asks for.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE, DATA_ITER = "state", "data_iter"


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters do not fit the model that should receive them."""


def make_manager(workdir: str, *, keep: int, save_interval_steps: int = 1, async_save: bool = True,
                 with_data_iter: bool = True) -> ocp.CheckpointManager:
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


def has_iterator_state(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint `step` holds this process's iterator state for the current process count."""
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  return (epath.Path(manager.directory) / str(step) / DATA_ITER / name).exists()


def position_iterator(data_iter, batch_index: int) -> None:
  """Moves a fresh (in-process) Grain iterator to batch `batch_index`."""
  state = data_iter.get_state()
  if not isinstance(state, dict) or "next_index" not in state:
    raise ValueError("cannot position this data iterator (prefetch workers?): resume with the process count the "
                     "checkpoint was written with, or with data.worker_count=0")
  data_iter.set_state(dict(state, next_index=int(batch_index)))


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


def restore_params(path: str, abstract: Mapping[str, Any], subtree: str | None = None,
                   prefer_best: bool = False) -> dict[str, Any]:
  """Restores `params` (or `params/<subtree>`) of a checkpoint onto `abstract` (ShapeDtypeStructs + shardings).

  Raises CheckpointMismatchError naming every missing, unexpected or mis-shaped parameter.
  """
  state_dir = resolve_state_dir(path, prefer_best)
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(state_dir)
  meta = getattr(meta, "item_metadata", meta)
  meta_tree = getattr(meta, "tree", meta)
  where = "params" + (f"/{subtree}" if subtree else "")
  stored_tree = meta_tree.get("params") if isinstance(meta_tree, Mapping) else None
  if subtree and isinstance(stored_tree, Mapping):
    stored_tree = stored_tree.get(subtree)
  if not isinstance(stored_tree, Mapping):
    raise CheckpointMismatchError(f"{state_dir}: no {where} in this checkpoint")
  stored = _flat(stored_tree)
  wanted = _flat(abstract)
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
  (d / "config.json").write_text(json.dumps(dict(config), indent=2, default=str))
  return os.fspath(d)
