"""Speaker-independent folds and label-fraction subsets (data/folds.py, data/folds/*.json)."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import folds as folds_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(REPO, "sample", "avt_synth")
SHIPPED = os.path.join(REPO, "data", "folds")


def _load(name):
  with open(os.path.join(SHIPPED, name)) as f:
    return json.load(f)


def _check_partition(folds, all_groups):
  """Every group tested exactly once; per fold train / validation / test disjoint and covering all groups."""
  tested = collections.Counter(g for f in folds["folds"] for g in f["test"])
  assert set(tested) == set(all_groups)
  assert all(n == 1 for n in tested.values())
  for f in folds["folds"]:
    tr, va, te = set(f["train"]), set(f["validation"]), set(f["test"])
    assert not tr & va and not tr & te and not va & te, f["name"]
    assert tr | va | te == set(all_groups), f["name"]


def test_crema_d_folds_are_contiguous_actor_blocks():
  folds = _load("crema_d.json")
  assert folds == json.loads(json.dumps(folds_lib.crema_d_folds()))  # The file is what the code says.
  actors = [f"crema_{a}" for a in range(1001, 1092)]
  _check_partition(folds, actors)
  # Hand-written blocks: 19, 18, 18, 18, 18 actors in id order.
  bounds = [(1001, 1019), (1020, 1037), (1038, 1055), (1056, 1073), (1074, 1091)]
  for k, (f, (lo, hi)) in enumerate(zip(folds["folds"], bounds)):
    assert f["name"] == f"fold{k}"
    assert f["test"] == [f"crema_{a}" for a in range(lo, hi + 1)]
    nxt = bounds[(k + 1) % 5][0]
    assert f["validation"] == [f"crema_{a}" for a in range(nxt, nxt + 9)]
    assert len(f["train"]) == 91 - (hi - lo + 1) - 9


def _check_speaker_blocks(folds, speakers, block, num_validation):
  """5 folds over contiguous blocks of `block` speakers: fold k tests block k, validates on the first
  `num_validation` speakers of block k+1 (mod 5) and trains on the rest."""
  _check_partition(folds, speakers)
  for k, f in enumerate(folds["folds"]):
    assert f["test"] == speakers[block * k:block * k + block]
    nxt = block * ((k + 1) % 5)
    assert f["validation"] == speakers[nxt:nxt + num_validation]
    assert len(f["train"]) == len(speakers) - block - num_validation


def test_synth_v2_folds_are_six_speaker_blocks():
  folds = _load("avt_synth_v2.json")
  assert folds == json.loads(json.dumps(folds_lib.synth_v2_folds()))
  _check_speaker_blocks(folds, [f"synth_s{s:02d}" for s in range(30)], block=6, num_validation=4)


def test_synth_v2_pool_folds_cover_the_held_out_pool_speakers():
  folds = _load("avt_synth_v2_pool.json")
  assert folds == json.loads(json.dumps(folds_lib.synth_v2_pool_folds()))
  speakers = [f"synthval_s{s:02d}" for s in range(10)]
  _check_speaker_blocks(folds, speakers, block=2, num_validation=2)
  # Disjoint from the benchmark's own folds: a choice made on the pool sees none of their speakers.
  benchmark = {g for f in _load("avt_synth_v2.json")["folds"] for g in f["test"]}
  assert not benchmark & set(speakers)


def test_msp_improv_is_leave_one_session_out():
  folds = _load("msp_improv.json")
  assert folds == json.loads(json.dumps(folds_lib.msp_improv_folds()))
  assert folds["field"] == "session"
  _check_partition(folds, [f"session{s}" for s in range(1, 7)])
  for k, f in enumerate(folds["folds"]):
    assert f["test"] == [f"session{k + 1}"]
    assert f["validation"] == [f"session{(k + 1) % 6 + 1}"]
    assert len(f["train"]) == 4


def test_synth_folds_cover_the_manifest_speakers():
  folds = _load("avt_synth.json")
  assert folds == json.loads(json.dumps(folds_lib.synth_folds()))
  rows = folds_lib.read_manifest(os.path.join(SYNTH, "manifest.jsonl"))
  speakers = sorted({r["speaker"] for r in rows})
  assert len(speakers) == 20
  _check_partition(folds, speakers)
  for f in folds["folds"]:
    parts = folds_lib.split_rows(rows, folds, f["name"])
    assert sum(len(v) for v in parts.values()) == len(rows)
    ids = {k: {r["clip_id"] for r in v} for k, v in parts.items()}
    assert not ids["train"] & ids["test"] and not ids["validation"] & ids["test"]
    assert not ids["train"] & ids["validation"]
    assert {r["speaker"] for r in parts["test"]} == set(f["test"])


def test_check_folds_rejects_overlap_and_untested_groups():
  good = folds_lib.synth_folds(6, 3, 1)
  folds_lib.check_folds(good)
  bad = json.loads(json.dumps(good))
  bad["folds"][0]["validation"].append(bad["folds"][0]["test"][0])
  with pytest.raises(folds_lib.FoldsError, match="validation and test"):
    folds_lib.check_folds(bad, "bad.json")
  bad = json.loads(json.dumps(good))
  bad["folds"][1]["test"] = bad["folds"][0]["test"]
  bad["folds"][1]["train"] = [g for g in bad["folds"][1]["train"] if g not in bad["folds"][0]["test"]]
  with pytest.raises(folds_lib.FoldsError, match="exactly once"):
    folds_lib.check_folds(bad, "bad.json")


def test_fold_filters_hold_tuples():
  folds = folds_lib.synth_folds()
  flt = folds_lib.fold_filters(folds, "fold1")
  assert flt["test_filter"] == {"where": {"speaker": tuple(folds["folds"][1]["test"])}}
  assert flt["eval_filter"] == {"where": {"speaker": tuple(folds["folds"][1]["validation"])}}
  assert folds_lib.fold_filters(folds, 1, ["a", "b"])["train_filter"] == {"clip_ids": ("a", "b")}


def _check_subsets(subsets, rows, folds, stratum_of_row):
  for k, f in enumerate(folds["folds"]):
    train = folds_lib.split_rows(rows, folds, f["name"])["train"]
    strata = collections.defaultdict(set)
    for r in train:
      s = stratum_of_row(r)
      if s is not None:
        strata[s].add(r["clip_id"])
    for seed in subsets["seeds"]:
      per_fraction = subsets["subsets"][f["name"]][str(seed)]
      sets = {float(fr): set(ids) for fr, ids in per_fraction.items()}
      fractions = sorted(sets)
      for small, big in zip(fractions, fractions[1:]):
        assert sets[small] <= sets[big], (f["name"], seed, small, big)  # Nested.
      assert sets[1.0] == set().union(*strata.values())
      for fr, ids in sets.items():
        for s, members in strata.items():
          count = len(ids & members)
          assert abs(count - fr * len(members)) <= 1, (f["name"], seed, fr, s, count, len(members))
          assert count >= 1


def test_shipped_synth_subsets_are_stratified_nested_and_reproducible():
  rows = folds_lib.read_manifest(SYNTH)
  folds = folds_lib.load_folds(os.path.join(SHIPPED, "avt_synth.json"))
  with open(os.path.join(SHIPPED, "avt_synth_subsets.json")) as f:
    shipped = json.load(f)
  again = folds_lib.make_subsets(rows, folds, fractions=shipped["fractions"], seeds=shipped["seeds"],
                                 folds_name="data/folds/avt_synth.json")
  assert again == shipped
  assert shipped["stratify"] == "label" and shipped["fractions"] == [0.1, 0.25, 1.0]
  _check_subsets(shipped, rows, folds, lambda r: r["label"])
  # Different seeds give different subsets; sizes near 10% of the 390 training clips.
  s0 = shipped["subsets"]["fold0"]["0"]["0.1"]
  assert s0 != shipped["subsets"]["fold0"]["1"]["0.1"]
  assert 33 <= len(s0) <= 45


def test_subsets_of_regression_targets_use_binned_attributes():
  rng = np.random.default_rng(3)
  rows = []
  for s in range(6):
    for c in range(40):
      a, v = rng.uniform(1, 5, size=2)
      tgt = [float(a), float(v), None] if c % 10 else [None, None, None]  # Some clips without ratings.
      rows.append({"clip_id": f"x{s}_{c:02d}", "speaker": f"p{s}", "label": -1, "targets": tgt})
  folds = folds_lib.synth_folds(6, 3, 1)
  folds = {**folds, "folds": [{**f, "test": [g.replace("synth_s0", "p") for g in f["test"]],
                               "validation": [g.replace("synth_s0", "p") for g in f["validation"]],
                               "train": [g.replace("synth_s0", "p") for g in f["train"]]} for f in folds["folds"]]}
  folds_lib.check_folds(folds)
  subsets = folds_lib.make_subsets(rows, folds, fractions=[0.1, 0.5, 1.0], seeds=[0, 1])
  assert subsets["stratify"] == "targets"

  def stratum(fold_rows):
    # Independent tertile binning with numpy percentiles over the fold's training rows with both targets.
    vals = np.array([r["targets"][:2] for r in fold_rows if r["targets"][0] is not None], float)
    edges = [np.percentile(vals[:, j], [100 / 3, 200 / 3]) for j in range(2)]
    out = {}
    for r in fold_rows:
      if r["targets"][0] is not None:
        out[r["clip_id"]] = tuple(int((r["targets"][j] >= edges[j]).sum()) for j in range(2))
    return out

  for f in folds["folds"]:
    train = folds_lib.split_rows(rows, folds, f["name"])["train"]
    ref = stratum(train)
    one = {"seeds": subsets["seeds"], "subsets": {f["name"]: subsets["subsets"][f["name"]]}}
    _check_subsets(one, rows, {"folds": [f], "field": "speaker"}, lambda r, ref=ref: ref.get(r["clip_id"]))


def test_stratified_subsets_rounding_and_determinism():
  stratum_of = {f"c{i:03d}": f"k{i % 3}" for i in range(30)}  # Strata of 10 clips each.
  a = folds_lib.stratified_subsets(stratum_of, [0.25, 0.5, 1.0], seed=7)
  b = folds_lib.stratified_subsets(dict(reversed(list(stratum_of.items()))), [0.25, 0.5, 1.0], seed=7)
  assert a == b  # Depends on the clip ids, not the order they come in.
  assert [len(a[f]) for f in (0.25, 0.5, 1.0)] == [9, 15, 30]  # round(2.5) = 3 (half up) per stratum.
  tiny = folds_lib.stratified_subsets({"x": "a", "y": "b"}, [0.1], seed=0)
  assert tiny[0.1] == ["x", "y"]  # At least one clip per stratum.
  with pytest.raises(ValueError, match="fraction"):
    folds_lib.stratified_subsets(stratum_of, [0.0], seed=0)


def test_subsets_command_writes_the_file(tmp_path):
  out = tmp_path / "sub.json"
  proc = subprocess.run([sys.executable, "-m", "data.folds", "subsets", f"--manifest={SYNTH}/manifest.jsonl",
                         "--folds=data/folds/avt_synth.json", f"--output={out}", "--fractions=0.1,1.0",
                         "--seeds=4"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  data = json.loads(out.read_text())
  rows = folds_lib.read_manifest(SYNTH)
  folds = folds_lib.load_folds(os.path.join(SHIPPED, "avt_synth.json"))
  assert data["subsets"] == folds_lib.make_subsets(rows, folds, fractions=[0.1, 1.0], seeds=[4])["subsets"]
  assert "fold0: train 13 groups / 390 clips" in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "data.folds", "subsets", f"--manifest={SYNTH}/manifest.jsonl",
                        f"--folds={tmp_path}/missing.json", f"--output={out}"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode != 0 and "missing.json not found" in bad.stderr


def test_malformed_files_name_path_and_line(tmp_path):
  manifest = tmp_path / "manifest.jsonl"
  rows = open(os.path.join(SYNTH, "manifest.jsonl")).read().splitlines()[:3]
  manifest.write_text("\n".join([rows[0], rows[1][:-1], rows[2]]) + "\n")
  with pytest.raises(folds_lib.FoldsError, match=f"^{manifest}:2: malformed manifest line: "):
    folds_lib.read_manifest(str(manifest))
  folds = tmp_path / "folds.json"
  text = json.dumps(folds_lib.synth_folds(6, 3, 1), indent=1).splitlines()
  text[2] = text[2].replace('"field"', "field")  # line 3: an unquoted key
  folds.write_text("\n".join(text))
  with pytest.raises(folds_lib.FoldsError, match=f"^{folds}:3: malformed folds file: Expecting property name"):
    folds_lib.load_folds(str(folds))
  subsets = tmp_path / "subsets.json"
  subsets.write_text("[1, 2]\n")
  with pytest.raises(folds_lib.FoldsError, match=f"^{subsets}:1: malformed subsets file: expected a JSON object"):
    folds_lib.load_subsets(str(subsets))
  with pytest.raises(FileNotFoundError, match="subsets file .*nope.json not found"):
    folds_lib.load_subsets(str(tmp_path / "nope.json"))


def test_written_files_replace_the_old_ones_whole(tmp_path):
  path = tmp_path / "sub" / "x.json"
  folds_lib._write_json(str(path), {"a": 1})  # pylint: disable=protected-access
  folds_lib._write_json(str(path), {"b": [1, 2]}, indent=None)  # pylint: disable=protected-access
  assert path.read_text() == '{"b": [1, 2]}\n'
  assert os.listdir(path.parent) == ["x.json"]  # no temporary file left beside it


def test_validation_subsets_are_stratified_seeded_apart_and_leave_training_subsets_unchanged():
  rows = [{"clip_id": f"synth_s{s:02d}_c{k:03d}", "speaker": f"synth_s{s:02d}", "label": (s + k) % 6}
          for s in range(30) for k in range(24)]
  folds = folds_lib.synth_v2_folds()
  plain = folds_lib.make_subsets(rows, folds, fractions=[0.1, 1.0], seeds=[0])
  both = folds_lib.make_subsets(rows, folds, fractions=[0.1, 1.0], seeds=[0], validation=True)
  assert both["subsets"] == plain["subsets"] and "validation_subsets" not in plain
  for f in folds["folds"]:
    parts = folds_lib.split_rows(rows, folds, f["name"])
    val_ids = {r["clip_id"] for r in parts["validation"]}
    small = folds_lib.subset_ids(both, f["name"], 0, 0.1, split="validation")
    full = folds_lib.subset_ids(both, f["name"], 0, 1.0, split="validation")
    assert set(full) == val_ids and set(small) <= val_ids            # validation clips only, nested
    label = {r["clip_id"]: r["label"] for r in rows}
    per_class = np.bincount([label[c] for c in small], minlength=6)
    assert per_class.tolist() == [2] * 6                              # 16 per class -> round(1.6) = 2
    filters = folds_lib.fold_filters(folds, f["name"], folds_lib.subset_ids(both, f["name"], 0, 0.1), small)
    assert filters["eval_filter"] == {"clip_ids": tuple(small)}
    assert filters["test_filter"] == {"where": {"speaker": tuple(f["test"])}}
  with pytest.raises(KeyError, match="validation_subsets"):
    folds_lib.subset_ids(plain, "fold0", 0, 0.1, split="validation")
