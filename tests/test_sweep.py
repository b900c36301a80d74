"""The sweep launcher (launch/sweep.py): expansion, dry runs, resuming, aggregation, one real mini sweep."""

import collections
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from avt_jax import records
from data import folds as folds_lib
from launch import sweep as sweep_lib

REPO = sweep_lib.REPO
SYNTH_FOLDS = os.path.join(REPO, "data", "folds", "avt_synth.json")
SYNTH_SUBSETS = os.path.join(REPO, "data", "folds", "avt_synth_subsets.json")


def _sweep_file(tmp_path, name="my_sweep.py", **fields):
  spec = dict(config="configs/finetune_synth.py:tiny",
              pretrain={"config": "configs/pretrain_synth.py:tiny", "overrides": {}},
              folds="data/folds/avt_synth.json", fold_names=["fold0", "fold1"],
              subsets="data/folds/avt_synth_subsets.json", fractions=[0.1, 1.0], seeds=[0, 1],
              inits=["pretrained", "scratch"], lrs=[1e-3, 3e-4], overrides={"total_steps": 4})
  spec.update(fields)
  path = tmp_path / name
  path.write_text(textwrap.dedent(f"""
      import json
      def get_sweep():
        return json.loads({json.dumps(json.dumps(spec))})
  """))
  return str(path)


class _NoSubprocess:
  """Counts attempts to launch a trainer subprocess (and refuses them)."""

  def __init__(self, monkeypatch):
    self.calls = []
    monkeypatch.setattr(subprocess, "call", self)

  def __call__(self, cmd, **kwargs):
    self.calls.append(cmd)
    raise AssertionError(f"a subprocess was launched: {cmd}")


def test_expansion_names_and_run_specs(tmp_path):
  sweep = sweep_lib.load_sweep(_sweep_file(tmp_path))
  workdir = str(tmp_path / "w")
  subsets = folds_lib.load_subsets(SYNTH_SUBSETS)
  runs = sweep_lib.expand(sweep, workdir, subsets)
  expected = [f"{fold}_frac{frac}_seed{seed}_{init}_lr{lr}" for fold in ("fold0", "fold1")
              for frac in ("010", "100") for seed in (0, 1) for init in ("pretrained", "scratch")
              for lr in ("1e-03", "3e-04")]
  assert [r.name for r in runs] == expected
  folds = folds_lib.load_folds(SYNTH_FOLDS)
  by_name = {r.name: r for r in runs}
  r = by_name["fold1_frac010_seed1_pretrained_lr3e-04"]
  o = r.spec["overrides"]
  assert o["init_from"] == os.path.join(workdir, "pretrain")
  assert o["seed"] == 1 and o["optimizer.lr"] == 3e-4 and o["total_steps"] == 4
  assert o["data.train_filter"] == {"clip_ids": subsets["subsets"]["fold1"]["1"]["0.1"]}
  assert o["data.eval_filter"] == {"where": {"speaker": folds["folds"][1]["validation"]}}
  assert o["data.test_filter"] == {"where": {"speaker": folds["folds"][1]["test"]}}
  s = by_name["fold0_frac100_seed0_scratch_lr1e-03"].spec["overrides"]
  assert s["init_from"] == "" and s["data.train_filter"] == {"where": {"speaker": folds["folds"][0]["train"]}}
  # The run config is the base config plus the overrides, with tuples.
  config = sweep_lib.build_config(r.spec)
  assert config.optimizer.lr == 3e-4 and config.seed == 1 and config.total_steps == 4
  assert config.optimizer.total_steps == 4  # The field reference follows total_steps.
  assert config.data.train_filter.clip_ids == tuple(subsets["subsets"]["fold1"]["1"]["0.1"])
  assert config.data.test_filter.where.speaker == tuple(folds["folds"][1]["test"])
  assert config.model.width == 32  # The ':tiny' variant of the base config.


def test_dry_run_prints_commands_and_launches_nothing(tmp_path, monkeypatch):
  guard = _NoSubprocess(monkeypatch)
  lines = []
  workdir = tmp_path / "w"
  stats = sweep_lib.run_sweep(_sweep_file(tmp_path, lrs=[1e-3], seeds=[0]), str(workdir), dry_run=True,
                              log=lines.append)
  assert guard.calls == []
  assert len(lines) == 1 + 8  # Pretraining, then 2 folds x 2 fractions x 2 inits.
  assert "--workdir=" + str(workdir / "pretrain") in lines[0]
  name = "fold1_frac010_seed0_scratch_lr1e-03"
  run_json = workdir / "runs" / name / "run.json"
  assert any(f"--config={REPO}/configs/sweeps/run.py:{run_json}" in l for l in lines)
  assert json.loads(run_json.read_text())["meta"] == {"fold": "fold1", "fraction": 0.1, "seed": 0,
                                                      "init": "scratch", "lr": 1e-3}
  only = []
  sweep_lib.run_sweep(_sweep_file(tmp_path, lrs=[1e-3], seeds=[0]), str(workdir), dry_run=True,
                      only="scratch", log=only.append)
  assert len(only) == 4 and all("scratch" in l for l in only)  # No pretraining needed for scratch runs.


