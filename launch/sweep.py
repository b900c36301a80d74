r"""Fine-tuning sweeps: folds x label fractions x seeds x init (pretrained / scratch) x learning rates.

  python -m launch.sweep --sweep=configs/sweeps/synth_table.py --workdir=<dir> [--dry_run] [--only=<substring>]
      [--noplots] [--aggregate_only] [--parallel=2] [--set=<field>=<value>]

--workdir is taken from the current directory, --sweep from the current directory or else the repository root;
relative paths inside a sweep file (config, folds, subsets, init_from, data.train / eval / test overrides) are taken
from the repository root, so a sweep file means the same from any directory. All of them are made absolute once,
before anything is written: run.json and the trainer's --workdir hold absolute paths (Orbax refuses relative ones).

A sweep file is a python module whose get_sweep() returns a dict (--sweep=<file>:<argument> calls
get_sweep(<argument>), as config files take a variant):
  config     base fine-tuning config file[:variant] (relative to the repository root or absolute)
  pretrain   optional: {"config": <file[:variant]>, "overrides": {...}} run first, once, in <workdir>/pretrain
             (its workdir is the init_from of the "pretrained" arm), or {"init_from": <existing run / checkpoint>}
  folds      folds file (data/folds/<dataset>.json); fold_names: optional subset of its folds (default: all)
  subsets    label-fraction subsets file (`python -m data.folds subsets`); None = written to <workdir>/subsets.json
             from the training data's manifest.jsonl with the sweep's fractions and seeds
  fractions, seeds, inits ("pretrained" and/or "scratch"), lrs: the axes
  overrides  fixed config overrides, dotted keys ({"total_steps": 300, "data.train": <dir>, ...})
  name       optional title of the results table
  prepare    optional {"creates": <dir>, "command": [...]}: run first (from the repository root; "python" means
             this interpreter) when <dir> does not exist, e.g. to generate a synthetic benchmark
  subsample_validation  optional (False): runs below fraction 1 also select on that fraction of the validation
             clips (stratified, drawn into <workdir>/subsets.json; needs subsets=None)
  gate       optional {"model": <metric>, "beat": <metric>, "baselines": [...]}: metrics of the pretraining run's
             final_metrics.json (lower is better); unless model < beat the table reports "pretraining did not
             learn" instead of the pretrained - scratch rows

Each run is `python -m avt_jax.main --config=configs/sweeps/run.py:<run dir>/run.json --workdir=<run dir>` with
<run dir> = <workdir>/runs/<fold>_frac<percent>_seed<seed>_<init>_lr<lr>; run.json holds the base config and every
override (fold filters, subset clip ids, seed, learning rate, init_from). Runs execute one after another; a run
whose final_metrics.json holds a JSON object is done and skipped; one whose final_metrics.json does not parse (a
torn write) gets a warning naming the file and runs again (an interrupted run resumes from its own checkpoint,
since the trainer resumes); a finished run whose run.json no longer matches the sweep is an error (use a new
--workdir). With --dry_run the run files are written and the commands printed (e.g. for a cluster), nothing is
trained. Every file the sweep writes (run.json, launch.json, subsets.json, results.*, predictions.npz) is written
whole or not at all (records.write_atomic).

Then <workdir>/results.csv (one row per run) and <workdir>/results.md: per label fraction and init, test metrics
at the validation-selected checkpoint, mean +- sample std (ddof=1) over folds x seeds, at the learning rate whose
mean validation value of select_metric (over the group's folds x seeds) is highest (ties: the smaller rate); the
test split never influences any choice. The pretrained - scratch row is the mean +- std of the paired
differences (same fold, seed and fraction, each arm at its chosen rate) with their 95% t-interval; each row
also counts the labelled clips its runs trained and selected on. Plots in <workdir>/plots/: validation
curves (mean +- std band per arm), row-normalised confusion matrices with class names (classification) or
predicted-vs-true scatter (regression) from each run's predictions.npz (written by `predict_run` after the run: test
split, selected checkpoint), the paired differences with their intervals, and the pretraining run's probe curve.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from avt_jax import config_lib, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CONFIG = os.path.join("configs", "sweeps", "run.py")
INITS = ("pretrained", "scratch")
FINAL = "final_metrics.json"
RUN_SPEC = "run.json"
LAUNCH_RECORD = "launch.json"
PREDICTIONS = "predictions.npz"
CLASSIFICATION_METRICS = (("accuracy", "accuracy"), ("uar", "UAR"), ("macro_f1", "macro-F1"))


class SweepError(ValueError):
  """The sweep file or the state of the sweep directory is not as expected."""


# --------------------------------------------------------------------------------------------------------------
# Config files and run configs.
# --------------------------------------------------------------------------------------------------------------


def resolve(path: str) -> str:
  """A path of a sweep file: absolute, or relative to the repository root."""
  return path if os.path.isabs(path) else os.path.join(REPO, path)


def sweep_file(path: str) -> str:
  """The --sweep flag ('file[:argument]'): the file from the current directory when there is such a file, else
  from the repository root; the argument (for get_sweep(argument)) is kept."""
  path, sep, arg = os.path.expanduser(path).partition(":")
  path = os.path.abspath(path) if os.path.exists(path) else resolve(path)
  return path + sep + arg


# Overrides that name files; relative ones are made absolute (from the repository root) in run.json.
PATH_KEYS = ("init_from", "data.train", "data.eval", "data.test")


def _repo_data(spec: Any) -> Any:
  """A path or dataset spec ('tfds:...', gs://..., a mapping with path / data_dir / info_dir, a list of them) with
  its local relative paths taken from the repository root, the directory the trainer runs in."""
  if isinstance(spec, str):
    if not spec or "://" in spec or spec.startswith("tfds:"):
      return spec
    return os.path.normpath(resolve(os.path.expanduser(spec)))
  if isinstance(spec, (list, tuple)):
    return [_repo_data(s) for s in spec]
  if isinstance(spec, Mapping):
    return {k: _repo_data(v) if k in ("path", "data_dir", "info_dir") else v for k, v in spec.items()}
  return spec


def absolute_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
  return {k: _repo_data(v) if k in PATH_KEYS else v for k, v in overrides.items()}


def _load_module(path: str, name: str):
  path = resolve(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(config: str):
  """get_config(variant) of a config file given as 'path[:variant]'."""
  path, _, variant = config.partition(":")
  module = _load_module(path, "_sweep_config_" + os.path.basename(path).replace(".", "_"))
  if not hasattr(module, "get_config"):
    raise SweepError(f"{path} has no get_config(): not an ml_collections config file")
  return module.get_config(variant) if variant else module.get_config()


NEW_KEYS = ("data.train_filter", "data.eval_filter", "data.test_filter")  # May be absent from a base config.


def apply_overrides(config, overrides: Mapping[str, Any]):
  """Sets dotted keys ('optimizer.lr') of an ml_collections config. Unknown keys are errors (a typo would
  otherwise be ignored by the trainer), except the data filters of NEW_KEYS."""
  for key, value in overrides.items():
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
      if part not in node and not (i == len(parts) - 1 and key in NEW_KEYS):
        raise SweepError(f"override {key!r}: the config has no field {'.'.join(parts[:i + 1])!r}")
      if i < len(parts) - 1:
        node = node[part]
    value = config_lib.from_json(value)
    try:
      if parts[-1] in node and value is not None and isinstance(node[parts[-1]], float) and isinstance(value, int):
        value = float(value)
      node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise SweepError(f"override {key}={value!r}: {e}") from e
  return config


def build_config(run_spec: Mapping[str, Any] | str):
  """The ml_collections config of one run: its base config file with the run's overrides (run.json or dict)."""
  if isinstance(run_spec, str):
    run_spec = records.read_json(run_spec, what="run spec")
  config = load_config_file(run_spec["config"])
  return apply_overrides(config, run_spec.get("overrides", {}))


# --------------------------------------------------------------------------------------------------------------
# Sweep expansion.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  fold: str
  fraction: float
  seed: int
  init: str
  lr: float
  spec: dict  # run.json content
  # Labelled clips the run trains on and selects its checkpoint on (None when the manifest was not read).
  train_labels: int | None = None
  validation_labels: int | None = None

  def dir(self, workdir: str) -> str:
    return os.path.join(workdir, "runs", self.name)


def run_name(fold: str, fraction: float, seed: int, init: str, lr: float) -> str:
  return f"{fold}_frac{int(round(fraction * 100)):03d}_seed{seed}_{init}_lr{lr:.0e}"


def load_sweep(path: str) -> dict[str, Any]:
  """The checked sweep of 'file[:argument]' (the argument goes to get_sweep(argument), as for config files)."""
  path, sep, arg = path.partition(":")
  module = _load_module(path, "_sweep_" + os.path.basename(path).replace(".", "_"))
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} has no get_sweep()")
  sweep = dict(module.get_sweep(arg) if sep else module.get_sweep())
  sweep.setdefault("name", os.path.splitext(os.path.basename(path))[0])
  for key in ("config", "folds", "fractions", "seeds", "lrs"):
    if key not in sweep:
      raise SweepError(f"{path}: get_sweep() lacks {key!r}")
  sweep.setdefault("inits", INITS)
  sweep.setdefault("overrides", {})
  sweep.setdefault("pretrain", None)
  sweep.setdefault("subsets", None)
  sweep.setdefault("subsample_validation", False)
  sweep.setdefault("gate", None)
  sweep.setdefault("prepare", None)
  if sweep["subsample_validation"] and sweep["subsets"]:
    raise SweepError(f"{path}: subsample_validation draws its validation subsets into <workdir>/subsets.json; "
                     "leave subsets=None")
  bad = [i for i in sweep["inits"] if i not in INITS]
  if bad:
    raise SweepError(f"{path}: inits {bad} not in {INITS}")
  if "pretrained" in sweep["inits"] and not sweep["pretrain"]:
    raise SweepError(f"{path}: the 'pretrained' arm needs pretrain={{'config': ...}} or {{'init_from': ...}}")
  for f in sweep["fractions"]:
    if not 0 < float(f) <= 1:
      raise SweepError(f"{path}: fraction {f} must be in (0, 1]")
  # The run specs hold absolute paths: the in-process prediction pass then opens the same files as the trainer.
  sweep["overrides"] = absolute_overrides(sweep["overrides"])
  if sweep["pretrain"]:
    p = sweep["pretrain"] = dict(sweep["pretrain"])
    if p.get("init_from"):
      p["init_from"] = _repo_data(p["init_from"])
    else:
      p["overrides"] = absolute_overrides(p.get("overrides", {}))
  return sweep


