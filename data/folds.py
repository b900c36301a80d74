r"""Speaker-independent folds and label-fraction subsets (docs/protocols.md).

  python -m data.folds write [--output_dir=data/folds]        # regenerates the shipped folds files
  python -m data.folds check --manifest=<prepared>/manifest.jsonl --folds=data/folds/crema_d.json
  python -m data.folds subsets --manifest=<prepared>/manifest.jsonl --folds=data/folds/crema_d.json \
      --output=<file.json> [--fractions=0.1,0.25,1.0] [--seeds=0,1,2] [--stratify=auto|label|targets]

A folds file is JSON:
  {"dataset": "crema_d", "field": "speaker", "protocol": "<how the folds were made>",
   "folds": [{"name": "fold0", "test": [group, ...], "validation": [...], "train": [...]}, ...]}
`field` is the manifest / record field the groups are values of (speaker for CREMA-D and avt_synth, session for
MSP-IMPROV). Every group is the test group of exactly one fold; in each fold, train, validation and test are
disjoint. The shipped files are written by `python -m data.folds write` from the rules in `crema_d_folds`,
`msp_improv_folds` and `synth_folds`.

A subsets file holds, per fold and seed, the clip ids of each label fraction of the fold's labelled training
clips (see `stratified_subsets`): {"folds": <folds file>, "fractions": [...], "seeds": [...], "stratify": ...,
"subsets": {fold name: {str(seed): {fraction key ("0.1"): [clip ids, sorted]}}}}.
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from avt_jax import records

FOLDS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "folds")
CREMA_D_ACTORS = tuple(range(1001, 1092))  # 91 actors
MSP_IMPROV_SESSIONS = tuple(range(1, 7))
REGRESSION_BINS = 3  # per attribute, at the tertiles of the fold's training targets


class FoldsError(ValueError):
  """A folds or subsets file, or a manifest, does not have the expected content."""


# --------------------------------------------------------------------------------------------------------------
# Fold definitions.
# --------------------------------------------------------------------------------------------------------------


def blocked_folds(groups: Sequence[str], num_folds: int, num_validation: int) -> list[dict[str, list[str]]]:
  """Folds over contiguous blocks of `groups` (in the given order).

  The groups are cut into `num_folds` contiguous blocks (`np.array_split`: the first len % num_folds blocks get
  one group more). Fold k tests block k; its validation groups are the first `num_validation` groups of block
  (k + 1) mod num_folds; it trains on every other group.
  """
  if not 2 <= num_folds <= len(groups):
    raise FoldsError(f"num_folds={num_folds} must be in [2, {len(groups)}] for {len(groups)} groups")
  blocks = [list(b) for b in np.array_split(np.asarray(groups, dtype=object), num_folds)]
  folds = []
  for k, test in enumerate(blocks):
    nxt = blocks[(k + 1) % num_folds]
    if not 1 <= num_validation <= len(nxt):
      raise FoldsError(f"num_validation={num_validation} must be in [1, {len(nxt)}] (size of block {k + 1})")
    validation = nxt[:num_validation]
    held = set(test) | set(validation)
    folds.append({"name": f"fold{k}", "test": test, "validation": validation,
                  "train": [g for g in groups if g not in held]})
  return folds


def crema_d_folds() -> dict[str, Any]:
  """CREMA-D: 5 speaker-independent folds over actors 1001-1091 (manifest speaker 'crema_<actor>')."""
  actors = [f"crema_{a}" for a in CREMA_D_ACTORS]
  return {
      "dataset": "crema_d", "field": "speaker",
      "protocol": ("5 folds over the 91 actors in id order, contiguous blocks of 19, 18, 18, 18, 18 actors "
                   "(1001-1019, 1020-1037, 1038-1055, 1056-1073, 1074-1091); fold k tests block k; validation = "
                   "the first 9 actors of block (k+1) mod 5; train = the other 63-64 actors"),
      "folds": blocked_folds(actors, 5, 9)}


def msp_improv_folds() -> dict[str, Any]:
  """MSP-IMPROV: leave-one-session-out (manifest session 'session<k>'), validation = the next session."""
  sessions = [f"session{s}" for s in MSP_IMPROV_SESSIONS]
  return {
      "dataset": "msp_improv", "field": "session",
      "protocol": ("leave-one-session-out, 6 folds; fold k tests session k+1; validation = session (k+1) mod 6 "
                   "+ 1 (the next session, session6 -> session1); train = the other 4 sessions"),
      "folds": blocked_folds(sessions, 6, 1)}


def synth_folds(num_speakers: int = 20, num_folds: int = 5, num_validation: int = 3,
                dataset: str = "avt_synth", prefix: str = "synth") -> dict[str, Any]:
  """avt_synth (v1) and avt_synth_v2: folds over the labelled speakers <prefix>_s00.. (data/synth.py)."""
  speakers = [f"{prefix}_s{s:02d}" for s in range(num_speakers)]
  return {
      "dataset": dataset, "field": "speaker",
      "protocol": (f"{num_folds} folds over the {num_speakers} labelled speakers in id order, contiguous blocks; "
                   f"fold k tests block k; validation = the first {num_validation} speakers of block "
                   f"(k+1) mod {num_folds}; train = the other speakers"),
      "folds": blocked_folds(speakers, num_folds, num_validation)}


def synth_v2_folds() -> dict[str, Any]:
  """avt_synth_v2: 30 labelled speakers, 5 folds of 6 test speakers, 4 validation, 20 training speakers."""
  return synth_folds(30, 5, 4, dataset="avt_synth_v2")


def synth_v2_pool_folds() -> dict[str, Any]:
  """avt_synth_v2's held-out pool speakers (pretrain_val/, synthval_s00..s09), for choosing settings without the
  benchmark's folds: 5 folds of 2 test, 2 validation and 6 training speakers."""
  return synth_folds(10, 5, 2, dataset="avt_synth_v2/pretrain_val", prefix="synthval")


