"""Clip ids, speakers, sessions and labels from each corpus' file naming conventions.

| dataset | expected path | clip_id | speaker | session | label | targets |
|---|---|---|---|---|---|---|
| crema_d | `.../<Actor>_<Sentence>_<Emotion>_<Level>.flv` | stem | `crema_<Actor>` | "" | ANG DIS FEA HAP NEU SAD = 0..5 | NaN |
| grid | `.../[sN/]<sentence>.mpg` | stem | `grid_sN` from the parent folder, else "" | "" | -1 | NaN |
| voxceleb2 | `<root>/idXXXXX/<video>/<clip>.mp4` | `idXXXXX/<video>/<clip>` | `idXXXXX` | "" | -1 | NaN |
| msp_improv | `.../sessionK/S01A/P/MSP-IMPROV-S01A-F01-P-FM01.avi` | stem | `msp_F01` | `sessionK` | A H S N = 0..3, else -1 | A, V, D from Evalution.txt |
| generic | anything | path relative to the input root, no suffix | "" | "" | -1 | NaN |

`dataset="auto"` picks per file: CREMA-D names, MSP-IMPROV names, a VoxCeleb2 `idNNNNN/<video>/` layout, GRID
sentence names (`bbaf2n`: command, colour, preposition, letter, digit, adverb), else generic.

MSP-IMPROV's label file ships as `Evalution.txt` (so spelled in the release; some copies are renamed to
`Evaluation.txt`). Each utterance has a summary line naming its video with the UTD-IMPROV- prefix
("UTD-IMPROV-S01A-F01-S-FM01.avi; N; A:3.000000; V:3.500000; D:3.000000;") followed by per-rater lines; the
media carry the MSP-IMPROV- prefix (session1/S01A/S/MSP-IMPROV-S01A-F01-S-FM01.avi, and the separate audio at
Audio/session1/S01A/S/MSP-IMPROV-S01A-F01-S-FM01.wav), so a summary line maps to the clip id
"MSP-IMPROV-" + the name after the prefix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Mapping

from avt_jax import records

DATASETS = ("auto", "crema_d", "grid", "voxceleb2", "msp_improv", "generic")

CREMA_EMOTIONS = records.CLASS_NAMES["crema_d"]
CREMA_RE = re.compile(r"^(\d{4})_([A-Z]{3})_(ANG|DIS|FEA|HAP|NEU|SAD)_([A-Z]{1,2})$")
GRID_RE = re.compile(r"(^|_)[blps][bgrw][abiw][a-z][0-9z][anps]$")
GRID_SPEAKER_RE = re.compile(r"^s\d+$")
VOX_ID_RE = re.compile(r"^id\d+$")
MSP_EMOTIONS = records.CLASS_NAMES["msp_improv"]
MSP_RE = re.compile(r"^MSP-IMPROV-(S\d+[A-Z])-([MF])(\d+)-([A-Z])-([A-Z]{2}\d+)$")
# The label file as released, then the corrected spelling some copies use.
MSP_LABEL_FILES = ("Evalution.txt", "Evaluation.txt")
# Summary line of MSP-IMPROV's label file, e.g. "UTD-IMPROV-S01A-F01-S-FM01.avi; N; A:3.000000; V:3.500000;
# D:3.000000;" (some lines add " ; N:3.000000;", naturalness). A line that starts like one (MSP_EVAL_START) but does
# not parse is an error; every other line (per-rater lines, blank lines) is skipped.
MSP_EVAL_START = re.compile(r"^(?:UTD|MSP)-IMPROV-([A-Za-z0-9-]+)\.avi\s*;")
MSP_EVAL_RE = re.compile(r"^(?:UTD|MSP)-IMPROV-([A-Z0-9-]+)\.avi;\s*([A-Z]);\s*A:\s*(\d+(?:\.\d*)?|NaN)\s*;"
                         r"\s*V:\s*(\d+(?:\.\d*)?|NaN)\s*;\s*D:\s*(\d+(?:\.\d*)?|NaN)\s*;")

NAN3 = (math.nan, math.nan, math.nan)


class LabelError(ValueError):
  """A file name does not follow the naming convention of the dataset it was declared to belong to."""


class MissingLabelFileError(LabelError):
  """The MSP-IMPROV label file is not where it was looked for."""


@dataclasses.dataclass(frozen=True)
class ClipMeta:
  clip_id: str
  dataset: str
  speaker: str = ""
  session: str = ""
  label: int = -1
  targets: tuple[float, float, float] = NAN3

  def to_json(self) -> dict:
    return dict(clip_id=self.clip_id, dataset=self.dataset, speaker=self.speaker, session=self.session,
                label=self.label, targets=[None if math.isnan(t) else t for t in self.targets])


def _stem(relpath: str) -> str:
  return os.path.splitext(os.path.basename(relpath))[0]


def detect_dataset(relpath: str) -> str:
  """The dataset a file most likely belongs to, from its path relative to the input root."""
  stem = _stem(relpath)
  parts = relpath.replace(os.sep, "/").split("/")
  if CREMA_RE.match(stem):
    return "crema_d"
  if MSP_RE.match(stem):
    return "msp_improv"
  if len(parts) >= 3 and VOX_ID_RE.match(parts[-3]):
    return "voxceleb2"
  if GRID_RE.search(stem):
    return "grid"
  return "generic"


def find_msp_improv_labels(root: str) -> tuple[str, str]:
  """(path, note) of the MSP-IMPROV label file in `root`: Evalution.txt (the release's spelling) or Evaluation.txt.

  When both exist Evalution.txt is used and `note` says so (else it is ""). Raises LabelError naming both names
  and `root` when neither exists.
  """
  found = [os.path.join(root, name) for name in MSP_LABEL_FILES if os.path.isfile(os.path.join(root, name))]
  if not found:
    raise MissingLabelFileError(f"no MSP-IMPROV label file in {root}: expected {MSP_LABEL_FILES[0]} (as released) or "
                     f"{MSP_LABEL_FILES[1]} there")
  note = ""
  if len(found) > 1:
    note = (f"{root} holds both {MSP_LABEL_FILES[0]} and {MSP_LABEL_FILES[1]}; using {found[0]} "
            f"(the release's name)")
  return found[0], note


def read_msp_improv_labels(path: str) -> dict[str, tuple[str, tuple[float, float, float]]]:
  """Parses MSP-IMPROV's label file: {"MSP-IMPROV-S01A-F01-P-FM01": (category, (A, V, D))}.

  Summary lines name the video as UTD-IMPROV-<name>.avi (MSP-IMPROV- accepted too); the key is the media's stem,
  MSP-IMPROV-<name>. Per-rater lines are skipped.
  """
  out = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not MSP_EVAL_START.match(line):
        continue
      m = MSP_EVAL_RE.match(line)
      if not m:
        raise LabelError(f"{path}:{lineno}: malformed MSP-IMPROV summary line {line[:120]!r}; expected "
                         f"'UTD-IMPROV-<name>.avi; <category letter>; A:<number>; V:<number>; D:<number>;'")
      a, v, d = (float(x) for x in m.group(3, 4, 5))
      out["MSP-IMPROV-" + m.group(1)] = (m.group(2), (a, v, d))
  if not out:
    raise LabelError(f"{path}: no MSP-IMPROV summary lines ('UTD-IMPROV-<name>.avi; <cat>; A:..; V:..; D:..') found")
  return out


def load_msp_improv_labels(root: str, path: str = "") -> tuple[dict, str, str]:
  """(labels, label file, note): parses `path`, or the label file found in `root` (find_msp_improv_labels)."""
  note = ""
  if path:
    if not os.path.isfile(path):
      raise MissingLabelFileError(f"MSP-IMPROV label file {path} does not exist")
  else:
    path, note = find_msp_improv_labels(root)
  return read_msp_improv_labels(path), path, note


@dataclasses.dataclass
class Resolver:
  """Maps a file (path relative to the input root) to its ClipMeta."""
  dataset: str = "auto"
  msp_labels: Mapping[str, tuple[str, tuple[float, float, float]]] | None = None
  msp_labels_path: str = ""  # where msp_labels came from (named in errors)

  def __post_init__(self):
    if self.dataset not in DATASETS:
      raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {DATASETS}")

  def __call__(self, relpath: str) -> ClipMeta:
    relpath = relpath.replace(os.sep, "/")
    dataset = detect_dataset(relpath) if self.dataset == "auto" else self.dataset
    return getattr(self, "_" + dataset)(relpath)

  def _crema_d(self, relpath: str) -> ClipMeta:
    stem = _stem(relpath)
    m = CREMA_RE.match(stem)
    if not m:
      raise LabelError(f"{relpath}: CREMA-D file names look like ActorID_Sentence_Emotion_Level "
                       f"(e.g. 1001_DFA_ANG_XX) with Emotion in {CREMA_EMOTIONS}; got {stem!r}")
    return ClipMeta(clip_id=stem, dataset="crema_d", speaker=f"crema_{m.group(1)}",
                    label=CREMA_EMOTIONS.index(m.group(3)))

  def _grid(self, relpath: str) -> ClipMeta:
    parts = relpath.split("/")
    parent = parts[-2] if len(parts) >= 2 else ""
    speaker = f"grid_{parent}" if GRID_SPEAKER_RE.match(parent) else ""
    return ClipMeta(clip_id=_stem(relpath), dataset="grid", speaker=speaker)

  def _voxceleb2(self, relpath: str) -> ClipMeta:
    parts = relpath.split("/")
    if len(parts) < 3 or not VOX_ID_RE.match(parts[-3]):
      raise LabelError(f"{relpath}: VoxCeleb2 files are expected at <root>/idXXXXX/<video>/<clip>.mp4")
    clip_id = "/".join(parts[-3:-1] + [_stem(relpath)])
    return ClipMeta(clip_id=clip_id, dataset="voxceleb2", speaker=parts[-3])

  def _msp_improv(self, relpath: str) -> ClipMeta:
    stem = _stem(relpath)
    m = MSP_RE.match(stem)
    if not m:
      raise LabelError(f"{relpath}: MSP-IMPROV file names look like MSP-IMPROV-S01A-F01-P-FM01; got {stem!r}")
    speaker = f"msp_{m.group(2)}{m.group(3)}"
    session = f"session{int(m.group(3))}"
    label, targets = -1, NAN3
    if self.msp_labels is not None:
      if stem not in self.msp_labels:
        where = f" {self.msp_labels_path}" if self.msp_labels_path else ""
        raise LabelError(f"{relpath}: {stem} has no summary line in the MSP-IMPROV label file{where}")
      category, targets = self.msp_labels[stem]
      label = MSP_EMOTIONS.index(category) if category in MSP_EMOTIONS else -1
    return ClipMeta(clip_id=stem, dataset="msp_improv", speaker=speaker, session=session, label=label,
                    targets=tuple(targets))

  def _generic(self, relpath: str) -> ClipMeta:
    return ClipMeta(clip_id=os.path.splitext(relpath)[0], dataset="generic")


RATING_COLUMNS = ("arousal", "valence", "dominance")


def read_ratings_csv(path: str) -> dict[str, tuple[float, float, float]]:
  """{clip_id: (arousal, valence, dominance)} from a CSV with a clip_id column and any of the rating columns.

  Missing columns or empty cells are NaN (unknown). Errors name the file, the line and the field.
  """
  import csv  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise LabelError(f"ratings file {path!r} does not exist")
  out: dict[str, tuple[float, float, float]] = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames or []
    if "clip_id" not in fields or not set(RATING_COLUMNS) & set(fields):
      raise LabelError(f"{path}: expected a header with clip_id and some of {RATING_COLUMNS}, got {fields}")
    for line, row in enumerate(reader, start=2):
      cid = (row.get("clip_id") or "").strip()
      if not cid:
        raise LabelError(f"{path}:{line}: empty clip_id")
      if cid in out:
        raise LabelError(f"{path}:{line}: clip_id {cid!r} is rated twice")
      values = []
      for col in RATING_COLUMNS:
        cell = (row.get(col) or "").strip()
        try:
          values.append(float(cell) if cell else float("nan"))
        except ValueError:
          raise LabelError(f"{path}:{line}: {col}={cell!r} is not a number") from None
      out[cid] = tuple(values)
  return out