def pretrain_dir(sweep: Mapping[str, Any], workdir: str) -> str | None:
  p = sweep.get("pretrain")
  if not p:
    return None
  if p.get("init_from"):
    return p["init_from"]  # Absolute (load_sweep).
  return os.path.join(os.path.abspath(workdir), "pretrain")


def pretrain_spec(sweep: Mapping[str, Any]) -> dict | None:
  p = sweep.get("pretrain")
  if not p or p.get("init_from"):
    return None
  return {"name": "pretrain", "config": p["config"], "overrides": dict(p.get("overrides", {}))}


def subsets_path(sweep: Mapping[str, Any], workdir: str) -> str:
  return resolve(sweep["subsets"]) if sweep.get("subsets") else os.path.join(os.path.abspath(workdir),
                                                                               "subsets.json")


def ensure_subsets(sweep: Mapping[str, Any], workdir: str, train_data: str, task: str = "classification",
                   target_indices: Sequence[int] = (0, 1)) -> dict[str, Any]:
  """Loads the sweep's subsets file; writes <workdir>/subsets.json first when the sweep names none.

  The written subsets are stratified by class for classification and by binned targets for regression.
  """
  from data import folds as folds_lib  # pylint: disable=g-import-not-at-top
  path = subsets_path(sweep, workdir)
  if sweep.get("subsets") or os.path.exists(path):
    return folds_lib.load_subsets(path)
  rows = folds_lib.read_manifest(train_data)
  data = folds_lib.make_subsets(rows, folds_lib.load_folds(resolve(sweep["folds"])),
                                fractions=sorted({float(f) for f in sweep["fractions"]} | {1.0}),
                                seeds=list(sweep["seeds"]), folds_name=sweep["folds"],
                                stratify="label" if task == "classification" else "targets",
                                target_indices=list(target_indices),
                                validation=bool(sweep.get("subsample_validation")))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  records.write_atomic(path, json.dumps(data) + "\n")
  return data