SHIPPED = {"crema_d.json": crema_d_folds, "msp_improv.json": msp_improv_folds, "avt_synth.json": synth_folds,
           "avt_synth_v2.json": synth_v2_folds, "avt_synth_v2_pool.json": synth_v2_pool_folds}


# --------------------------------------------------------------------------------------------------------------
# Reading and checking.
# --------------------------------------------------------------------------------------------------------------


def check_folds(folds: Mapping[str, Any], where: str = "folds") -> None:
  """Raises FoldsError unless every fold's splits are disjoint and every group is tested exactly once."""
  for key in ("field", "folds"):
    if key not in folds:
      raise FoldsError(f"{where}: missing key {key!r} (expected dataset, field, protocol, folds)")
  names = [f.get("name") for f in folds["folds"]]
  if len(set(names)) != len(names) or None in names:
    raise FoldsError(f"{where}: fold names must be present and unique, got {names}")
  every = set()
  tested = collections.Counter()
  for f in folds["folds"]:
    parts = {}
    for split in ("train", "validation", "test"):
      if not isinstance(f.get(split), list) or not f[split]:
        raise FoldsError(f"{where}: fold {f['name']!r} needs a non-empty list {split!r}")
      parts[split] = set(map(str, f[split]))
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
      common = parts[a] & parts[b]
      if common:
        raise FoldsError(f"{where}: fold {f['name']!r} has groups in both {a} and {b}: {sorted(common)[:5]}")
    every |= parts["train"] | parts["validation"] | parts["test"]
    tested.update(parts["test"])
  missing = sorted(every - set(tested))
  twice = sorted(g for g, n in tested.items() if n > 1)
  if missing or twice:
    raise FoldsError(f"{where}: every group must be a test group exactly once; never tested: {missing[:5]}, "
                     f"tested more than once: {twice[:5]}")


def _read_json(path: str, what: str, missing_hint: str) -> Any:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} {path} not found ({missing_hint})")
  try:
    return records.read_json(path, what=what, object_only=True)
  except records.RecordError as e:
    raise FoldsError(str(e)) from None


def load_folds(path: str) -> dict[str, Any]:
  folds = _read_json(path, "folds file", f"shipped ones are in {FOLDS_DIR}")
  check_folds(folds, path)
  return folds


