"""Face detection, tracking and cropping with OpenCV's frontal-face Haar cascade.

The cascade file ships inside the opencv-python(-headless) wheel (`cv2.data.haarcascades`), so this works offline.
Pipeline for one clip (frames already on the output frame grid):
  1. detect faces every `detect_every`-th frame in a grayscale copy downscaled to `detect_size` pixels on its short
     side (histogram-equalised);
  2. choose one face per detected frame: the candidate nearest a running median of the per-frame largest faces
     (so a brief false positive elsewhere in the image does not pull the track away), rejecting candidates too far
     from it;
  3. fill frames without a detection by linear interpolation of box centre and size between the neighbouring
     detections (holding the first/last detection at the clip edges);
  4. smooth centre and size over time (running median, then running mean, `smooth_window` frames);
  5. enlarge the square box by `margin` (side * (1 + margin)), shift it down by `shift` * side (the cascade box
     sits high on the face), crop (replicating border pixels where the box leaves the image) and resize to
     `size` x `size` RGB with area interpolation.
If fewer than `min_detection_rate` of the detection frames contain a face, `NoFaceError` names the file.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import cv2
import numpy as np

from data.media import ClipError

CASCADE_NAME = "haarcascade_frontalface_default.xml"


class NoFaceError(ClipError):
  """No usable face track in a clip."""


@dataclasses.dataclass(frozen=True)
class FaceConfig:
  size: int = 64  # output crop side S
  detect_every: int = 1  # run the detector on every k-th frame
  detect_size: int = 160  # short side of the (downscaled) detection image; never upscales
  min_face: float = 0.2  # smallest face side as a fraction of the short image side
  scale_factor: float = 1.1  # cascade pyramid step
  min_neighbors: int = 5  # cascade grouping threshold
  min_detection_rate: float = 0.25  # below this fraction of detection frames with a face: NoFaceError
  gate: float = 0.5  # reject candidates whose centre is farther than gate * reference side from the reference
  smooth_window: int = 5  # frames, running median then running mean (1 disables)
  margin: float = 0.3  # crop side = box side * (1 + margin)
  shift: float = 0.05  # crop centre moved down by shift * box side

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(type="face", detector=f"opencv {cv2.__version__} {CASCADE_NAME}")
    return d


@dataclasses.dataclass
class FaceTrack:
  boxes: np.ndarray  # float64 [N, 3]: centre x, centre y, side of the square crop box (image pixels)
  detected: np.ndarray  # bool [N], frame had an accepted detection
  detection_frames: int  # frames on which the detector ran

  @property
  def detection_rate(self) -> float:
    return float(self.detected.sum()) / max(1, self.detection_frames)


@functools.lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
  path = os.path.join(cv2.data.haarcascades, CASCADE_NAME)
  cascade = cv2.CascadeClassifier(path)
  if cascade.empty():
    raise RuntimeError(f"cannot load the OpenCV face cascade {path}")
  return cascade


def detect_faces(frame: np.ndarray, config: FaceConfig = FaceConfig()) -> np.ndarray:
  """Face boxes [K, 4] (x, y, w, h; float64, original image pixels) in one RGB frame, sorted largest first."""
  gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
  h, w = gray.shape
  scale = min(1.0, config.detect_size / min(h, w))
  if scale < 1.0:
    gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
  gray = cv2.equalizeHist(gray)
  min_side = max(12, int(config.min_face * min(gray.shape)))
  found = _cascade().detectMultiScale(gray, scaleFactor=config.scale_factor, minNeighbors=config.min_neighbors,
                                      minSize=(min_side, min_side))
  boxes = np.asarray(found, np.float64).reshape(-1, 4) / scale
  # Largest first; ties broken by position so the order never depends on the detector's internal threading.
  order = np.lexsort((boxes[:, 1], boxes[:, 0], -boxes[:, 2] * boxes[:, 3]))
  return boxes[order]


def _running(values: np.ndarray, window: int, fn) -> np.ndarray:
  """Applies fn over a centred window along axis 0 (edges padded by repetition)."""
  if window <= 1 or len(values) < 2:
    return values.copy()
  half = window // 2
  padded = np.concatenate([np.repeat(values[:1], half, 0), values, np.repeat(values[-1:], half, 0)])
  windows = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)  # [N, D, window]
  return fn(windows, axis=-1)


def interpolate_track(boxes: np.ndarray, detected: np.ndarray) -> np.ndarray:
  """Fills rows of `boxes` [N, D] where `detected` is False by linear interpolation along time."""
  idx = np.flatnonzero(detected)
  if idx.size == 0:
    raise ValueError("cannot interpolate a track without any detection")
  t = np.arange(len(boxes))
  return np.stack([np.interp(t, idx, boxes[idx, d]) for d in range(boxes.shape[1])], axis=1)


def smooth_track(boxes: np.ndarray, window: int) -> np.ndarray:
  """Running median followed by running mean over `window` frames."""
  return _running(_running(boxes, window, np.median), window, np.mean)


def track_face(frames: np.ndarray, config: FaceConfig = FaceConfig(), path: str = "") -> FaceTrack:
  """Detects and tracks one face over `frames` [N, H, W, 3]; returns square crop boxes for every frame."""
  n = len(frames)
  if n == 0:
    raise NoFaceError(path, "no frames to track a face in")
  step = max(1, config.detect_every)
  det_idx = np.arange(0, n, step)
  candidates = {int(i): detect_faces(frames[i], config) for i in det_idx}
  # Reference: running median (over detection frames) of each frame's largest face, as centre x, centre y, side.
  largest = [(i, c[0]) for i, c in candidates.items() if len(c)]
  if not largest or len(largest) / len(det_idx) < config.min_detection_rate:
    raise NoFaceError(path, f"no face found: {len(largest)} of {len(det_idx)} detection frames have a face "
                            f"(need {config.min_detection_rate:.0%})")
  lx = np.array([[b[0] + b[2] / 2, b[1] + b[3] / 2, (b[2] + b[3]) / 2] for _, b in largest])
  ref_rows = _running(lx, 2 * max(config.smooth_window, 3) + 1, np.median)
  ref_t = np.array([i for i, _ in largest])
  ref = np.stack([np.interp(np.arange(n), ref_t, ref_rows[:, d]) for d in range(3)], axis=1)
  boxes = np.zeros((n, 3))
  detected = np.zeros(n, bool)
  for i, cands in candidates.items():
    if not len(cands):
      continue
    c = np.stack([cands[:, 0] + cands[:, 2] / 2, cands[:, 1] + cands[:, 3] / 2, (cands[:, 2] + cands[:, 3]) / 2], 1)
    dist = np.hypot(c[:, 0] - ref[i, 0], c[:, 1] - ref[i, 1])
    j = int(np.argmin(dist))
    if dist[j] <= config.gate * ref[i, 2]:
      boxes[i], detected[i] = c[j], True
  if detected.sum() / len(det_idx) < config.min_detection_rate:
    raise NoFaceError(path, f"no consistent face track: {int(detected.sum())} of {len(det_idx)} detection frames "
                            f"(need {config.min_detection_rate:.0%})")
  track = smooth_track(interpolate_track(boxes, detected), config.smooth_window)
  side = track[:, 2] * (1.0 + config.margin)
  crop = np.stack([track[:, 0], track[:, 1] + config.shift * track[:, 2], side], axis=1)
  return FaceTrack(boxes=crop, detected=detected, detection_frames=len(det_idx))


def crop_faces(frames: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
  """Crops square boxes (centre x, centre y, side) from frames and resizes to [N, size, size, 3] uint8."""
  out = np.empty((len(frames), size, size, 3), np.uint8)
  for i, (frame, (cx, cy, side)) in enumerate(zip(frames, boxes)):
    s = max(2, int(round(side)))
    x0, y0 = int(round(cx - s / 2)), int(round(cy - s / 2))
    h, w = frame.shape[:2]
    pad = max(0, -x0, -y0, x0 + s - w, y0 + s - h)
    if pad:
      frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
      x0, y0 = x0 + pad, y0 + pad
    patch = frame[y0:y0 + s, x0:x0 + s]
    interp = cv2.INTER_AREA if s >= size else cv2.INTER_LINEAR
    out[i] = cv2.resize(patch, (size, size), interpolation=interp)
  return out


def face_crops(frames: np.ndarray, config: FaceConfig = FaceConfig(), path: str = "") -> tuple[np.ndarray, FaceTrack]:
  """Tracks the face and returns (crops uint8 [N, S, S, 3], track)."""
  track = track_face(frames, config, path)
  return crop_faces(frames, track.boxes, config.size), track
