"""Face detection, tracking and cropping for talking-face clips.

Detectors (`FaceConfig.detector`), both offline (their models ship inside the wheels):
  * "yunet" (default): YuNet (libfacedetection, weights compiled into the `yuface` wheel); boxes, confidences and five
    landmarks (two eyes, nose tip, two mouth corners, in the detector's order);
  * "haar": OpenCV's frontal-face Haar cascade (the file ships in opencv-python-headless < 5); boxes only. Kept as a
    fallback: it misses profile and tilted faces.

Pipeline for one clip (frames already on the output frame grid), `mode="track"`:
  1. scene cuts: a frame whose 32x32 grayscale thumbnail differs from the previous one by more than `cut_threshold`
     (mean absolute difference, 0-255) starts a new shot; shots are tracked separately;
  2. detection on every `detect_every`-th frame of each shot and on its last frame, in a copy downscaled to
     `detect_size` pixels on its short side (retried at up to `retry_size` when nothing is found, for small faces);
     between two detections whose main face moved or resized by more than `refine_motion` of its side, the middle
     frame is detected too, and where the face there is off the straight line between them, both halves in turn,
     so detections are dense where the head moves irregularly and sparse where it is still or moves steadily; where a scheduled detection finds no face (a lost track), every frame up to the neighbouring
     scheduled detections is detected too;
  3. one face per detected frame: the candidate nearest a running median of the per-frame main faces (largest, with
     distance from the image centre as a penalty), rejecting candidates farther than `gate` * side from it, so a
     brief false positive or a second person does not pull the track away;
  4. frames without an accepted detection are filled by linear interpolation of box centre, size (and landmarks)
     between neighbouring detections of the same shot (held at the shot's edges; a shot without any face takes the
     nearest detection of another shot);
  5. centre and size are smoothed within each shot by a centred running median, then a running mean
     (`smooth_window` frames): centred windows add no lag;
  6. the square box is enlarged by `margin` (side * (1 + margin)), shifted down by `shift` * side (the cascade's box
     sits high on the face; YuNet's does not), cropped (border pixels replicated where the box leaves the image) and
     resized to `size` x `size` RGB with area interpolation.
`mode="centred"` is for datasets that are already face crops (VoxCeleb2's official 224x224 mp4s): the centred square
of the frame (side = short side * `centred_scale`) is used without detection, after a sanity check that runs the
detector on `centred_checks` evenly spaced frames and refuses the clip unless most of them show a face near the centre.
If fewer than `min_detection_rate` of the detection frames contain a face, `NoFaceError` names the file.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import glob
import os
import threading
from typing import Any, Mapping

import cv2
import numpy as np

from data.media import ClipError

CASCADE_NAME = "haarcascade_frontalface_default.xml"
DETECTORS = ("yunet", "haar")
MODES = ("track", "centred")
# Crop centre shift (fraction of the box side) that centres each detector's box on the face.
DEFAULT_SHIFT = {"yunet": 0.0, "haar": 0.05}
THUMB = 32  # about the side of the gray thumbnails compared for scene cuts


class NoFaceError(ClipError):
  """No usable face track in a clip."""


@dataclasses.dataclass(frozen=True)
class FaceConfig:
  size: int = 64  # output crop side S
  detector: str = "yunet"  # one of DETECTORS
  mode: str = "track"  # "track": detect and follow the face; "centred": the frame is already a face crop
  detect_every: int = 10  # run the detector on every k-th frame of a shot (and on its last frame)
  refine_motion: float = 0.05  # detect in between while the face moves more than this fraction of its side (0: off)
  detect_size: int = 160  # short side of the (downscaled) detection image; never upscales
  retry_size: int = 480  # when nothing is found, detect again at up to this short side (0: no retry)
  min_score: float = 0.6  # YuNet confidence threshold
  min_face: float = 0.08  # smallest face (longer box side) as a fraction of the short image side
  scale_factor: float = 1.1  # cascade pyramid step
  min_neighbors: int = 5  # cascade grouping threshold
  min_detection_rate: float = 0.25  # below this fraction of detection frames with a face: NoFaceError
  gate: float = 0.5  # reject candidates whose centre is farther than gate * reference side from the reference
  cut_threshold: float = 40.0  # mean absolute thumbnail difference (0-255) that marks a scene cut (0: no cuts)
  smooth_window: int = 5  # frames, running median then running mean (1 disables)
  margin: float = 0.3  # crop side = box side * (1 + margin)
  shift: float | None = None  # crop centre moved down by shift * box side; None: DEFAULT_SHIFT[detector]
  centred_scale: float = 1.0  # centred mode: crop side = short image side * centred_scale
  centred_checks: int = 3  # centred mode: frames checked for a face near the centre

  def __post_init__(self):
    if self.detector not in DETECTORS:
      raise ValueError(f"face detector must be one of {DETECTORS}, got {self.detector!r}")
    if self.mode not in MODES:
      raise ValueError(f"face mode must be one of {MODES}, got {self.mode!r}")
    if self.detect_every < 1 or self.size < 2:
      raise ValueError(f"face detect_every must be >= 1 and size >= 2, got {self.detect_every}, {self.size}")

  @property
  def crop_shift(self) -> float:
    return DEFAULT_SHIFT[self.detector] if self.shift is None else float(self.shift)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(type="face", shift=self.crop_shift, detector_model=detector_model(self.detector))
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "FaceConfig":
    """The config written by `to_dict` (unknown keys ignored). Datasets prepared before detectors could be chosen
    recorded the cascade's description under "detector" and tracked with the defaults of that time."""
    fields = {f.name for f in dataclasses.fields(cls)}
    params = {k: v for k, v in d.items() if k in fields}
    if str(params.get("detector", "")).startswith("opencv"):
      params.update(detector="haar", detect_every=d.get("detect_every", 1), min_face=d.get("min_face", 0.2),
                    retry_size=0, cut_threshold=0.0, refine_motion=0.0)
    return cls(**params)