def expand(sweep: Mapping[str, Any], workdir: str, subsets: Mapping[str, Any] | None = None,
           rows: Sequence[Mapping[str, Any]] | None = None, labelled=None) -> list[Run]:
  """Every run of the sweep, in a fixed order (fold, fraction, seed, init, lr).

  With the training data's manifest `rows` and `labelled(row) -> bool`, each run counts the labelled clips it
  trains and selects on.
  """
  from data import folds as folds_lib  # pylint: disable=g-import-not-at-top
  folds = folds_lib.load_folds(resolve(sweep["folds"]))
  names = list(sweep.get("fold_names") or [f["name"] for f in folds["folds"]])
  init_from = pretrain_dir(sweep, workdir)
  runs = []
  for fold in names:
    for fraction in sweep["fractions"]:
      fraction = float(fraction)
      for seed in sweep["seeds"]:
        ids = val_ids = None
        if fraction < 1:
          if subsets is None:
            raise SweepError("fractions below 1 need a subsets file")
          ids = folds_lib.subset_ids(subsets, fold, int(seed), fraction)
          if sweep.get("subsample_validation"):
            val_ids = folds_lib.subset_ids(subsets, fold, int(seed), fraction, split="validation")
        filters = folds_lib.fold_filters(folds, fold, ids, val_ids)
        counts = [None, None]
        if rows is not None:
          parts = folds_lib.split_rows(rows, folds, fold)
          for i, (split, chosen) in enumerate((("train", ids), ("validation", val_ids))):
            keep = set(chosen) if chosen is not None else None
            counts[i] = sum(1 for r in parts[split] if labelled(r) and (keep is None or r["clip_id"] in keep))
        for init in sweep["inits"]:
          for lr in sweep["lrs"]:
            overrides = dict(sweep["overrides"])
            overrides.update({f"data.{k}": _jsonable(v) for k, v in filters.items()})
            overrides.update({"seed": int(seed), "optimizer.lr": float(lr),
                              "init_from": init_from if init == "pretrained" else ""})
            name = run_name(fold, fraction, int(seed), init, float(lr))
            spec = {"name": name, "config": sweep["config"], "overrides": overrides,
                    "meta": {"fold": fold, "fraction": fraction, "seed": int(seed), "init": init, "lr": float(lr)}}
            runs.append(Run(name, fold, fraction, int(seed), init, float(lr), spec, *counts))
  if len({r.name for r in runs}) != len(runs):
    raise SweepError("run names are not unique (repeated fold, fraction, seed or lr?)")
  return runs


def _jsonable(value: Any) -> Any:
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  return value


# --------------------------------------------------------------------------------------------------------------
# Execution.
# --------------------------------------------------------------------------------------------------------------


def command(run_dir: str) -> list[str]:
  """The trainer command of a run directory holding run.json."""
  return [sys.executable, "-m", "avt_jax.main", f"--config={os.path.join(REPO, RUN_CONFIG)}:"
          f"{os.path.join(run_dir, RUN_SPEC)}", f"--workdir={run_dir}"]


def write_spec(run_dir: str, spec: Mapping[str, Any]) -> None:
  """Writes run.json; refuses if the run was started (or finished) under a different spec."""
  path = os.path.join(run_dir, RUN_SPEC)
  new = json.loads(json.dumps(spec))
  if os.path.exists(path):
    started = set(os.listdir(run_dir)) - {RUN_SPEC}
    try:
      old = records.read_json(path, what="run spec")
    except records.RecordError as e:
      if started:
        raise SweepError(f"{e}; cannot tell whether {run_dir} was started with this sweep's spec: use a new "
                         f"--workdir or delete that run") from e
      old = None  # Never started: the spec is simply written again.
    if old == new:
      return  # Unchanged: a finished run's files are left untouched.
    if started:
      if not isinstance(old, dict):
        raise SweepError(f"{path}: expected a JSON object (the run spec), got {type(old).__name__}; use a new "
                         f"--workdir or delete that run")
      # Relative data paths of older run specs meant the same files (the trainer runs in the repository root).
      old = dict(old, overrides=absolute_overrides(old.get("overrides", {})))
      if old != new:
        changed = sorted(k for k in set(old["overrides"]) | set(new.get("overrides", {}))
                         if old["overrides"].get(k) != new.get("overrides", {}).get(k))
        if old.get("config") != new.get("config"):
          changed.insert(0, "config")
        raise SweepError(f"{run_dir} was started with a different spec (changed: {changed[:8]}); use a new "
                         f"--workdir or delete that run")
  os.makedirs(run_dir, exist_ok=True)
  records.write_atomic(path, json.dumps(spec, indent=1))


def read_final(run_dir: str) -> tuple[dict[str, Any] | None, str]:
  """(final metrics, "") of a finished run; (None, "") without final_metrics.json; (None, why) when it does not
  parse as a JSON object (e.g. torn by a kill mid-write): such a run is not done."""
  path = os.path.join(run_dir, FINAL)
  if not os.path.exists(path):
    return None, ""
  try:
    metrics = records.read_json(path, what="final metrics file")
  except records.RecordError as e:
    return None, str(e)
  if not isinstance(metrics, dict):
    return None, f"{path}: expected a JSON object of metrics, got {type(metrics).__name__}"
  return metrics, ""