def _fake_result(run_dir, val, test, task="classification", curve=()):
  os.makedirs(run_dir, exist_ok=True)
  if task == "classification":
    final = {"step": 4, "best/step": 2, "best/accuracy": val, "best/validation/accuracy": val,
             "test/accuracy": test[0], "test/uar": test[1], "test/macro_f1": test[2]}
  else:
    final = {"step": 4, "best/step": 2, "best/validation/ccc_mean": val, "test/ccc_arousal": test[0],
             "test/ccc_valence": test[1], "test/ccc_mean": (test[0] + test[1]) / 2}
  with open(os.path.join(run_dir, "final_metrics.json"), "w") as f:
    json.dump(final, f)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for step, value in curve:
      f.write(json.dumps({"step": step, "split": "eval", "accuracy": value}) + "\n")


def test_finished_runs_are_skipped_and_results_match_a_hand_computation(tmp_path, monkeypatch):
  path = _sweep_file(tmp_path, fractions=[0.1], seeds=[0], lrs=[1e-3, 1e-4], fold_names=["fold0", "fold1"])
  workdir = tmp_path / "w"
  sweep_lib.run_sweep(path, str(workdir), dry_run=True, log=lambda _: None)  # Writes every run.json.
  _fake_result(workdir / "pretrain", 0, (0, 0, 0))
  # (fold, init, lr) -> validation accuracy, test (accuracy, uar, macro_f1).
  fake = {
      ("fold0", "pretrained", "1e-03"): (0.50, (0.40, 0.41, 0.42)),
      ("fold0", "pretrained", "1e-04"): (0.60, (0.50, 0.52, 0.54)),
      ("fold1", "pretrained", "1e-03"): (0.70, (0.90, 0.90, 0.90)),  # Best test, but not chosen:
      ("fold1", "pretrained", "1e-04"): (0.62, (0.70, 0.66, 0.62)),  # mean val 1e-4 = 0.61 > 0.60.
      ("fold0", "scratch", "1e-03"): (0.30, (0.30, 0.31, 0.32)),
      ("fold0", "scratch", "1e-04"): (0.20, (0.99, 0.99, 0.99)),  # Best test, worst validation.
      ("fold1", "scratch", "1e-03"): (0.40, (0.50, 0.45, 0.40)),
      ("fold1", "scratch", "1e-04"): (0.30, (0.10, 0.10, 0.10)),
  }
  for (fold, init, lr), (val, test) in fake.items():
    _fake_result(workdir / "runs" / f"{fold}_frac010_seed0_{init}_lr{lr}", val, test,
                 curve=[(2, val - 0.1), (4, val)])
  guard = _NoSubprocess(monkeypatch)
  lines = []
  stats = sweep_lib.run_sweep(path, str(workdir), log=lines.append)
  assert guard.calls == [] and stats["launched"] == [] and len(stats["skipped"]) == 9

  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 8 and {r["status"] for r in rows} == {"done"}
  row = next(r for r in rows if r["name"] == "fold1_frac010_seed0_scratch_lr1e-04")
  assert float(row["test_accuracy"]) == 0.10 and float(row["val_accuracy"]) == 0.30

  groups = {g["init"]: g for g in stats["table"]["groups"]}
  assert groups["pretrained"]["lr"] == 1e-4 and groups["scratch"]["lr"] == 1e-3
  # Hand computation: pretrained @1e-4 test accuracy 0.50, 0.70 -> mean 0.60, sample std 0.141421;
  # scratch @1e-3: 0.30, 0.50 -> 0.40, 0.141421; paired differences 0.20, 0.20 -> 0.20, 0.
  m, s = groups["pretrained"]["metrics"]["test_accuracy"]
  assert m == pytest.approx(0.60) and s == pytest.approx(0.1414214, abs=1e-6)
  m, s = groups["scratch"]["metrics"]["test_macro_f1"]  # 0.32, 0.40
  assert m == pytest.approx(0.36) and s == pytest.approx(0.0565685, abs=1e-6)
  m, s = groups["pretrained - scratch"]["metrics"]["test_uar"]  # (0.52 - 0.31), (0.66 - 0.45)
  assert m == pytest.approx(0.21) and s == pytest.approx(0.0, abs=1e-9)
  md = (workdir / "results.md").read_text()
  # Labels: the 10% subsets of the two folds' 390 training clips (39 and 38 clips after per-class rounding); all 90
  # validation clips (this sweep does not subsample them).
  subsets = folds_lib.load_subsets(SYNTH_SUBSETS)
  assert [len(folds_lib.subset_ids(subsets, f, 0, 0.1)) for f in ("fold0", "fold1")] == [39, 38]
  assert "| 10% | pretrained | 0.0001 | 2 | 38–39 / 90 | 60.0 ± 14.1 | 59.0 ± 9.9 | 58.0 ± 5.7 |" in md
  assert "| 10% | scratch | 0.001 | 2 | 38–39 / 90 | 40.0 ± 14.1 | 38.0 ± 9.9 | 36.0 ± 5.7 |" in md
  assert ("| 10% | **pretrained − scratch** | | 2 | | +20.0 ± 0.0 [+20.0, +20.0] | +21.0 ± 0.0 [+21.0, +21.0] | "
          "+22.0 ± 0.0 [+22.0, +22.0] |") in md
  assert {(r["name"][:5], r["train_labels"], r["validation_labels"]) for r in rows} == {("fold0", "39", "90"),
                                                                                         ("fold1", "38", "90")}
  assert md in "\n".join(lines) + "\n"
  assert os.path.exists(workdir / "plots" / "curves_frac010.png")
  # Every file is written whole through records.write_atomic: no temporary files are left behind.
  assert [p for p in workdir.rglob("*") if ".tmp" in p.name] == []