def detector_model(detector: str) -> str:
  if detector == "haar":
    return f"opencv {cv2.__version__} {CASCADE_NAME}"
  return f"YuNet (libfacedetection, yuface {_version('yuface')})"


def _version(package: str) -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "unknown"


@dataclasses.dataclass
class Detections:
  """Faces found in one frame, largest first (original image pixels)."""
  boxes: np.ndarray  # float64 [K, 4]: x, y, w, h
  scores: np.ndarray  # float64 [K], in [0, 1] (1 for the cascade, which has no score)
  landmarks: np.ndarray | None  # float64 [K, 5, 2] (x, y) or None when the detector gives none

  def __len__(self) -> int:
    return len(self.boxes)

  @property
  def centres(self) -> np.ndarray:
    """[K, 3]: centre x, centre y, side ((w + h) / 2)."""
    b = self.boxes
    return np.stack([b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2, (b[:, 2] + b[:, 3]) / 2], axis=1)


@dataclasses.dataclass
class FaceTrack:
  boxes: np.ndarray  # float64 [N, 3]: centre x, centre y, side of the square crop box (image pixels)
  detected: np.ndarray  # bool [N], frame had an accepted detection
  detection_frames: int  # frames on which the detector ran
  landmarks: np.ndarray | None = None  # float64 [N, 5, 2] image pixels (interpolated between detections), or None
  scene_cuts: tuple[int, ...] = ()  # frames that start a new shot (after frame 0)

  @property
  def detection_rate(self) -> float:
    return float(self.detected.sum()) / max(1, self.detection_frames)

  @property
  def jitter(self) -> float:
    """Median frame-to-frame shift of the crop centre, as a fraction of the crop side (0 for one frame)."""
    if len(self.boxes) < 2:
      return 0.0
    step = np.hypot(*np.diff(self.boxes[:, :2], axis=0).T)
    return float(np.median(step / np.maximum(self.boxes[1:, 2], 1e-9)))

  def summary(self) -> dict[str, Any]:
    """Per-clip quality figures for the manifest: detection rate, jitter, cuts and, where the detector gives them,
    the median landmarks in crop coordinates (0-1, x then y per point) over the detected frames."""
    out = dict(face_detection_rate=round(self.detection_rate, 4), face_jitter=round(self.jitter, 5),
               face_detection_frames=int(self.detection_frames), face_scene_cuts=len(self.scene_cuts))
    if self.landmarks is not None and self.detected.any():
      b = self.boxes[self.detected]
      rel = (self.landmarks[self.detected] - (b[:, None, :2] - b[:, None, 2:] / 2)) / b[:, None, 2:]
      out["face_landmarks"] = [round(float(x), 3) for x in np.median(rel, axis=0).reshape(-1)]
    return out