def is_done(run_dir: str) -> bool:
  return read_final(run_dir)[0] is not None


def execute(run_dir: str, log=print) -> tuple[int, float]:
  """Runs the trainer on run_dir/run.json as a subprocess (output to run_dir/log.txt). Returns (rc, seconds)."""
  cmd = command(run_dir)
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  t0 = time.time()
  with open(os.path.join(run_dir, "log.txt"), "ab") as out:
    rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  wall = time.time() - t0
  record = {"rc": rc, "wall_s": round(wall, 1), "command": cmd}
  records.write_atomic(os.path.join(run_dir, LAUNCH_RECORD), json.dumps(record, indent=1))
  if rc == 0 and not is_done(run_dir):
    log(f"  {run_dir}: the trainer exited without {FINAL} (preempted?); re-run the sweep to resume it")
    rc = -1
  return rc, wall


def parse_set(items: Sequence[str]) -> dict[str, Any]:
  """--set=key=value flags as overrides; a value is read as JSON when it parses (2, 1e-3, true), else as text."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SweepError(f"--set={item!r}: expected <dotted config field>=<value>, e.g. --set=total_steps=2")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def prepare_data(sweep: Mapping[str, Any], log=print) -> None:
  """Runs the sweep's `prepare` command ({"creates": <dir>, "command": [...]}) when <dir> does not exist yet."""
  prep = sweep.get("prepare")
  if not prep:
    return
  creates = resolve(prep["creates"])
  if os.path.exists(creates):
    return
  cmd = [sys.executable if c == "python" else c for c in prep["command"]]
  log(f"preparing {creates}: {' '.join(shlex.quote(c) for c in cmd)}")
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  rc = subprocess.call(cmd, cwd=REPO, env=env)
  if rc != 0 or not os.path.exists(creates):
    raise SweepError(f"the sweep's prepare command failed (rc {rc}) or did not write {creates}: {cmd}")


def _labelled_rows(train_data: Any, task: str, target_indices: Sequence[int]):
  """(manifest rows, labelled(row)) of a local prepared training directory, or (None, None)."""
  from data import folds as folds_lib  # pylint: disable=g-import-not-at-top
  if not isinstance(train_data, str) or not os.path.exists(os.path.join(resolve(train_data), "manifest.jsonl")):
    return None, None
  rows = folds_lib.read_manifest(resolve(train_data))
  ids = set(folds_lib.strata(rows, "label" if task == "classification" else "targets", target_indices))
  return rows, lambda r: r["clip_id"] in ids


def run_sweep(sweep_path: str, workdir: str, *, dry_run: bool = False, only: str = "", plots: bool = True,
              aggregate_only: bool = False, log=print, extra_overrides: Mapping[str, Any] | None = None,
              parallel: int = 1) -> dict[str, Any]:
  """Runs (or prints) every run of a sweep, then aggregates. Returns {"launched", "skipped", "failed", ...}.

  `extra_overrides` (the --set flags) are added to the overrides of every run and of the pretraining run.
  `parallel` fine-tuning runs execute at a time (after the pretraining run, which they need).
  """
  # Absolute before anything is written: run specs, trainer --workdir flags and init_from all derive from these.
  workdir = os.path.abspath(os.path.expanduser(workdir))
  sweep = load_sweep(sweep_file(sweep_path))
  if extra_overrides:
    extra = absolute_overrides(extra_overrides)
    sweep["overrides"].update(extra)
    if sweep["pretrain"] and not sweep["pretrain"].get("init_from"):
      sweep["pretrain"]["overrides"] = {**sweep["pretrain"].get("overrides", {}), **extra}
  os.makedirs(workdir, exist_ok=True)
  prepare_data(sweep, log)
  base = load_config_file(sweep["config"])
  base = apply_overrides(base, sweep["overrides"])
  target_indices = list(base.loss.get("target_indices", (0, 1)))
  subsets = None
  if any(float(f) < 1 for f in sweep["fractions"]):
    subsets = ensure_subsets(sweep, workdir, resolve(base.data.train), base.task, target_indices)
  rows, labelled = _labelled_rows(base.data.train, base.task, target_indices)
  runs = [r for r in expand(sweep, workdir, subsets, rows, labelled) if only in r.name]
  stats = {"launched": [], "skipped": [], "failed": [], "commands": []}
  t_start = time.time()

  todo = []
  pre = pretrain_spec(sweep)
  if pre and any(r.init == "pretrained" for r in runs) and not aggregate_only:
    todo.append(("pretrain", pretrain_dir(sweep, workdir), pre))
  todo.extend((r.name, r.dir(workdir), r.spec) for r in runs)
  init_from = pretrain_dir(sweep, workdir)
  if (not pre and not dry_run and not aggregate_only and any(r.init == "pretrained" for r in runs)
      and "://" not in init_from and not os.path.exists(init_from)):
    raise SweepError(f"the pretrained arm's init_from {init_from} does not exist (sweep pretrain={sweep['pretrain']})")
  if not aggregate_only:
    for _, run_dir, spec in todo:  # All specs first: a conflict stops the sweep before anything runs.
      write_spec(run_dir, spec)
    pending = []
    for k, (name, run_dir, _) in enumerate(todo):
      final, problem = read_final(run_dir)
      if final is not None:
        stats["skipped"].append(name)
        continue
      if problem:
        log(f"warning: {problem}; {name} is not done and runs again (the trainer resumes from its checkpoints)")
      cmd = command(run_dir)
      stats["commands"].append(cmd)
      if dry_run:
        log(f"cd {shlex.quote(REPO)} && " + " ".join(shlex.quote(c) for c in cmd))
      else:
        pending.append((k, name, run_dir))

    def launch(item):
      k, name, run_dir = item
      log(f"[{k + 1}/{len(todo)}] {name} ...")
      rc, wall = execute(run_dir, log)
      stats["launched"].append(name)
      if rc != 0:
        stats["failed"].append(name)
        log(f"  FAILED (rc {rc}) after {wall:.0f}s: see {os.path.join(run_dir, 'log.txt')}")
      else:
        log(f"  {name} done in {wall:.0f}s")
      return rc

    if pending and pending[0][1] == "pretrain":  # Every pretrained run needs it: first, alone.
      if launch(pending.pop(0)) != 0:
        raise SweepError(f"pretraining failed: see {os.path.join(pretrain_dir(sweep, workdir), 'log.txt')}")
    if parallel > 1 and len(pending) > 1:
      with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(launch, pending))
    else:
      for item in pending:
        launch(item)
  if dry_run:
    return stats

  select = base.get("select_metric", "") or ("accuracy" if base.task == "classification" else "ccc_mean")
  rows = collect(runs, workdir, log=log)
  table = aggregate(rows, select, title=sweep["name"], target_names=tuple(base.loss.target_names),
                    gate=read_gate(sweep, workdir))
  write_results(workdir, rows, table)
  if plots:
    try:
      make_plots(workdir, runs, rows, table, select, base.task, log=log, class_names=_class_names(base),
                 pretrain=pretrain_dir(sweep, workdir) if pre else None)
    except Exception as e:  # Plots are a convenience: a failure there must not hide the table.
      log(f"plots failed ({type(e).__name__}: {e})")
  stats["wall_s"] = time.time() - t_start
  stats["table"] = table
  log(table["markdown"])
  if stats["failed"]:
    log(f"{len(stats['failed'])} runs failed: {stats['failed']}")
  return stats