def test_unreadable_result_files_are_reported_not_counted(tmp_path, monkeypatch):
  """aggregate_only over a torn final_metrics.json and a torn launch.json: warnings name the files, the run is
  'unreadable' and out of the table, and the run's files stay as they were."""
  path = _sweep_file(tmp_path, fractions=[1.0], seeds=[0], lrs=[1e-3], fold_names=["fold0", "fold1"],
                     inits=["scratch"])
  workdir = tmp_path / "w"
  sweep_lib.run_sweep(path, str(workdir), dry_run=True, log=lambda _: None)
  good, torn = (workdir / "runs" / f"{fold}_frac100_seed0_scratch_lr1e-03" for fold in ("fold0", "fold1"))
  _fake_result(good, 0.5, (0.4, 0.4, 0.4))
  _fake_result(torn, 0.9, (0.9, 0.9, 0.9))
  final = torn / "final_metrics.json"
  final.write_text(final.read_text()[:20])
  (good / "launch.json").write_text('{"rc": 0, "wall_s": ')
  before = {p: p.read_bytes() for p in (workdir / "runs").rglob("*") if p.is_file()}
  guard = _NoSubprocess(monkeypatch)
  lines = []
  stats = sweep_lib.run_sweep(path, str(workdir), aggregate_only=True, plots=False, log=lines.append)
  assert guard.calls == []
  warnings = [l for l in lines if l.startswith("warning:")]
  assert warnings == [
      f"warning: {good / 'launch.json'}:1: malformed launch record: Expecting value (line 1, column 21); no wall "
      f"time for {good.name}",
      f"warning: {final}:1: malformed final metrics file: Unterminated string starting at (line 1, column 13); "
      f"{torn.name} is left out of the table"]
  with open(workdir / "results.csv") as f:
    status = {r["name"]: r["status"] for r in csv.DictReader(f)}
  assert status == {good.name: "done", torn.name: "unreadable"}
  (group,) = stats["table"]["groups"]
  assert group["n"] == 1 and group["expected"] == 2 and group["metrics"]["test_accuracy"][0] == pytest.approx(0.4)
  assert {p: p.read_bytes() for p in (workdir / "runs").rglob("*") if p.is_file()} == before


def test_relative_paths_are_made_absolute_before_anything_is_written(tmp_path, monkeypatch):
  """From another directory: --sweep and --workdir relative to it, data and init_from relative to the repository."""
  guard = _NoSubprocess(monkeypatch)
  monkeypatch.chdir(tmp_path)
  _sweep_file(tmp_path, pretrain={"init_from": "sample/avt_synth"}, fractions=[1.0], seeds=[0], lrs=[1e-3],
              fold_names=["fold0"], overrides={"total_steps": 4, "data.train": "sample/avt_synth",
                                               "data.eval": "./sample/avt_synth", "data.test": "gs://b/x"})
  lines = []
  sweep_lib.run_sweep("my_sweep.py", "w", dry_run=True, log=lines.append)
  assert guard.calls == [] and not os.path.exists(os.path.join(REPO, "w"))
  synth = os.path.join(REPO, "sample", "avt_synth")
  for init in ("pretrained", "scratch"):
    run_dir = tmp_path / "w" / "runs" / f"fold0_frac100_seed0_{init}_lr1e-03"
    o = json.loads((run_dir / "run.json").read_text())["overrides"]
    assert o["data.train"] == o["data.eval"] == synth and o["data.test"] == "gs://b/x"
    assert o["init_from"] == (synth if init == "pretrained" else "")
    assert any(l.endswith(f"--workdir={run_dir}") for l in lines)
  # A run started with the same relative data paths (their meaning then) is the same spec, not a changed one.
  run_dir = tmp_path / "w" / "runs" / "fold0_frac100_seed0_scratch_lr1e-03"
  spec = json.loads((run_dir / "run.json").read_text())
  spec["overrides"].update({"data.train": "sample/avt_synth", "data.eval": "./sample/avt_synth"})
  (run_dir / "run.json").write_text(json.dumps(spec))
  (run_dir / "log.txt").write_text("started")
  sweep_lib.run_sweep("my_sweep.py", "w", dry_run=True, log=lambda _: None)
  assert json.loads((run_dir / "run.json").read_text())["overrides"]["data.train"] == synth
  assert (run_dir / "log.txt").read_text() == "started"
  # Mixtures and mappings: only their file paths change.
  mix = [{"path": "sample/avt_synth", "weight": 2}, "tfds:x/train", "/abs", ""]
  assert sweep_lib.absolute_overrides({"data.train": mix, "seed": "rel"}) == {
      "data.train": [{"path": synth, "weight": 2}, "tfds:x/train", "/abs", ""], "seed": "rel"}