def get_fold(folds: Mapping[str, Any], fold: str | int) -> dict[str, Any]:
  """A fold by name ('fold2') or index (2)."""
  for k, f in enumerate(folds["folds"]):
    if f["name"] == fold or (isinstance(fold, int) and k == fold):
      return f
  raise KeyError(f"fold {fold!r} not in {[f['name'] for f in folds['folds']]}")


def read_manifest(path: str) -> list[dict[str, Any]]:
  """The `ok` rows of a manifest.jsonl (a prepared directory is accepted too)."""
  if os.path.isdir(path):
    path = os.path.join(path, "manifest.jsonl")
  try:
    every = records.read_jsonl(path, what="manifest")
  except records.RecordError as e:
    raise FoldsError(str(e)) from None
  rows = []
  for n, row in enumerate(every, 1):
    if not isinstance(row, dict) or "clip_id" not in row:
      raise FoldsError(f"{path}: row {n} is not an object with a 'clip_id'")
    if row.get("status", "ok") == "ok":
      rows.append(row)
  return rows


def split_rows(rows: Iterable[Mapping[str, Any]], folds: Mapping[str, Any],
               fold: str | int) -> dict[str, list[Mapping[str, Any]]]:
  """The manifest rows of a fold's train / validation / test groups (rows of other groups are left out)."""
  f = get_fold(folds, fold)
  field = folds["field"]
  which = {str(g): split for split in ("train", "validation", "test") for g in f[split]}
  out = {"train": [], "validation": [], "test": []}
  for r in rows:
    if field not in r:
      raise FoldsError(f"manifest row {r.get('clip_id')!r} has no field {field!r} (folds are by {field})")
    split = which.get(str(r[field]))
    if split:
      out[split].append(r)
  return out


def fold_filters(folds: Mapping[str, Any], fold: str | int, train_clip_ids: Sequence[str] | None = None,
                 validation_clip_ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  """Trainer data filters (config.data.<split>_filter) of a fold, with tuples inside.

  {"train_filter": {"where": {field: train groups}} or {"clip_ids": subset} when `train_clip_ids` is given,
   "eval_filter": {"where": {field: validation groups}} or {"clip_ids": ...} when `validation_clip_ids` is given,
   "test_filter": {"where": {field: test groups}}}
  """
  f = get_fold(folds, fold)
  field = folds["field"]
  out = {"train_filter": {"where": {field: tuple(map(str, f["train"]))}},
         "eval_filter": {"where": {field: tuple(map(str, f["validation"]))}},
         "test_filter": {"where": {field: tuple(map(str, f["test"]))}}}
  if train_clip_ids is not None:
    out["train_filter"] = {"clip_ids": tuple(train_clip_ids)}
  if validation_clip_ids is not None:
    out["eval_filter"] = {"clip_ids": tuple(validation_clip_ids)}
  return out


# --------------------------------------------------------------------------------------------------------------
# Label-fraction subsets.
# --------------------------------------------------------------------------------------------------------------


def _targets(row: Mapping[str, Any]) -> list[float]:
  t = row.get("targets") or []
  return [float("nan") if v is None else float(v) for v in t]


def strata(rows: Sequence[Mapping[str, Any]], stratify: str,
           target_indices: Sequence[int] = (0, 1)) -> dict[str, str]:
  """clip id -> stratum of the labelled rows (rows without the label are left out).

  'label': the class (rows with label >= 0). 'targets': the tuple of per-attribute bins (rows whose targets at
  `target_indices` are all known), each attribute cut into REGRESSION_BINS bins at its tertiles over `rows`.
  """
  if stratify == "label":
    return {r["clip_id"]: f"class{int(r['label'])}" for r in rows if int(r.get("label", -1)) >= 0}
  if stratify != "targets":
    raise ValueError(f"stratify={stratify!r}; expected 'label' or 'targets'")
  known = [(r["clip_id"], [_targets(r)[i] if i < len(_targets(r)) else float("nan") for i in target_indices])
           for r in rows]
  known = [(c, t) for c, t in known if all(math.isfinite(v) for v in t)]
  if not known:
    return {}
  values = np.asarray([t for _, t in known], np.float64)
  qs = np.linspace(0, 1, REGRESSION_BINS + 1)[1:-1]
  edges = [np.quantile(values[:, j], qs) for j in range(values.shape[1])]
  out = {}
  for (cid, _), v in zip(known, values):
    bins = [int(np.searchsorted(edges[j], v[j], side="right")) for j in range(len(v))]
    out[cid] = "bins" + "-".join(map(str, bins))
  return out


def stratified_subsets(stratum_of: Mapping[str, str], fractions: Sequence[float], seed: int,
                       salt: int = 0) -> dict[float, list[str]]:
  """Nested, stratified subsets of the clips in `stratum_of` (clip id -> stratum), one per fraction.

  For each stratum (in sorted order) the clip ids are sorted and permuted once with
  numpy.random.default_rng(SeedSequence([seed, salt])); the subset of fraction f takes the first
  max(1, round(f * n)) clips of each stratum's permutation (n = the stratum's size, f = 1 takes all). So each
  stratum's count is within one clip of f * n (at least one clip per stratum), and a smaller fraction's subset is
  inside every larger one's for the same seed. Returns {fraction: sorted clip ids}.
  """
  for f in fractions:
    if not 0 < f <= 1:
      raise ValueError(f"fraction {f} must be in (0, 1]")
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(salt)]))
  by_stratum = collections.defaultdict(list)
  for cid, s in stratum_of.items():
    by_stratum[s].append(cid)
  order = {s: [sorted(ids)[i] for i in rng.permutation(len(ids))] for s, ids in sorted(by_stratum.items())}
  out = {}
  for f in fractions:
    chosen = []
    for ids in order.values():
      n = len(ids) if f == 1 else max(1, int(math.floor(f * len(ids) + 0.5)))
      chosen.extend(ids[:n])
    out[f] = sorted(chosen)
  return out