# --------------------------------------------------------------------------------------------------------------
# Aggregation.
# --------------------------------------------------------------------------------------------------------------


def collect(runs: Sequence[Run], workdir: str, log=print) -> list[dict[str, Any]]:
  """One row per run: axes, status (done / unreadable / failed / missing), wall time, validation (val_*) and test
  (test_*) metrics. A run whose final_metrics.json does not parse is 'unreadable' and left out of the table."""
  rows = []
  for r in runs:
    d = r.dir(workdir)
    row = {"name": r.name, "fold": r.fold, "fraction": r.fraction, "seed": r.seed, "init": r.init, "lr": r.lr,
           "train_labels": r.train_labels, "validation_labels": r.validation_labels}
    metrics, problem = read_final(d)
    if metrics is not None:
      row["status"] = "done"
      row["best_step"] = metrics.get("best/step")
      for k, v in sorted(metrics.items()):
        if k.startswith("best/validation/"):
          row["val_" + k[len("best/validation/"):]] = v
        elif k.startswith("test/"):
          row["test_" + k[len("test/"):]] = v
    elif problem:
      row["status"] = "unreadable"
      log(f"warning: {problem}; {r.name} is left out of the table")
    else:
      row["status"] = "failed" if os.path.exists(os.path.join(d, LAUNCH_RECORD)) else "missing"
    launch = os.path.join(d, LAUNCH_RECORD)
    if os.path.exists(launch):
      try:
        record = records.read_json(launch, what="launch record")
        if not isinstance(record, dict):
          raise records.RecordError(f"{launch}: expected a JSON object, got {type(record).__name__}")
        row["wall_s"] = record.get("wall_s")
      except records.RecordError as e:  # Bookkeeping only: the table does not need it.
        log(f"warning: {e}; no wall time for {r.name}")
    rows.append(row)
  return rows


def _metric_columns(rows: Sequence[Mapping[str, Any]], target_names: Sequence[str]) -> list[tuple[str, str, bool]]:
  """(row key, header, is_percent) of the reported test metrics."""
  keys = {k for r in rows for k in r}
  if "test_accuracy" in keys:
    return [(f"test_{k}", h, True) for k, h in CLASSIFICATION_METRICS if f"test_{k}" in keys]
  cols = [(f"test_ccc_{n}", f"CCC {n}", False) for n in target_names if f"test_ccc_{n}" in keys]
  if "test_ccc_mean" in keys:
    cols.append(("test_ccc_mean", "CCC mean", False))
  return cols


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
  """(mean, sample std, low, high): the t-interval of the mean paired difference (n - 1 degrees of freedom)."""
  from scipy import stats as st  # pylint: disable=g-import-not-at-top
  d = np.asarray(diffs, np.float64)
  mean, std = _mean_std(d)
  if len(d) < 2:
    return mean, std, float("nan"), float("nan")
  half = float(st.t.ppf(0.5 + level / 2, len(d) - 1)) * std / math.sqrt(len(d))
  return mean, std, mean - half, mean + half


def _count_range(values: Sequence[Any]) -> str:
  v = sorted({int(x) for x in values if x is not None})
  if not v:
    return "–"
  return f"{v[0]}" if len(v) == 1 else f"{v[0]}–{v[-1]}"


def read_gate(sweep: Mapping[str, Any], workdir: str) -> dict[str, Any] | None:
  """The pretraining gate: the pretraining run's final `model` metric against its `baselines`.

  sweep["gate"] = {"model": "eval/zeroed_l1", "beat": "eval/zeroed_l1_past_mean", "baselines": [...]} (lower is
  better). Returns {"passed": bool | None, "values": {metric: value}, "why": str} (passed None: not readable).
  """
  g = sweep.get("gate")
  if not g or not sweep.get("pretrain"):
    return None
  run_dir = pretrain_dir(sweep, workdir)
  path = os.path.join(run_dir, FINAL)
  metrics, problem = read_final(run_dir)
  names = [g["model"], g["beat"], *g.get("baselines", ())]
  if metrics is None or any(n not in metrics for n in names):
    return {"passed": None, "values": {}, "why": problem or f"{path} lacks {[n for n in names if n not in (metrics or {})]}"}
  values = {n: float(metrics[n]) for n in dict.fromkeys(names)}
  passed = values[g["model"]] < values[g["beat"]]
  return {"passed": passed, "values": values, "step": metrics.get("step"),
          "why": f"{g['model']} {values[g['model']]:.4f} {'<' if passed else '>='} {g['beat']} {values[g['beat']]:.4f}"}