def test_torn_run_spec_of_a_started_run_is_refused(tmp_path):
  path = _sweep_file(tmp_path, fractions=[1.0], seeds=[0], lrs=[1e-3], fold_names=["fold0"], inits=["scratch"])
  workdir = tmp_path / "w"
  sweep_lib.run_sweep(path, str(workdir), dry_run=True, log=lambda _: None)
  run_dir = workdir / "runs" / "fold0_frac100_seed0_scratch_lr1e-03"
  (run_dir / "run.json").write_text('{"name": "fold0')
  (run_dir / "log.txt").write_text("started")
  with pytest.raises(sweep_lib.SweepError, match=rf"^{run_dir}/run.json:1: malformed run spec: .*cannot tell "
                                                 "whether .* was started with this sweep's spec"):
    sweep_lib.run_sweep(path, str(workdir), dry_run=True, log=lambda _: None)
  assert (run_dir / "run.json").read_text() == '{"name": "fold0' and (run_dir / "log.txt").read_text() == "started"


def test_aggregate_regression_and_missing_runs():
  rows = []
  for fold, a, v in (("fold0", 0.5, 0.2), ("fold1", 0.7, 0.4), ("fold2", None, None)):
    for init, shift in (("pretrained", 0.1), ("scratch", 0.0)):
      row = {"name": f"{fold}_{init}", "fold": fold, "fraction": 1.0, "seed": 0, "init": init, "lr": 1e-3}
      if a is None:
        row["status"] = "missing"
      else:
        row.update(status="done", val_ccc_mean=0.3, test_ccc_arousal=a + shift, test_ccc_valence=v + shift,
                   test_ccc_mean=(a + v) / 2 + shift)
      rows.append(row)
  table = sweep_lib.aggregate(rows, "ccc_mean", title="t")
  md = table["markdown"]
  assert "| labels | init | lr | n | labels train / val | CCC arousal | CCC valence | CCC mean |" in md
  assert "| 100% | pretrained | 0.001 | 2/3 | – / – | 0.700 ± 0.141 | 0.400 ± 0.141 | 0.550 ± 0.141 |" in md
  assert "| 100% | **pretrained − scratch** | | 2 | | +0.100 ± 0.000 [+0.100, +0.100] |" in md
  assert "gate" not in md
  # A failed gate replaces the comparison; the arms are still listed.
  gate = {"passed": False, "values": {"eval/zeroed_l1": 0.9, "eval/zeroed_l1_past_mean": 0.8}, "step": 10,
          "why": "eval/zeroed_l1 0.9000 >= eval/zeroed_l1_past_mean 0.8000"}
  md = sweep_lib.aggregate(rows, "ccc_mean", title="t", gate=gate)["markdown"]
  assert "Pretraining gate **failed: pretraining did not learn** (eval/zeroed_l1 0.9000 >= " in md
  assert "| 100% | **pretrained − scratch** | | 2 | | pretraining did not learn |" in md
  assert "| 100% | pretrained | 0.001 | 2/3 |" in md


def test_paired_interval_is_scipys_paired_t_interval():
  from scipy import stats  # pylint: disable=g-import-not-at-top
  a = np.array([0.42, 0.51, 0.38, 0.47, 0.55, 0.40, 0.44, 0.49, 0.36, 0.52])
  b = np.array([0.35, 0.49, 0.30, 0.45, 0.41, 0.38, 0.40, 0.50, 0.33, 0.43])
  mean, std, lo, hi = sweep_lib.paired_interval(a - b)
  ci = stats.ttest_rel(a, b).confidence_interval(0.95)
  assert mean == pytest.approx(np.mean(a - b)) and std == pytest.approx(np.std(a - b, ddof=1))
  assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12)
  # By hand: t(0.975, 9) = 2.2621572.
  assert hi - mean == pytest.approx(2.2621572 * std / np.sqrt(10), rel=1e-6)
  assert all(np.isnan(v) for v in sweep_lib.paired_interval([0.1])[2:])