def fraction_key(fraction: float) -> str:
  return repr(float(fraction))


def infer_stratify(rows: Sequence[Mapping[str, Any]]) -> str:
  """'label' if the rows have class labels, else 'targets'."""
  return "label" if any(int(r.get("label", -1)) >= 0 for r in rows) else "targets"


VALIDATION_SALT = 1000  # Seeds validation subsets apart from the training subsets of the same fold.


def make_subsets(rows: Sequence[Mapping[str, Any]], folds: Mapping[str, Any], *, fractions: Sequence[float],
                 seeds: Sequence[int], stratify: str = "auto", folds_name: str = "",
                 target_indices: Sequence[int] = (0, 1), validation: bool = False) -> dict[str, Any]:
  """Subsets of every fold's labelled training clips (see the module docstring for the layout).

  With `validation`, also subsets of each fold's labelled validation clips ("validation_subsets", same layout and
  rule, salt VALIDATION_SALT + k): a low-label run then selects its checkpoint on as few labels as it trains on.
  """
  if stratify == "auto":
    stratify = infer_stratify(rows)
  subsets, val_subsets = {}, {}
  for k, f in enumerate(folds["folds"]):
    parts = split_rows(rows, folds, f["name"])
    for split, out, salt in (("train", subsets, k), ("validation", val_subsets, VALIDATION_SALT + k)):
      if split == "validation" and not validation:
        continue
      stratum_of = strata(parts[split], stratify, target_indices)
      if not stratum_of:
        raise FoldsError(f"fold {f['name']!r}: no labelled {split} clips to draw subsets from "
                         f"(stratify={stratify!r}; {len(parts[split])} {split} rows)")
      out[f["name"]] = {
          str(s): {fraction_key(fr): ids for fr, ids in stratified_subsets(stratum_of, fractions, s, salt).items()}
          for s in seeds}
  data = {"folds": folds_name, "dataset": folds.get("dataset", ""), "fractions": [float(x) for x in fractions],
          "seeds": [int(s) for s in seeds], "stratify": stratify, "target_indices": list(target_indices),
          "rule": ("per fold k and seed s, each stratum's sorted clip ids permuted by "
                   "numpy.random.default_rng(SeedSequence([s, k])); fraction f keeps the first max(1, round(f*n))"),
          "subsets": subsets}
  if validation:
    data["validation_subsets"] = val_subsets
    data["validation_rule"] = f"the same on the fold's validation clips with SeedSequence([s, {VALIDATION_SALT} + k])"
  return data