def _fmt(mean: float, std: float, percent: bool, signed: bool = False) -> str:
  scale, digits = (100.0, 1) if percent else (1.0, 3)
  sign = "+" if signed else ""
  m = f"{mean * scale:{sign}.{digits}f}"
  return m if math.isnan(std) else f"{m} ± {std * scale:.{digits}f}"


def choose_lr(rows: Sequence[Mapping[str, Any]], select: str) -> float | None:
  """The learning rate with the highest mean validation `select` over its finished runs (ties: smaller)."""
  key = "val_" + select
  by_lr = {}
  for r in rows:
    if r.get("status") == "done" and r.get(key) is not None and math.isfinite(float(r[key])):
      by_lr.setdefault(float(r["lr"]), []).append(float(r[key]))
  if not by_lr:
    return None
  lower_is_better = select in ("loss", "masked_l1")
  return sorted(by_lr, key=lambda lr: ((np.mean(by_lr[lr]) if lower_is_better else -np.mean(by_lr[lr])), lr))[0]


def aggregate(rows: Sequence[Mapping[str, Any]], select: str, title: str = "",
              target_names: Sequence[str] = ("arousal", "valence"), gate: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
  """The results table (see the module docstring). Returns {"groups": [...], "markdown": str}."""
  cols = _metric_columns(rows, target_names)
  fractions = sorted({float(r["fraction"]) for r in rows})
  inits = [i for i in INITS if any(r["init"] == i for r in rows)]
  groups = []
  lines = [f"# {title}" if title else "# Results", "",
           f"Test metrics at the checkpoint selected on validation `{select}`; mean ± sample std over folds × "
           "seeds (n); learning rate chosen per (labels, init) by the mean validation "
           f"`{select}`. Difference row: paired over (fold, seed), mean ± std [95% t-interval]. Labels: labelled "
           "clips used for training / for checkpoint selection per run (range over folds × seeds).", ""]
  if gate is not None:
    if gate["passed"] is None:
      lines += [f"Pretraining gate: not readable ({gate['why']}); no comparison is reported.", ""]
    else:
      vals = ", ".join(f"`{k}` {v:.4f}" for k, v in gate["values"].items())
      verdict = "passed" if gate["passed"] else "**failed: pretraining did not learn**"
      lines += [f"Pretraining gate {verdict} ({gate['why']}; held-out pool, step {gate.get('step')}: {vals}).", ""]
  compare = gate is None or bool(gate["passed"])
  lines += ["| labels | init | lr | n | labels train / val | " + " | ".join(h for _, h, _ in cols) + " |",
            "|---|---|---|---|---|" + "---|" * len(cols)]
  for fraction in fractions:
    chosen = {}
    for init in inits:
      part = [r for r in rows if float(r["fraction"]) == fraction and r["init"] == init]
      lr = choose_lr(part, select)
      done = [r for r in part if r.get("status") == "done" and lr is not None and float(r["lr"]) == lr]
      chosen[init] = {(r["fold"], r["seed"]): r for r in done}
      g = {"fraction": fraction, "init": init, "lr": lr, "n": len(done), "expected": len(
          {(r["fold"], r["seed"]) for r in part}), "metrics": {},
           "train_labels": _count_range([r.get("train_labels") for r in part]),
           "validation_labels": _count_range([r.get("validation_labels") for r in part])}
      cells = []
      for key, _, pct in cols:
        vals = [float(r[key]) for r in done if r.get(key) is not None]
        if vals:
          g["metrics"][key] = _mean_std(vals)
          cells.append(_fmt(*g["metrics"][key], pct))
        else:
          cells.append("–")
      groups.append(g)
      n = f"{g['n']}" if g["n"] == g["expected"] else f"{g['n']}/{g['expected']}"
      lines.append(f"| {fraction * 100:g}% | {init} | {'–' if lr is None else f'{lr:g}'} | {n} | "
                   f"{g['train_labels']} / {g['validation_labels']} | " + " | ".join(cells) + " |")
    if len(inits) == 2:
      pairs = sorted(set(chosen["pretrained"]) & set(chosen["scratch"]))
      g = {"fraction": fraction, "init": "pretrained - scratch", "lr": None, "n": len(pairs), "metrics": {},
           "intervals": {}}
      cells = []
      for key, _, pct in cols:
        diffs = [float(chosen["pretrained"][p][key]) - float(chosen["scratch"][p][key]) for p in pairs
                 if chosen["pretrained"][p].get(key) is not None and chosen["scratch"][p].get(key) is not None]
        if diffs:
          mean, std, lo, hi = paired_interval(diffs)
          g["metrics"][key] = (mean, std)
          g["intervals"][key] = (lo, hi)
          scale, digits = (100.0, 1) if pct else (1.0, 3)
          ci = "" if math.isnan(lo) else f" [{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"
          cells.append(_fmt(mean, std, pct, signed=True) + ci)
        else:
          cells.append("–")
      groups.append(g)
      if not compare:
        cells = ["pretraining did not learn"] + [""] * (len(cells) - 1)
      lines.append(f"| {fraction * 100:g}% | **pretrained − scratch** | | {len(pairs)} | | " + " | ".join(cells) + " |")
  lines.append("")
  if any(pct for _, _, pct in cols):
    lines.append("Accuracy (WAR), UAR and macro-F1 in percent; differences in percentage points.")
  else:
    lines.append("CCC computed over all test clips of a fold, then averaged over folds × seeds.")
  return {"groups": groups, "markdown": "\n".join(lines) + "\n", "gate": gate}


def write_results(workdir: str, rows: Sequence[Mapping[str, Any]], table: Mapping[str, Any]) -> None:
  fixed = ["name", "fold", "fraction", "seed", "init", "lr", "status", "best_step", "wall_s", "train_labels",
           "validation_labels"]
  extra = sorted({k for r in rows for k in r} - set(fixed))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=fixed + extra, lineterminator="\n")
  writer.writeheader()
  for r in rows:
    writer.writerow({k: r.get(k, "") for k in fixed + extra})
  for name, text in (("results.csv", buf.getvalue()), ("results.md", table["markdown"])):
    records.write_atomic(os.path.join(workdir, name), text)