@functools.lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
  path = os.path.join(cv2.data.haarcascades, CASCADE_NAME)
  cascade = cv2.CascadeClassifier(path)
  if cascade.empty():
    raise RuntimeError(f"cannot load the OpenCV face cascade {path}")
  return cascade


def _resized(frame: np.ndarray, short_side: int) -> tuple[np.ndarray, float]:
  h, w = frame.shape[:2]
  scale = min(1.0, short_side / min(h, w)) if short_side else 1.0
  if scale < 1.0:
    frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
  return frame, scale


def _detect_haar(image: np.ndarray, config: FaceConfig) -> Detections:
  gray = cv2.equalizeHist(image)
  min_side = max(12, int(config.min_face * min(gray.shape)))
  found = _cascade().detectMultiScale(gray, scaleFactor=config.scale_factor, minNeighbors=config.min_neighbors,
                                      minSize=(min_side, min_side))
  boxes = np.asarray(found, np.float64).reshape(-1, 4)
  return Detections(boxes, np.ones(len(boxes)), None)


@functools.cache
def _yuface_openmp() -> ctypes.CDLL | None:
  """The OpenMP runtime the yuface wheel bundles (or the system's it links), or None where it has none."""
  import yuface  # pylint: disable=import-outside-toplevel
  libs = os.path.join(os.path.dirname(os.path.dirname(yuface.__file__)), "yuface.libs")
  for name in sorted(glob.glob(os.path.join(libs, "libgomp*.so*"))) + ["libgomp.so.1"]:
    try:
      return ctypes.CDLL(name)
    except OSError:
      continue
  return None


_one_openmp_thread = threading.local()


def _yuface():
  """yuface, with this thread's YuNet running on one OpenMP thread.

  By default YuNet's layers run on an OpenMP team as wide as the machine. On detection-sized frames the team costs
  more than it gains (48 clips, two cores, one worker: 15.2 s wall vs 10.9 s on one thread), and the busy-waiting
  teams of several workers starve each other (two workers: 35.4 s vs 12.0 s); the worker pool gives the parallelism.
  The setting is per thread in OpenMP, hence once per calling thread.
  """
  import yuface  # pylint: disable=import-outside-toplevel
  if not getattr(_one_openmp_thread, "set", False):
    lib = _yuface_openmp()
    if lib is not None:
      lib.omp_set_num_threads(1)
    _one_openmp_thread.set = True
  return yuface


def _detect_yunet(image: np.ndarray, config: FaceConfig) -> Detections:
  yuface = _yuface()
  scores, boxes, landmarks = yuface.detect(np.ascontiguousarray(image[..., ::-1]), conf=config.min_score)  # BGR
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  keep = np.maximum(boxes[:, 2], boxes[:, 3]) >= config.min_face * min(image.shape[:2])
  return Detections(boxes[keep], np.asarray(scores, np.float64)[keep] / 100.0,
                    np.asarray(landmarks, np.float64).reshape(-1, 5, 2)[keep])


_DETECT = {"haar": _detect_haar, "yunet": _detect_yunet}


def _scaled(d: Detections, scale: float) -> Detections:
  lm = None if d.landmarks is None else d.landmarks / scale
  return Detections(d.boxes / scale, d.scores, lm)


def detect_faces(frame: np.ndarray, config: FaceConfig = FaceConfig()) -> Detections:
  """Faces in one RGB frame (original image pixels), largest first."""
  if config.detector == "haar":  # the cascade works on gray levels: convert before downscaling
    frame = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
  image, scale = _resized(frame, config.detect_size)
  found = _scaled(_DETECT[config.detector](image, config), scale)
  if not len(found) and config.retry_size > config.detect_size and scale < 1.0:
    image, scale = _resized(frame, config.retry_size)
    found = _scaled(_DETECT[config.detector](image, config), scale)
  b = found.boxes
  # Largest first; ties broken by position so the order never depends on the detector's internal threading.
  order = np.lexsort((b[:, 1], b[:, 0], -b[:, 2] * b[:, 3]))
  return Detections(b[order], found.scores[order], None if found.landmarks is None else found.landmarks[order])


