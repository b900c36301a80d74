"""Precomputed features: OpenFace FeatureExtraction CSVs (visual) and per-frame .npy arrays (audio).

A clip is a pair `<stem>.npy` (audio embeddings such as TRILL, [frames, Da] at `token_rate` frames per second,
any width) + `<stem>.csv` (OpenFace output). The CSV's 17 AU intensity columns (OPENFACE_AUS, in that order)
are resampled by timestamp to exactly `token_rate`: token t takes the row whose timestamp is nearest the token
centre `first timestamp + (t + 0.5) / token_rate`, among rows with `success == 1` when there are any (OpenFace
writes zeros when tracking fails). T = min(npy frames, CSV tokens), where the CSV spans
`last - first timestamp + one frame period`.
"""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np

from data.media import ClipError, nearest_frame_indices

OPENFACE_AUS = ("AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU12", "AU14", "AU15", "AU17",
                "AU20", "AU23", "AU25", "AU26", "AU45")
AU_COLUMNS = tuple(f"{au}_r" for au in OPENFACE_AUS)


class FeatureFileError(ClipError):
  """A feature file is missing columns, has the wrong shape or cannot be parsed."""


@dataclasses.dataclass
class OpenFaceTable:
  timestamps: np.ndarray  # float64 [N] seconds
  aus: np.ndarray  # float32 [N, 17] AU intensities (0-5)
  success: np.ndarray  # bool [N]
  confidence: np.ndarray  # float32 [N]


def read_openface_csv(path: str) -> OpenFaceTable:
  """Reads an OpenFace FeatureExtraction CSV (column names may carry leading spaces)."""
  try:
    with open(path, newline="") as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise FeatureFileError(path, f"cannot read OpenFace CSV ({e})") from e
  if not rows:
    raise FeatureFileError(path, "empty OpenFace CSV")
  header = [h.strip() for h in rows[0]]
  needed = ("timestamp", "success", "confidence") + AU_COLUMNS
  missing = [c for c in needed if c not in header]
  if missing:
    raise FeatureFileError(path, f"OpenFace CSV lacks columns {missing}")
  body = [r for r in rows[1:] if any(x.strip() for x in r)]
  if not body:
    raise FeatureFileError(path, "OpenFace CSV has a header but no rows")
  col = {c: header.index(c) for c in needed}
  try:
    table = np.array([[float(r[col[c]]) for c in needed] for r in body], np.float64)
  except (ValueError, IndexError) as e:
    raise FeatureFileError(path, f"OpenFace CSV has a malformed row ({e})") from e
  order = np.argsort(table[:, 0], kind="stable")
  table = table[order]
  return OpenFaceTable(timestamps=table[:, 0], success=table[:, 1] > 0.5, confidence=table[:, 2].astype(np.float32),
                       aus=table[:, 3:].astype(np.float32))


def openface_tokens(table: OpenFaceTable, token_rate: float) -> np.ndarray:
  """AU intensities resampled to `token_rate`: float32 [T, 17]."""
  ts = table.timestamps
  period = float(np.median(np.diff(ts))) if ts.size > 1 else 1.0 / token_rate
  duration = ts[-1] - ts[0] + period
  n = max(0, int(math.floor(duration * token_rate + 1e-6)))
  valid = table.success if table.success.any() else np.ones_like(table.success)
  centres = ts[0] + (np.arange(n) + 0.5) / token_rate
  rows = np.flatnonzero(valid)[nearest_frame_indices(ts[valid], centres)] if n else np.zeros(0, int)
  return table.aus[rows]


def load_npy_features(path: str) -> np.ndarray:
  """A [frames, D] float32 array from .npy (a 1-D array is rejected: the width would be ambiguous)."""
  try:
    x = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise FeatureFileError(path, f"cannot read .npy features ({e})") from e
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise FeatureFileError(path, f"expected a [frames, dim] array, got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.number):
    raise FeatureFileError(path, f"expected numeric features, got dtype {x.dtype}")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise FeatureFileError(path, "features contain NaN or infinity")
  return x


@dataclasses.dataclass
class FeatureClip:
  num_tokens: int
  audio: np.ndarray  # float32 [T, Da]
  visual: np.ndarray  # float32 [T, 17]
  info: dict


def extract_features(npy_path: str, csv_path: str, token_rate: float = 5.0, min_tokens: int = 1) -> FeatureClip:
  from data.extract import TooShortError  # local import: extract pulls in OpenCV, not needed otherwise
  audio = load_npy_features(npy_path)
  table = read_openface_csv(csv_path)
  visual = openface_tokens(table, token_rate)
  n = min(audio.shape[0], visual.shape[0])
  if n < max(1, min_tokens):
    raise TooShortError(csv_path, f"too short: {audio.shape[0]} audio frames, {visual.shape[0]} visual tokens "
                                  f"(minimum {max(1, min_tokens)})")
  info = dict(audio_frames_source=int(audio.shape[0]), audio_dim=int(audio.shape[1]),
              openface_rows=int(table.timestamps.size), openface_success_rate=round(float(table.success.mean()), 4),
              visual_tokens_source=int(visual.shape[0]), visual_dim=int(visual.shape[1]), num_tokens=int(n),
              audio_duration=round(audio.shape[0] / token_rate, 6),
              video_duration=round(visual.shape[0] / token_rate, 6))
  return FeatureClip(num_tokens=n, audio=audio[:n], visual=visual[:n], info=info)