# --------------------------------------------------------------------------------------------------------------
# Predictions and plots.
# --------------------------------------------------------------------------------------------------------------


def predict_run(run_dir: str) -> dict[str, np.ndarray]:
  """Test-split outputs of a finished run at its selected checkpoint (<run_dir>/best), cached in predictions.npz.

  Keys: output [N, classes] logits or [N, K] predicted attributes, label [N], targets [N, K] (the configured
  target columns). Padding clips of the last batch are dropped.
  """
  path = os.path.join(run_dir, PREDICTIONS)
  if os.path.exists(path):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  import jax  # pylint: disable=g-import-not-at-top
  from avt_jax import input_pipeline, sharding  # pylint: disable=g-import-not-at-top
  from avt_jax import setup as setup_lib  # pylint: disable=g-import-not-at-top

  config = build_config(os.path.join(run_dir, RUN_SPEC))
  spec = config_lib.data_spec(config, "test")
  if not spec:
    raise SweepError(f"{run_dir}: the run has no test split")
  _, geometry = input_pipeline.open_sources(spec)
  bs = int(config.get("eval_batch_size", config.batch_size))
  setup = setup_lib.build(config, geometry, optimizer=False, batch_size=bs,
                          mesh=sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  params = setup.restore_params(run_dir, prefer_best=True)
  predict = jax.jit(setup.task.predict)
  # The labels and targets come along with the task's own keys, for the plots.
  keys = tuple(dict.fromkeys(setup.task.batch_keys + ("label", "targets", "weight")))
  ds = input_pipeline.make_dataset(spec, split="eval", global_batch_size=bs, seed=0, max_tokens=setup.max_tokens,
                                   process_index=0, process_count=1, keys=keys,
                                   normalization=setup_lib.saved_normalization(run_dir))
  outs, labels, targets, weights = [], [], [], []
  with setup.scope():
    for batch in ds:
      outs.append(np.asarray(predict(params, {k: np.asarray(batch[k]) for k in setup.task.batch_keys})))
      labels.append(batch["label"])
      targets.append(batch["targets"])
      weights.append(batch["weight"])
  keep = np.concatenate(weights) > 0
  idx = list(getattr(setup.task, "target_indices", (0, 1)))
  result = {"output": np.concatenate(outs)[keep].astype(np.float32), "label": np.concatenate(labels)[keep],
            "targets": np.concatenate(targets)[keep][:, idx].astype(np.float32)}
  buf = io.BytesIO()
  np.savez(buf, **result)
  records.write_atomic(path, buf.getvalue())
  return result


def _curve(run_dir: str, metric: str, split: str = "eval") -> tuple[list[int], list[float]]:
  steps, values = [], []
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return steps, values
  for m in records.read_jsonl(path, what="metrics file"):
    if m.get("split") == split and metric in m:
      steps.append(int(m["step"]))
      values.append(float(m[metric]))
  return steps, values


def _class_names(config) -> list[str] | None:
  """The class names of the training data's dataset_info.json (None when not a local prepared directory)."""
  path = os.path.join(resolve(config.data.train), records.DATASET_INFO) if isinstance(config.data.train, str) else ""
  if not path or not os.path.exists(path):
    return None
  return records.read_json(path, what="dataset info").get("classes")


def make_plots(workdir: str, runs: Sequence[Run], rows: Sequence[Mapping[str, Any]], table: Mapping[str, Any],
               select: str, task: str, log=print, class_names: Sequence[str] | None = None,
               pretrain: str | None = None) -> list[str]:
  """Per label fraction: validation curves (mean ± std band per arm over folds × seeds) and row-normalised
  confusion matrices / predicted-vs-true scatter of the chosen-lr runs; the paired differences with their 95%
  intervals; the pretraining run's probe curve (when it has a linear probe)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from avt_jax import metrics  # pylint: disable=g-import-not-at-top

  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  chosen = {(g["fraction"], g["init"]): g["lr"] for g in table["groups"] if g["init"] in INITS}
  done = {r["name"] for r in rows if r.get("status") == "done"}
  by_name = {r.name: r for r in runs}
  written = []
  colors = {"pretrained": "tab:blue", "scratch": "tab:orange"}

  def save(fig, name):
    fig.tight_layout()
    written.append(os.path.join(out_dir, name))
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

  for fraction in sorted({f for f, _ in chosen}):
    sel = [by_name[n] for n in sorted(done) if by_name[n].fraction == fraction
           and by_name[n].lr == chosen.get((fraction, by_name[n].init))]
    if not sel:
      continue
    tag = f"frac{int(round(fraction * 100)):03d}"
    fig, ax = plt.subplots(figsize=(6, 4))
    for init in INITS:
      curves = [_curve(r.dir(workdir), select) for r in sel if r.init == init]
      curves = [c for c in curves if c[0]]
      if not curves:
        continue
      common = sorted(set.intersection(*(set(c[0]) for c in curves)))
      vals = np.asarray([[dict(zip(*c))[t] for t in common] for c in curves], np.float64)
      mean, std = vals.mean(axis=0), vals.std(axis=0, ddof=1) if len(vals) > 1 else np.zeros(len(common))
      ax.plot(common, mean, color=colors[init], label=f"{init} (n={len(curves)})")
      ax.fill_between(common, mean - std, mean + std, color=colors[init], alpha=0.2)
    ax.legend()
    ax.set(xlabel="step", ylabel=f"validation {select}",
           title=f"{fraction * 100:g}% labels: mean ± std over folds × seeds")
    save(fig, f"curves_{tag}.png")

    preds = {}
    for r in sel:
      try:
        preds.setdefault(r.init, []).append(predict_run(r.dir(workdir)))
      except Exception as e:  # A run without a usable checkpoint is left out of the plot, not fatal.
        log(f"  no predictions for {r.name}: {type(e).__name__}: {e}")
    if not preds:
      continue
    inits = [i for i in INITS if i in preds]
    if task == "classification":
      num_classes = preds[inits[0]][0]["output"].shape[-1]
      names = list(class_names) if class_names and len(class_names) == num_classes else [
          str(k) for k in range(num_classes)]
      fig, axes = plt.subplots(1, len(inits), figsize=(4.8 * len(inits), 4.3), squeeze=False)
      for ax, init in zip(axes[0], inits):
        cm = sum(np.asarray(metrics.ConfusionMatrix.with_classes(num_classes).from_model_output(
            logits=p["output"], labels=p["label"]).compute()) for p in preds[init])
        rate = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(rate, vmin=0, vmax=1, cmap="Blues")
        for i in range(num_classes):
          for j in range(num_classes):
            ax.text(j, i, f"{rate[i, j] * 100:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if rate[i, j] > 0.5 else "black")
        ax.set_xticks(range(num_classes), names, rotation=45, ha="right")
        ax.set_yticks(range(num_classes), names)
        ax.set(xlabel="predicted", ylabel="true",
               title=f"{init} ({fraction * 100:g}% labels), row %, {int(cm.sum())} clips")
      save(fig, f"confusion_{tag}.png")
    else:
      k = preds[inits[0]][0]["output"].shape[-1]
      fig, axes = plt.subplots(len(inits), k, figsize=(3.5 * k, 3.3 * len(inits)), squeeze=False)
      for row_axes, init in zip(axes, inits):
        for j, ax in enumerate(row_axes):
          y = np.concatenate([p["targets"][:, j] for p in preds[init]])
          x = np.concatenate([p["output"][:, j] for p in preds[init]])
          ax.scatter(y, x, s=4, alpha=0.5)
          lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
          ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
          ax.set(xlabel="true", ylabel="predicted", title=f"{init}: target {j} ({fraction * 100:g}%)")
      save(fig, f"scatter_{tag}.png")

  diffs = [g for g in table["groups"] if g["init"] == "pretrained - scratch" and g.get("intervals")]
  if diffs:
    key = next(iter(diffs[0]["intervals"]))
    scale = 100.0 if task == "classification" else 1.0
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, g in enumerate(diffs):
      mean = g["metrics"][key][0] * scale
      lo, hi = (v * scale for v in g["intervals"][key])
      ax.errorbar([i], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", capsize=6, color="tab:blue")
      ax.annotate(f"{mean:+.1f}" if scale == 100 else f"{mean:+.3f}", (i, mean), xytext=(8, 0),
                  textcoords="offset points", va="center")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(diffs)), [f"{g['fraction'] * 100:g}% labels (n={g['n']})" for g in diffs])
    ax.set_xlim(-0.5, len(diffs) - 0.5)
    ax.set(ylabel=f"pretrained − scratch, test {key[len('test_'):]}" + (" (points)" if scale == 100 else ""),
           title="paired differences, 95% t-intervals")
    save(fig, "differences.png")

  if pretrain:
    probe = {m: _curve(pretrain, m, "probe") for m in ("accuracy", "ccc_mean")}
    probe = {m: c for m, c in probe.items() if c[0]}
    if probe:
      fig, ax = plt.subplots(figsize=(5.5, 3.5))
      for m, (steps, values) in probe.items():
        ax.plot(steps, values, "o-", label=f"probe {m}")
      ax.legend()
      ax.set(xlabel="pretraining step", ylabel="held-out probe", title="linear probe on the frozen encoder")
      save(fig, "probe.png")
  return written


def main(argv):
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Checkpoint-library chatter of the prediction passes; runs log to files.
  t0 = time.time()
  workdir = os.path.abspath(os.path.expanduser(f.workdir))
  stats = run_sweep(sweep_file(f.sweep), workdir, dry_run=f.dry_run, only=f.only, plots=f.plots,
                    aggregate_only=f.aggregate_only, extra_overrides=parse_set(f.set), parallel=f.parallel)
  if not f.dry_run:
    print(f"sweep finished in {time.time() - t0:.0f}s: {len(stats['launched'])} runs launched, "
          f"{len(stats['skipped'])} skipped (finished before), {len(stats['failed'])} failed; results in "
          f"{os.path.join(workdir, 'results.md')}")
  if stats["failed"]:
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("sweep", None, "Sweep file (configs/sweeps/*.py) with get_sweep().")
  flags.DEFINE_string("workdir", None, "Sweep directory (runs/, pretrain/, results.csv, results.md, plots/).")
  flags.DEFINE_bool("dry_run", False, "Print the commands (writing each run's run.json), train nothing.")
  flags.DEFINE_string("only", "", "Only runs whose name contains this substring.")
  flags.DEFINE_bool("plots", True, "Write plots/ (needs an evaluation pass per run for predictions.npz).")
  flags.DEFINE_bool("aggregate_only", False, "Launch nothing; aggregate what is there.")
  flags.DEFINE_integer("parallel", 1, "Fine-tuning runs at a time (after pretraining); e.g. 2 on a 2-core CPU, "
                       "where one small run leaves a core idle.")
  flags.DEFINE_multi_string("set", [], "Config override for every run and the pretraining run, <field>=<value> "
                            "(e.g. --set=total_steps=2 for a smoke run); part of each run's spec.")
  flags.mark_flags_as_required(["sweep", "workdir"])
  app.run(main)
