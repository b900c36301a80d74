"""The synthetic benchmark avt_synth (data/synth.py, sample/avt_synth)."""

import filecmp
import json
import os

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from avt_jax import input_pipeline, records
from data import folds as folds_lib
from data import synth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "sample", "avt_synth")
SMALL = dict(num_speakers=3, clips_per_speaker=5, pretrain_speakers=2, pretrain_clips_per_speaker=4)


def _files(directory):
  return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs)


def _shard(directory):
  return records.read_shard(os.path.join(directory, synth.SHARD))


def test_same_seed_gives_byte_identical_files(tmp_path):
  synth.generate(str(tmp_path / "a"), seed=5, **SMALL)
  synth.generate(str(tmp_path / "b"), seed=5, **SMALL)
  synth.generate(str(tmp_path / "c"), seed=6, **SMALL)
  files = _files(tmp_path / "a")
  media = [f for f in files if f.endswith(records.MEDIA_SUFFIX)]  # beside each shard, named by its content
  assert [f for f in files if f not in media] == ["dataset_info.json", "manifest.jsonl", "pretrain/dataset_info.json",
                                                  "pretrain/manifest.jsonl", f"pretrain/{synth.SHARD}", synth.SHARD]
  assert [m.rsplit(".", 2)[0] for m in media] == [f"pretrain/{synth.SHARD}", synth.SHARD]
  assert files == _files(tmp_path / "b")
  for f in files:
    assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f
  assert not filecmp.cmp(tmp_path / "a" / synth.SHARD, tmp_path / "c" / synth.SHARD, shallow=False)


def test_records_manifest_and_info_agree(tmp_path):
  out = tmp_path / "s"
  counts = synth.generate(str(out), seed=1, **SMALL)
  assert counts == {"labelled": 15, "pretrain": 8}
  clips, pool = _shard(out), _shard(out / "pretrain")
  manifest = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
  assert [m["clip_id"] for m in manifest] == [c["clip_id"] for c in clips]
  for m, c in zip(manifest, clips):
    t = int(c["num_tokens"])
    assert 8 <= t <= 16
    assert c["audio"].shape == (t, 32) and c["audio"].dtype == np.float32
    assert c["visual"].shape == (t, 17) and c["visual"].dtype == np.float32
    assert 0 <= int(c["label"]) < 6 and m["label"] == int(c["label"])
    assert m["speaker"] == c["speaker"] and m["num_tokens"] == t and m["status"] == "ok"
    assert m["dataset"] == c["dataset"] == "avt_synth"
    a, v, d = c["targets"]
    assert 1 <= a <= 5 and 1 <= v <= 5 and np.isnan(d)
    assert m["targets"][:2] == pytest.approx([a, v], abs=1e-5) and m["targets"][2] is None
  assert {c["speaker"] for c in clips} == {"synth_s00", "synth_s01", "synth_s02"}
  assert {c["speaker"] for c in pool} == {"synthpre_s00", "synthpre_s01"}
  assert all(int(c["label"]) == -1 and np.isnan(c["targets"]).all() for c in pool)
  # Normalisation statistics: numpy over every frame of the unlabelled pool, the same in both parts.
  info = json.loads((out / "dataset_info.json").read_text())
  pool_info = json.loads((out / "pretrain" / "dataset_info.json").read_text())
  for key in ("audio", "visual"):
    frames = np.concatenate([c[key] for c in pool]).astype(np.float64)
    np.testing.assert_allclose(info[key]["mean"], frames.mean(0), atol=2e-6)
    np.testing.assert_allclose(info[key]["std"], frames.std(0), atol=2e-6)
    assert pool_info[key]["mean"] == info[key]["mean"]
  assert info["kind"] == "features" and info["token_rate"] == 5.0 and info["num_clips"] == 15
  # The real input pipeline reads it (geometry checks on every record).
  source = input_pipeline.ClipSource(str(out))
  assert len(source) == 15 and source[3]["clip_id"] == clips[3]["clip_id"]


def test_shipped_sample_is_what_the_generator_writes(tmp_path):
  synth.generate(str(tmp_path / "s"))
  files = _files(SHIPPED)
  assert files == _files(tmp_path / "s")
  for f in files:
    assert filecmp.cmp(os.path.join(SHIPPED, f), tmp_path / "s" / f, shallow=False), f
  assert sum(os.path.getsize(os.path.join(SHIPPED, f)) for f in files) < 5e6