def test_changed_spec_of_a_started_run_is_refused(tmp_path):
  path = _sweep_file(tmp_path, fractions=[1.0], seeds=[0], lrs=[1e-3], fold_names=["fold0"], inits=["scratch"])
  workdir = tmp_path / "w"
  sweep_lib.run_sweep(path, str(workdir), dry_run=True, log=lambda _: None)
  run_dir = workdir / "runs" / "fold0_frac100_seed0_scratch_lr1e-03"
  (run_dir / "log.txt").write_text("started")
  changed = _sweep_file(tmp_path, fractions=[1.0], seeds=[0], lrs=[1e-3], fold_names=["fold0"], inits=["scratch"],
                        overrides={"total_steps": 5})
  with pytest.raises(sweep_lib.SweepError, match=r"different spec \(changed: \['total_steps'\]\)"):
    sweep_lib.run_sweep(changed, str(workdir), dry_run=True, log=lambda _: None)


def test_bad_sweep_files_are_named(tmp_path):
  with pytest.raises(sweep_lib.SweepError, match="needs pretrain"):
    sweep_lib.load_sweep(_sweep_file(tmp_path, pretrain=None))
  with pytest.raises(sweep_lib.SweepError, match="fraction 1.5"):
    sweep_lib.load_sweep(_sweep_file(tmp_path, fractions=[1.5]))
  with pytest.raises(KeyError, match="no clip ids for fold 'fold0', seed 9"):
    sweep = sweep_lib.load_sweep(_sweep_file(tmp_path, seeds=[9]))
    sweep_lib.expand(sweep, str(tmp_path), folds_lib.load_subsets(SYNTH_SUBSETS))