def scene_cuts(frames: np.ndarray, threshold: float) -> list[int]:
  """Frames (> 0) whose gray thumbnail (mean of the channels on a grid of about THUMB x THUMB pixels) differs from
  the previous frame's by more than `threshold` on average."""
  if threshold <= 0 or len(frames) < 2:
    return []
  h, w = frames.shape[1:3]
  thumbs = frames[:, ::max(1, h // THUMB), ::max(1, w // THUMB)].mean(axis=-1, dtype=np.float32)
  diff = np.abs(np.diff(thumbs, axis=0)).mean(axis=(1, 2))
  return [int(i) + 1 for i in np.flatnonzero(diff > threshold)]


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


def _schedule(start: int, stop: int, every: int) -> list[int]:
  frames = list(range(start, stop, every))
  return frames + [stop - 1] if frames[-1] != stop - 1 else frames


def _main_face(d: Detections, image_shape) -> np.ndarray:
  """The detection most likely to be the speaker: largest, penalised by distance from the image centre."""
  h, w = image_shape[:2]
  c = d.centres
  off = np.hypot(c[:, 0] - w / 2, c[:, 1] - h / 2)
  return c[int(np.argmax(c[:, 2] - 0.5 * off))]


def _refine(frames: np.ndarray, found: dict[int, Detections], a: int, b: int, config: FaceConfig) -> None:
  """Between detections a < b whose main face moved or resized by more than `refine_motion` of its side, detects
  the middle frame; where that face is off the straight line from a to b by more than the same fraction (motion
  that interpolation would not follow), both halves are refined in turn."""
  if b - a < 2 or config.refine_motion <= 0 or not (len(found[a]) and len(found[b])):
    return
  ca, cb = (_main_face(found[i], frames.shape[1:]) for i in (a, b))
  limit = config.refine_motion * min(ca[2], cb[2])
  if max(np.hypot(*(cb[:2] - ca[:2])), abs(cb[2] - ca[2])) <= limit:
    return
  m = (a + b) // 2
  found[m] = detect_faces(frames[m], config)
  if len(found[m]):
    line = ca + (cb - ca) * (m - a) / (b - a)
    cm = _main_face(found[m], frames.shape[1:])
    if max(np.hypot(*(cm[:2] - line[:2])), abs(cm[2] - line[2])) <= limit:
      return
  _refine(frames, found, a, m, config)
  _refine(frames, found, m, b, config)


def _detect_shot(frames: np.ndarray, start: int, stop: int, config: FaceConfig) -> dict[int, Detections]:
  planned = _schedule(start, stop, config.detect_every)
  found = {i: detect_faces(frames[i], config) for i in planned}
  for a, b in zip(planned[:-1], planned[1:]):
    _refine(frames, found, a, b, config)
  # A scheduled detection without a face: detect every frame up to the neighbouring scheduled ones.
  for k, i in enumerate(planned):
    if len(found[i]):
      continue
    lo = planned[k - 1] + 1 if k else start
    hi = planned[k + 1] if k + 1 < len(planned) else stop
    for j in range(lo, hi):
      if j not in found:
        found[j] = detect_faces(frames[j], config)
  return found


def track_face(frames: np.ndarray, config: FaceConfig = FaceConfig(), path: str = "") -> FaceTrack:
  """Detects and tracks one face over `frames` [N, H, W, 3]; returns square crop boxes for every frame."""
  n = len(frames)
  if n == 0:
    raise NoFaceError(path, "no frames to track a face in")
  if config.mode == "centred":
    return centred_track(frames, config, path)
  cuts = scene_cuts(frames, config.cut_threshold)
  bounds = [0] + cuts + [n]
  candidates: dict[int, Detections] = {}
  for a, b in zip(bounds[:-1], bounds[1:]):
    candidates.update(_detect_shot(frames, a, b, config))
  have = sorted(i for i, c in candidates.items() if len(c))
  need = f"need {config.min_detection_rate:.0%}"
  if not have or len(have) / len(candidates) < config.min_detection_rate:
    raise NoFaceError(path, f"no face found: {len(have)} of {len(candidates)} detection frames have a face ({need})")
  boxes = np.zeros((n, 3))
  landmarks = np.zeros((n, 5, 2))
  detected = np.zeros(n, bool)
  with_landmarks = config.detector != "haar"
  for a, b in zip(bounds[:-1], bounds[1:]):
    shot = [i for i in have if a <= i < b]
    if not shot:
      continue
    # Reference: running median (over this shot's detection frames) of each frame's main face.
    main = np.stack([_main_face(candidates[i], frames.shape[1:]) for i in shot])
    # The window spans about 2 * smooth_window + 1 frames (at least 3 detections), so fast motion is followed.
    window = max(3, (2 * max(config.smooth_window, 3) + 1) // config.detect_every) | 1
    ref_rows = _running(main, window, np.median)
    for i, ref in zip(shot, ref_rows):
      c = candidates[i].centres
      dist = np.hypot(c[:, 0] - ref[0], c[:, 1] - ref[1])
      j = int(np.argmin(dist))
      if dist[j] <= config.gate * ref[2]:
        boxes[i], detected[i] = c[j], True
        if with_landmarks:
          landmarks[i] = candidates[i].landmarks[j]
  if detected.sum() / len(candidates) < config.min_detection_rate:
    raise NoFaceError(path, f"no consistent face track: {int(detected.sum())} of {len(candidates)} detection frames "
                            f"({need})")
  # Interpolate, smooth and (for shots without any face) fill each shot on its own.
  values = np.concatenate([boxes, landmarks.reshape(n, 10)], axis=1)
  track = interpolate_track(values, detected)  # the fill for shots without a face: nearest detections anywhere
  for a, b in zip(bounds[:-1], bounds[1:]):
    if detected[a:b].any():
      track[a:b] = interpolate_track(values[a:b], detected[a:b])
      track[a:b, :3] = smooth_track(track[a:b, :3], config.smooth_window)
  side = track[:, 2] * (1.0 + config.margin)
  crop = np.stack([track[:, 0], track[:, 1] + config.crop_shift * track[:, 2], side], axis=1)
  return FaceTrack(boxes=crop, detected=detected, detection_frames=len(candidates),
                   landmarks=track[:, 3:].reshape(n, 5, 2) if with_landmarks else None, scene_cuts=tuple(cuts))


def centred_track(frames: np.ndarray, config: FaceConfig, path: str = "") -> FaceTrack:
  """The centred square crop of every frame, refused unless most checked frames show a face near the centre."""
  n, h, w = frames.shape[:3]
  side = min(h, w) * config.centred_scale
  checks = np.unique(np.linspace(0, n - 1, max(1, config.centred_checks)).round().astype(int))
  detected = np.zeros(n, bool)
  for i in checks:
    c = detect_faces(frames[i], dataclasses.replace(config, min_face=0.0)).centres
    near = np.hypot(c[:, 0] - w / 2, c[:, 1] - h / 2) <= 0.25 * side
    detected[i] = bool(near.any())
  if 2 * detected.sum() <= len(checks):
    raise NoFaceError(path, f"centred mode: a face near the frame centre in {int(detected.sum())} of {len(checks)} "
                            f"checked frames (need more than half); prepare this clip with face tracking instead")
  boxes = np.tile([w / 2, h / 2, side], (n, 1)).astype(np.float64)
  return FaceTrack(boxes=boxes, detected=detected, detection_frames=len(checks))


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
    cv2.resize(patch, (size, size), dst=out[i], interpolation=interp)
  return out


def face_crops(frames: np.ndarray, config: FaceConfig = FaceConfig(), path: str = "") -> tuple[np.ndarray, FaceTrack]:
  """Tracks the face and returns (crops uint8 [N, S, S, 3], track)."""
  track = track_face(frames, config, path)
  return crop_faces(frames, track.boxes, config.size), track