def test_labels_need_both_modalities_and_generalise_across_speakers():
  """A linear probe on clip-mean features (sklearn), speaker-independent: well above chance with both
  modalities, clearly better than with either one alone."""
  clips = _shard(SHIPPED)
  folds = folds_lib.load_folds(os.path.join(REPO, "data", "folds", "avt_synth.json"))
  y = np.array([int(c["label"]) for c in clips])
  counts = np.bincount(y, minlength=6)
  assert counts.min() > 0.6 * len(y) / 6  # Close to balanced.
  spk = np.array([c["speaker"] for c in clips])
  feats = {"audio": np.stack([c["audio"].mean(0) for c in clips]),
           "visual": np.stack([c["visual"].mean(0) for c in clips])}
  feats["both"] = np.concatenate([feats["audio"], feats["visual"]], axis=1)
  acc = {k: [] for k in feats}
  for f in folds["folds"]:
    tr, te = np.isin(spk, f["train"]), np.isin(spk, f["test"])
    for k, x in feats.items():
      model = LogisticRegression(max_iter=3000).fit(x[tr], y[tr])
      acc[k].append(float((model.predict(x[te]) == y[te]).mean()))
  mean = {k: np.mean(v) for k, v in acc.items()}
  assert mean["both"] > 0.6, mean
  assert mean["both"] > max(mean["audio"], mean["visual"]) + 0.08, mean
  # Arousal follows the audio more than the visual stream, valence the reverse (weak cross weights).
  targets = np.stack([c["targets"][:2] for c in clips])
  r2 = {}
  for k in ("audio", "visual"):
    x = np.concatenate([feats[k], np.ones((len(y), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(x, targets, rcond=None)
    resid = targets - x @ coef
    r2[k] = 1 - resid.var(0) / targets.var(0)
  assert r2["audio"][0] > r2["visual"][0] and r2["visual"][1] > r2["audio"][1], r2


def test_refuses_to_replace_a_foreign_directory(tmp_path):
  other = tmp_path / "keep"
  other.mkdir()
  (other / "notes.txt").write_text("precious")
  with pytest.raises(FileExistsError, match="not an avt_synth directory"):
    synth.generate(str(other), **SMALL)
  assert (other / "notes.txt").read_text() == "precious"
  with pytest.raises(ValueError, match="max_tokens"):
    synth.generate(str(tmp_path / "x"), min_tokens=9, max_tokens=8)


def _probe_accuracy(clips, features, fraction):
  """Mean test accuracy of a standardised logistic regression over the 5 v2 folds x subset seeds 0, 1."""
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  folds = folds_lib.synth_v2_folds()
  rows = [dict(clip_id=c["clip_id"], speaker=c["speaker"], label=int(c["label"])) for c in clips]
  subsets = folds_lib.make_subsets(rows, folds, fractions=[fraction], seeds=[0, 1])
  by_id = {c["clip_id"]: c for c in clips}
  accs = []
  for f in folds["folds"]:
    test = [r["clip_id"] for r in folds_lib.split_rows(rows, folds, f["name"])["test"]]
    for seed in (0, 1):
      train = folds_lib.subset_ids(subsets, f["name"], seed, fraction)
      x = np.stack([features(by_id[i]) for i in train])
      scaler = StandardScaler().fit(x)
      model = LogisticRegression(max_iter=2000).fit(scaler.transform(x), [by_id[i]["label"] for i in train])
      pred = model.predict(scaler.transform(np.stack([features(by_id[i]) for i in test])))
      accs.append(np.mean(pred == np.array([by_id[i]["label"] for i in test])))
  return float(np.mean(accs))


def test_v2_hides_the_label_from_input_statistics_but_not_from_the_latent():
  parts, _ = synth.simulate(version=2, seed=0, pretrain_speakers=0, validation_speakers=0)
  clips = parts["labelled"]
  assert len(clips) == 720 and all(int(c["num_tokens"]) == 16 for c in clips)
  stats = lambda c: np.concatenate([c[k].mean(0) for k in ("audio", "visual")] + [c[k].std(0) for k in ("audio",
                                                                                                      "visual")])
  assert _probe_accuracy(clips, stats, 0.1) <= 0.50       # measured 45.7%; v1's clip means give ~71%
  assert _probe_accuracy(clips, lambda c: c["latent_level"], 0.1) >= 0.90   # measured 94.0%


def test_v2_parts_and_the_v1_layout(tmp_path):
  counts = synth.generate(str(tmp_path / "v2"), version=2, num_speakers=2, clips_per_speaker=3, pretrain_speakers=2,
                          pretrain_clips_per_speaker=2, validation_speakers=1)
  assert counts == {"labelled": 6, "pretrain": 4, "pretrain_val": 2}
  info = json.loads((tmp_path / "v2" / "dataset_info.json").read_text())
  assert info["dataset"] == "avt_synth_v2" and info["generator"]["version"] == 2
  held = _shard(tmp_path / "v2" / "pretrain_val")
  assert [c["speaker"] for c in held] == ["synthval_s00"] * 2 and all(int(c["label"]) >= 0 for c in held)
  assert "latent_level" not in held[0]            # the generator's latent is not in the records
  assert all(int(c["label"]) == -1 for c in _shard(tmp_path / "v2" / "pretrain"))
  with pytest.raises(ValueError, match="validation_speakers is a v2 part"):
    synth.generate(str(tmp_path / "v1"), validation_speakers=1)