def _ccc(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return 2 * np.mean((x - x.mean()) * (y - y.mean())) / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def _random_pretrained_checkpoint(directory):
  """A pretraining checkpoint of configs/pretrain_synth.py:tiny with random weights (written in-process)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from avt_jax import checkpointing, input_pipeline, tasks  # pylint: disable=g-import-not-at-top
  from avt_jax import setup as setup_lib  # pylint: disable=g-import-not-at-top
  config = sweep_lib.load_config_file("configs/pretrain_synth.py:tiny")
  _, geometry = input_pipeline.open_sources(config.data.train)
  setup_lib.fill_model_config(config, geometry)
  model = tasks.from_config(config).model
  dummy = input_pipeline.dummy_batch(geometry, 2, config.data.max_tokens)
  key = jax.random.key(1)
  params = nn.meta.unbox(model.init({"params": key, "dropout": key}, dummy, deterministic=True)["params"])
  return checkpointing.save_pretrained(str(directory), params, config.to_dict())


def test_end_to_end_mini_sweep(tmp_path, monkeypatch):
  """Two fine-tuning runs (pretrained + scratch; regression, 4 steps each) as real trainer subprocesses."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # Faster compiles.
  pretrained = _random_pretrained_checkpoint(tmp_path / "pre")
  path = _sweep_file(tmp_path, config="configs/finetune_synth.py:regression_tiny", subsets=None,
                     pretrain={"init_from": pretrained}, fold_names=["fold2"], fractions=[0.25], seeds=[0],
                     lrs=[1e-3], overrides={"total_steps": 4})
  workdir = tmp_path / "w"
  stats = sweep_lib.run_sweep(path, str(workdir), log=lambda _: None, parallel=2)  # both runs at once
  assert stats["failed"] == [] and len(stats["launched"]) == 2
  # No subsets file named: the sweep wrote one, stratified by binned targets.
  subsets = json.loads((workdir / "subsets.json").read_text())
  assert subsets["stratify"] == "targets"
  for init in ("pretrained", "scratch"):
    run_dir = workdir / "runs" / f"fold2_frac025_seed0_{init}_lr1e-03"
    final = json.loads((run_dir / "final_metrics.json").read_text())
    # predictions.npz (test split, selected checkpoint) reproduces the trainer's test CCC.
    with np.load(run_dir / "predictions.npz") as z:
      out, targets = z["output"], z["targets"]
    assert out.shape == (120, 2) and targets.shape == (120, 2)
    assert _ccc(out[:, 0], targets[:, 0]) == pytest.approx(final["test/ccc_arousal"], abs=1e-4)
    assert _ccc(out[:, 1], targets[:, 1]) == pytest.approx(final["test/ccc_valence"], abs=1e-4)
  log = (workdir / "runs" / "fold2_frac025_seed0_pretrained_lr1e-03" / "log.txt").read_text()
  assert f"initialising the encoder from {pretrained}" in log
  assert os.path.exists(workdir / "plots" / "scatter_frac025.png")
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 and all(r["status"] == "done" for r in rows)
  assert "CCC arousal" in (workdir / "results.md").read_text()
  again = sweep_lib.run_sweep(path, str(workdir), plots=False, log=lambda _: None)
  assert again["launched"] == [] and len(again["skipped"]) == 2


SCRATCH_RUNS = ("fold0_frac100_seed0_scratch_lr1e-03", "fold0_frac100_seed0_scratch_lr3e-04")


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  """A finished two-run sweep (scratch, 2 steps each), run as `python -m launch.sweep` from a directory that is not
  the repository, with the sweep file, the workdir and the data paths given relative (the latter to the repository).

  Returns (directory the command ran in, sweep file, workdir, completed process).
  """
  cwd = tmp_path_factory.mktemp("elsewhere")
  sweep = _sweep_file(cwd, pretrain=None, inits=["scratch"], fold_names=["fold0"], fractions=[1.0], seeds=[0],
                      lrs=[1e-3, 3e-4], overrides={"total_steps": 2, "data.train": "sample/avt_synth",
                                                   "data.eval": "sample/avt_synth", "data.test": "sample/avt_synth"})
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", f"--sweep={os.path.basename(sweep)}", "--workdir=w"],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
  return cwd, sweep, cwd / "w", proc


def test_sweep_command_with_relative_paths_from_another_directory(finished_sweep):
  cwd, _, workdir, proc = finished_sweep
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert (f"2 runs launched, 0 skipped (finished before), 0 failed; results in {workdir / 'results.md'}"
          in proc.stdout)
  assert not os.path.exists(os.path.join(REPO, "w"))
  synth = os.path.join(REPO, "sample", "avt_synth")
  for name in SCRATCH_RUNS:
    run_dir = workdir / "runs" / name
    spec = json.loads((run_dir / "run.json").read_text())
    assert {spec["overrides"][f"data.{s}"] for s in ("train", "eval", "test")} == {synth}
    assert json.loads((run_dir / "launch.json").read_text())["command"][-1] == f"--workdir={run_dir}"
    assert (run_dir / "checkpoints").is_dir() and "test/accuracy" in json.loads((run_dir / "final_metrics.json")
                                                                                .read_text())
  # The in-process prediction pass (in the other directory) opened the same data as the trainer, for the run at
  # the chosen rate.
  assert "no predictions" not in proc.stdout and "plots failed" not in proc.stdout
  (predictions,) = [p for name in SCRATCH_RUNS for p in [workdir / "runs" / name / "predictions.npz"] if p.exists()]
  with np.load(predictions) as z:
    assert z["output"].shape[1] == 6 and len(z["label"]) == len(z["output"]) > 0
  assert (workdir / "plots" / "confusion_frac100.png").exists()
  with open(workdir / "results.csv") as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["done", "done"]


def test_torn_final_metrics_reruns_only_that_run(finished_sweep, tmp_path, monkeypatch):
  """A run whose final_metrics.json does not parse is not done: one warning names the file, the trainer runs again
  and resumes from the run's checkpoints; the other run's files are left byte for byte."""
  _, sweep, finished, proc = finished_sweep
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # As the first time.
  workdir = tmp_path / "w"
  shutil.copytree(finished, workdir)
  torn, kept = (workdir / "runs" / name for name in SCRATCH_RUNS)
  final = torn / "final_metrics.json"
  original = json.loads(final.read_text())
  final.write_text(final.read_text()[:30])
  log_before = (torn / "log.txt").read_text()
  before = {p: p.read_bytes() for p in kept.rglob("*") if p.is_file()}
  lines = []
  stats = sweep_lib.run_sweep(sweep, str(workdir), plots=False, log=lines.append)
  assert stats["launched"] == [torn.name] and stats["skipped"] == [kept.name] and stats["failed"] == []
  (warning,) = [l for l in lines if "warning" in l.lower()]
  assert re.fullmatch(rf"warning: {re.escape(str(final))}:\d+: malformed final metrics file: .+ \(line \d+, column "
                      rf"\d+\); {torn.name} is not done and runs again \(the trainer resumes from its checkpoints\)",
                      warning), warning
  assert re.search(rf"resum\w* from {re.escape(str(torn / 'checkpoints'))} at step 2",
                   (torn / "log.txt").read_text()[len(log_before):])
  again = records.read_json(final)
  assert again["best/step"] == original["best/step"]
  assert again["test/accuracy"] == pytest.approx(original["test/accuracy"], abs=1e-6)
  assert {p: p.read_bytes() for p in kept.rglob("*") if p.is_file()} == before
  with open(workdir / "results.csv") as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["done", "done"]


def test_real_dataset_sweeps_expand_on_their_folds(tmp_path, monkeypatch):
  """configs/sweeps/cremad.py and msp_improv.py, dry run on manifests shaped like the real ones."""
  guard = _NoSubprocess(monkeypatch)
  crema = tmp_path / "crema_d"
  crema.mkdir()
  with open(crema / "manifest.jsonl", "w") as f:
    for actor in range(1001, 1092):
      for k in range(12):
        f.write(json.dumps({"clip_id": f"{actor}_S{k:02d}_{k % 6}", "status": "ok", "speaker": f"crema_{actor}",
                            "session": "", "label": k % 6, "dataset": "crema_d"}) + "\n")
  msp = tmp_path / "msp"
  msp.mkdir()
  rng = np.random.default_rng(0)
  with open(msp / "manifest.jsonl", "w") as f:
    for s in range(1, 7):
      for k in range(30):
        a, v = rng.uniform(1, 5, 2)
        f.write(json.dumps({"clip_id": f"MSP-S{s}-{k:02d}", "status": "ok", "speaker": f"msp_F0{s}",
                            "session": f"session{s}", "label": -1, "targets": [a, v, 3.0]}) + "\n")
  monkeypatch.setenv("AVT_CREMA_D", str(crema))
  monkeypatch.setenv("AVT_MSP_IMPROV", str(msp))
  monkeypatch.setenv("AVT_PRETRAINED", str(tmp_path / "pre"))
  for name, folds, n in (("cremad", "crema_d", 5), ("msp_improv", "msp_improv", 6)):
    lines = []
    sweep_lib.run_sweep(f"configs/sweeps/{name}.py", str(tmp_path / name), dry_run=True, log=lines.append)
    assert len(lines) == 2 * n * 3 * 2 * 2  # fractions x folds x seeds x inits x lrs; no pretraining stage.
    sub = json.loads((tmp_path / name / "subsets.json").read_text())
    assert sub["stratify"] == ("label" if name == "cremad" else "targets")
    spec = json.loads((tmp_path / name / "runs" / "fold1_frac100_seed2_pretrained_lr1e-04" / "run.json").read_text())
    field = "speaker" if name == "cremad" else "session"
    fold = folds_lib.load_folds(os.path.join(REPO, "data", "folds", f"{folds}.json"))["folds"][1]
    assert spec["overrides"]["data.test_filter"] == {"where": {field: fold["test"]}}
    assert spec["overrides"]["init_from"] == str(tmp_path / "pre")
    config = sweep_lib.build_config(spec)
    assert config.data.train == str(crema if name == "cremad" else msp)
    assert config.data.eval_filter.where[field] == tuple(fold["validation"])
  assert guard.calls == []


def test_overrides_of_unknown_fields_are_refused():
  config = sweep_lib.load_config_file("configs/pretrain.py:tiny")
  assert "train_filter" not in config.data  # The base config has no filter: the override adds it.
  sweep_lib.apply_overrides(config, {"data.train_filter": {"where": {"session": ["session1"]}}, "seed": 3,
                                     "optimizer.lr": 1})
  assert config.data.train_filter.where.session == ("session1",) and config.seed == 3
  assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
  with pytest.raises(sweep_lib.SweepError, match="no field 'total_step'"):
    sweep_lib.apply_overrides(config, {"total_step": 5})
  with pytest.raises(sweep_lib.SweepError, match="no field 'optimiser'"):
    sweep_lib.apply_overrides(config, {"optimiser.lr": 5})


def test_synth_v2_sweep_prepares_its_benchmark_and_subsamples_validation(tmp_path, monkeypatch):
  """configs/sweeps/synth_v2.py pointed at another seed's benchmark: written first (the real generator), runs on
  it, validation subsets at 10% counted in the table's columns; a directory of another seed is refused."""
  data = tmp_path / "bench"
  lines = []
  stats = sweep_lib.run_sweep(f"configs/sweeps/synth_v2.py:seed=3,data={data}", str(tmp_path / "w"), dry_run=True,
                              log=lines.append)
  info = json.loads((data / "dataset_info.json").read_text())
  assert info["generator"]["seed"] == 3 and info["dataset"] == "avt_synth_v2"
  assert any(l.startswith(f"preparing {data}: ") for l in lines)
  assert len(stats["commands"]) == 41                      # pretraining + 5 folds x 2 seeds x 2 fractions x 2 inits
  pre = json.loads((tmp_path / "w" / "pretrain" / "run.json").read_text())["overrides"]
  assert pre["data.train"] == str(data / "pretrain") and pre["evals.probe.fit.path"] == str(data / "pretrain_val")
  cfg = sweep_lib.build_config(str(tmp_path / "w" / "pretrain" / "run.json"))
  assert cfg.data.eval == cfg.evals.probe.data.path == str(data / "pretrain_val") and cfg.task == "pretrain"
  # The protocol's model and pretraining since attempt 2 (docs/protocols.md): bidirectional, 3600 steps.
  assert cfg.total_steps == 3600 and not cfg.model.causal
  assert not sweep_lib.build_config(str(tmp_path / "w" / "runs" / "fold0_frac010_seed0_pretrained_lr1e-03" /
                                        "run.json")).model.causal
  assert set(cfg.evals.probe.fit.where.speaker) | set(cfg.evals.probe.data.where.speaker) == {
      f"synthval_s{k:02d}" for k in range(10)}
  subsets = folds_lib.load_subsets(str(tmp_path / "w" / "subsets.json"))
  folds = folds_lib.load_folds(os.path.join(REPO, "data", "folds", "avt_synth_v2.json"))
  for name, fraction in (("fold2_frac010_seed1_scratch_lr1e-03", 0.1), ("fold2_frac100_seed1_scratch_lr1e-03", 1.0)):
    o = json.loads((tmp_path / "w" / "runs" / name / "run.json").read_text())["overrides"]
    assert o["data.train"] == o["data.eval"] == o["data.test"] == str(data)
    if fraction < 1:
      assert o["data.eval_filter"]["clip_ids"] == folds_lib.subset_ids(subsets, "fold2", 1, 0.1, split="validation")
      # 4 speakers x 24 clips; per class max(1, round(10% of its clips)), half up.
      val = folds_lib.split_rows(folds_lib.read_manifest(str(data)), folds, "fold2")["validation"]
      per_class = collections.Counter(r["label"] for r in val)
      assert len(val) == 96 and len(o["data.eval_filter"]["clip_ids"]) == sum(
          max(1, math.floor(0.1 * n + 0.5)) for n in per_class.values())
      val_labels = len(o["data.eval_filter"]["clip_ids"])
    else:
      assert o["data.eval_filter"] == {"where": {"speaker": folds["folds"][2]["validation"]}}
  runs = sweep_lib.expand(sweep_lib.load_sweep(sweep_lib.sweep_file(f"configs/sweeps/synth_v2.py:seed=3,data={data}")),
                          str(tmp_path / "w"), subsets, folds_lib.read_manifest(str(data)), lambda r: r["label"] >= 0)
  run = next(r for r in runs if r.name == "fold2_frac010_seed1_scratch_lr1e-03")
  assert (run.train_labels, run.validation_labels) == (len(folds_lib.subset_ids(subsets, "fold2", 1, 0.1)),
                                                       val_labels)
  full = next(r for r in runs if r.name == "fold2_frac100_seed1_scratch_lr1e-03")
  assert (full.train_labels, full.validation_labels) == (480, 96)
  with pytest.raises(ValueError, match="holds avt_synth version 2 seed 3, not version 2 seed 4"):
    sweep_lib.load_sweep(sweep_lib.sweep_file(f"configs/sweeps/synth_v2.py:seed=4,data={data}"))
  with pytest.raises(ValueError, match="expected 'seed=<n>', 'data=<dir>'"):
    sweep_lib.load_sweep(sweep_lib.sweep_file("configs/sweeps/synth_v2.py:seeds=4"))


def test_synth_v2_pool_sweep_runs_the_protocol_on_the_held_out_pool_speakers(tmp_path):
  """configs/sweeps/synth_v2_pool.py: synth_v2's pretraining (here 7 steps), fine-tuning on pretrain_val/ in the
  pool folds at 40% of the labels, about the label counts of the benchmark's 10% runs."""
  data = tmp_path / "bench"
  spec = f"configs/sweeps/synth_v2_pool.py:seed=3,data={data},pretrain_steps=7"
  stats = sweep_lib.run_sweep(spec, str(tmp_path / "w"), dry_run=True, log=lambda *_: None)
  assert len(stats["commands"]) == 21                      # pretraining + 5 folds x 2 seeds x 2 inits
  pre = sweep_lib.build_config(str(tmp_path / "w" / "pretrain" / "run.json"))
  assert pre.total_steps == 7 and pre.data.train == str(data / "pretrain")
  pool = str(data / "pretrain_val")
  runs = sweep_lib.expand(sweep_lib.load_sweep(sweep_lib.sweep_file(spec)), str(tmp_path / "w"),
                          folds_lib.load_subsets(str(tmp_path / "w" / "subsets.json")),
                          folds_lib.read_manifest(pool), lambda r: r["label"] >= 0)
  assert {r.fraction for r in runs} == {0.4}
  for r in runs:
    o = r.spec["overrides"]
    assert o["data.train"] == o["data.eval"] == o["data.test"] == pool
    assert 47 <= r.train_labels <= 49 and 15 <= r.validation_labels <= 17
    assert "total_steps" not in o                          # pretrain_steps is the pretraining's alone
    test_speakers = set(o["data.test_filter"]["where"]["speaker"])
    assert len(test_speakers) == 2 and all(s.startswith("synthval_s") for s in test_speakers)