def load_subsets(path: str) -> dict[str, Any]:
  data = _read_json(path, "subsets file", "write it with `python -m data.folds subsets`")
  if "subsets" not in data:
    raise FoldsError(f"{path}: no 'subsets' key (expected the output of `python -m data.folds subsets`)")
  return data


def subset_ids(subsets: Mapping[str, Any], fold: str, seed: int, fraction: float,
               split: str = "train") -> list[str]:
  """The clip ids of a subset of the fold's training (or, split='validation', validation) clips."""
  key = "subsets" if split == "train" else "validation_subsets"
  if key not in subsets:
    raise KeyError(f"subsets file has no {key!r} (write it with validation subsets: make_subsets(validation=True))")
  try:
    return subsets[key][fold][str(seed)][fraction_key(fraction)]
  except KeyError:
    raise KeyError(f"subsets file has no {'' if split == 'train' else 'validation '}clip ids for fold {fold!r}, seed {seed}, fraction {fraction} (it "
                   f"has folds {sorted(subsets[key])}, seeds {subsets.get('seeds')}, fractions "
                   f"{subsets.get('fractions')})") from None


def _write_json(path: str, data: Any, indent: int | None = 1) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  records.write_atomic(path, json.dumps(data, indent=indent) + "\n")


def describe(rows: Sequence[Mapping[str, Any]], folds: Mapping[str, Any]) -> str:
  """One line per fold: groups and clip counts of train / validation / test."""
  lines = []
  present = {str(r.get(folds["field"])) for r in rows}
  for f in folds["folds"]:
    parts = split_rows(rows, folds, f["name"])
    missing = [g for s in ("train", "validation", "test") for g in f[s] if str(g) not in present]
    lines.append(f"{f['name']}: " + ", ".join(f"{s} {len(f[s])} groups / {len(parts[s])} clips"
                                               for s in ("train", "validation", "test"))
                 + (f"; groups without clips: {missing[:8]}" if missing else ""))
  return "\n".join(lines)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ("write", "check", "subsets"):
    raise SystemExit("usage: python -m data.folds write|check|subsets [flags] (see the module docstring)")
  cmd = argv[1]
  if cmd == "write":
    for name, fn in SHIPPED.items():
      folds = fn()
      check_folds(folds, name)
      path = os.path.join(f.output_dir, name)
      _write_json(path, folds)
      print(f"wrote {path}: {len(folds['folds'])} folds by {folds['field']}")
    return
  if not f.manifest or not f.folds:
    raise SystemExit(f"{cmd} needs --manifest and --folds")
  rows = read_manifest(f.manifest)
  folds = load_folds(f.folds)
  print(describe(rows, folds))
  if cmd == "subsets":
    if not f.output:
      raise SystemExit("subsets needs --output=<file.json>")
    fractions = [float(x) for x in f.fractions]
    seeds = [int(x) for x in f.seeds]
    data = make_subsets(rows, folds, fractions=fractions, seeds=seeds, stratify=f.stratify,
                        folds_name=os.path.relpath(f.folds) if not os.path.isabs(f.folds) else f.folds,
                        target_indices=[int(x) for x in f.target_indices])
    _write_json(f.output, data, indent=None)
    first = data["subsets"][folds["folds"][0]["name"]][str(seeds[0])]
    print(f"wrote {f.output} (stratify={data['stratify']}); {folds['folds'][0]['name']} seed {seeds[0]}: "
          + ", ".join(f"{k}: {len(v)} clips" for k, v in first.items()))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("output_dir", FOLDS_DIR, "write: directory of the folds files.")
  flags.DEFINE_string("manifest", "", "manifest.jsonl of a prepared directory (or the directory).")
  flags.DEFINE_string("folds", "", "Folds file (data/folds/<dataset>.json).")
  flags.DEFINE_string("output", "", "subsets: output JSON file.")
  flags.DEFINE_list("fractions", ["0.1", "0.25", "1.0"], "subsets: label fractions of the training clips.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "subsets: seeds (one subset family per seed).")
  flags.DEFINE_enum("stratify", "auto", ["auto", "label", "targets"],
                    "subsets: by class label, by binned targets, or auto (label when the clips have labels).")
  flags.DEFINE_list("target_indices", ["0", "1"], "subsets with stratify=targets: target columns to bin.")
  app.run(main)
