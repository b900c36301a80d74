"""Face detection and tracking (data.face) on the bundled real clips and on synthetic paths with known truth."""

import concurrent.futures
import dataclasses
import os

import cv2
import numpy as np
import pytest
import threadpoolctl
import yuface

from data import face
from data import media

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIA = os.path.join(ROOT, "sample", "media")
CREMA = os.path.join(MEDIA, "crema_d/video/1001_DFA_HAP_XX.flv")
GRID = os.path.join(MEDIA, "grid/video/bbaf2n.mpg")


@pytest.fixture(scope="module")
def frames():
  return {p: media.decode_media(p).frames for p in (CREMA, GRID)}


def _yunet_full(frame):
  """Independent reference: YuNet called directly at full resolution; largest face as (cx, cy, w, h)."""
  _, boxes, _ = yuface.detect(np.ascontiguousarray(frame[..., ::-1]), conf=0.6)
  x, y, w, h = max(np.asarray(boxes, np.float64), key=lambda b: b[2] * b[3])
  return np.array([x + w / 2, y + h / 2, w, h])


def _cascade_full(frame):
  cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, face.CASCADE_NAME))
  boxes = cascade.detectMultiScale(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), 1.1, 5, minSize=(60, 60))
  x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
  return np.array([x + w / 2, y + h / 2, w, h], np.float64)


@pytest.mark.parametrize("detector", ["yunet", "haar"])
@pytest.mark.parametrize("path", [CREMA, GRID], ids=["crema_d", "grid"])
def test_track_matches_full_resolution_detector(frames, path, detector):
  clip = frames[path]
  config = face.FaceConfig(detector=detector)
  track = face.track_face(clip, config)
  assert track.detection_rate > 0.9
  assert track.detection_frames < len(clip) / 2  # every 5th frame (and the last), no re-detection needed
  reference = _yunet_full if detector == "yunet" else _cascade_full
  for i in range(0, len(clip), 7):  # frames between detections included
    cx, cy, w, h = reference(clip[i])
    tx, ty, side = track.boxes[i]
    assert abs(tx - cx) < 0.1 * w and abs(ty - (cy + config.crop_shift * (w + h) / 2)) < 0.1 * h
    assert side == pytest.approx(1.3 * (w + h) / 2, rel=0.15)  # margin 0.3 around the detected face
  if detector == "yunet":  # landmarks in crop coordinates: eyes above the nose above the mouth, left-right order
    lm = np.asarray(track.summary()["face_landmarks"]).reshape(5, 2)
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
    assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])
    assert np.all((lm > 0.1) & (lm < 0.9))
  else:
    assert "face_landmarks" not in track.summary()


def _face_patch(frame):
  """A square patch centred on the face (side 1.8 x the face's (w + h) / 2) and that face side."""
  cx, cy, w, h = _yunet_full(frame)
  side = (w + h) / 2
  half = int(0.9 * side)
  return frame[int(cy) - half:int(cy) + half, int(cx) - half:int(cx) + half], side / (2 * half)


def _moving_face_clip(patch, n=60, size=(240, 320), seed=0):
  """Noise frames with the patch pasted along a known path (growing by 30%); truth as (cx, cy, face side)."""
  rng = np.random.default_rng(seed)
  patch_img, face_frac = patch
  h, w = size
  frames = np.clip(rng.normal(110, 30, (n, h, w, 3)), 0, 255).astype(np.uint8)
  truth = np.zeros((n, 3))
  for t in range(n):
    p = int(round(0.45 * h * (1 + 0.3 * t / (n - 1))))
    cx, cy = w / 2 + 70 * np.sin(2 * np.pi * t / n), h / 2 - 15 + 30 * t / (n - 1)
    x0, y0 = int(round(cx - p / 2)), int(round(cy - p / 2))
    frames[t, y0:y0 + p, x0:x0 + p] = cv2.resize(patch_img, (p, p), interpolation=cv2.INTER_AREA)
    truth[t] = (x0 + p / 2, y0 + p / 2, face_frac * p)
  return frames, truth


def test_tracker_recovers_a_synthetic_moving_face(frames):
  clip, truth = _moving_face_clip(_face_patch(frames[GRID][0]))
  for every, refine, most in ((5, 0.0, 60 // 5 + 1), (10, face.FaceConfig.refine_motion, 36)):
    config = face.FaceConfig(detect_every=every, refine_motion=refine)
    track = face.track_face(clip, config)
    assert track.scene_cuts == ()
    # Fixed schedule: every k-th frame and the last; refined: more where the path bends, far from every frame.
    assert track.detection_frames == most if not refine else 60 // 10 + 1 < track.detection_frames <= most
    side = track.boxes[:, 2] / (1 + config.margin)
    err = np.hypot(track.boxes[:, 0] - truth[:, 0], track.boxes[:, 1] - truth[:, 1]) / truth[:, 2]
    assert err.max() < 0.1, (every, err.max())
    np.testing.assert_allclose(side, truth[:, 2], rtol=0.1)


def test_a_second_smaller_face_does_not_take_the_track(frames):
  clip, truth = _moving_face_clip(_face_patch(frames[GRID][0]))
  other, _ = _face_patch(frames[CREMA][0])
  small = cv2.resize(other, (60, 60), interpolation=cv2.INTER_AREA)
  clip[::2, 5:65, 5:65] = small  # a second person in the corner, on every other frame
  track = face.track_face(clip, face.FaceConfig(detect_every=1))
  err = np.hypot(track.boxes[:, 0] - truth[:, 0], track.boxes[:, 1] - truth[:, 1]) / truth[:, 2]
  assert err.max() < 0.1


def test_lost_track_is_detected_again_between_scheduled_frames(frames):
  clip, truth = _moving_face_clip(_face_patch(frames[GRID][0]))
  rng = np.random.default_rng(1)
  for t in (10, 11, 12, 13, 20):  # the face is gone on two scheduled detection frames (10, 20) and next to one
    clip[t] = np.clip(rng.normal(110, 30, clip[t].shape), 0, 255).astype(np.uint8)
  track = face.track_face(clip, face.FaceConfig(detect_every=5))
  assert not track.detected[[10, 20]].any()
  assert track.detected[14] and track.detected[16]  # found again by the re-detection next to the lost frames
  err = np.hypot(track.boxes[:, 0] - truth[:, 0], track.boxes[:, 1] - truth[:, 1]) / truth[:, 2]
  assert err.max() < 0.1


def test_scene_cut_splits_the_track(frames):
  a = frames[CREMA][:40]
  b = np.stack([cv2.resize(f, (a.shape[2], a.shape[1])) for f in frames[GRID][:40]])
  clip = np.concatenate([a, b])
  assert face.scene_cuts(clip, face.FaceConfig().cut_threshold) == [40]
  assert face.scene_cuts(a, face.FaceConfig().cut_threshold) == []
  track = face.track_face(clip)
  assert track.scene_cuts == (40,)
  for i in (38, 39, 40, 41):  # no interpolation or smoothing across the cut
    cx, cy, w, h = _yunet_full(clip[i])
    assert abs(track.boxes[i, 0] - cx) < 0.1 * w and abs(track.boxes[i, 1] - cy) < 0.1 * h


def test_centred_mode_accepts_face_crops_and_refuses_others(frames):
  clip = frames[GRID]
  cx, cy, w, h = _yunet_full(clip[0])
  half = int(min(0.8 * max(w, h), cx, cy, clip.shape[2] - cx, clip.shape[1] - cy))
  crops = np.ascontiguousarray(clip[:, int(cy) - half:int(cy) + half, int(cx) - half:int(cx) + half])
  config = face.FaceConfig(mode="centred", size=32)
  out, track = face.face_crops(crops, config)
  assert track.detection_frames == 3 and track.detected.sum() == 3
  np.testing.assert_array_equal(track.boxes[0], [half, half, 2 * half])
  np.testing.assert_array_equal(out[5], cv2.resize(crops[5], (32, 32), interpolation=cv2.INTER_AREA))
  shifted = np.roll(crops, half, axis=2)  # the face moved to the frame's edge
  with pytest.raises(face.NoFaceError, match="x.mp4: centred mode: a face near the frame centre in 0 of 3"):
    face.track_face(shifted, config, "x.mp4")


def test_legacy_face_config_reads_as_the_cascade():
  old = dict(size=64, detect_every=1, detect_size=160, min_face=0.2, scale_factor=1.1, min_neighbors=5,
             min_detection_rate=0.25, gate=0.5, smooth_window=5, margin=0.3, shift=0.05, type="face",
             detector="opencv 4.11.0 haarcascade_frontalface_default.xml")
  c = face.FaceConfig.from_dict(old)
  assert (c.detector, c.detect_every, c.min_face, c.retry_size, c.cut_threshold, c.crop_shift) == (
      "haar", 1, 0.2, 0, 0.0, 0.05)
  assert c.refine_motion == 0.0
  new = face.FaceConfig(detect_every=3)
  assert face.FaceConfig.from_dict(new.to_dict()) == dataclasses.replace(new, shift=new.crop_shift)
  with pytest.raises(ValueError, match="face detector must be one of"):
    face.FaceConfig(detector="mtcnn")


def test_interpolate_and_smooth_by_hand():
  boxes = np.array([[10, 0, 4], [0, 0, 0], [0, 0, 0], [40, 30, 10], [0, 0, 0]], np.float64)
  detected = np.array([True, False, False, True, False])
  filled = face.interpolate_track(boxes, detected)
  np.testing.assert_allclose(filled[:, 0], [10, 20, 30, 40, 40])
  np.testing.assert_allclose(filled[:, 2], [4, 6, 8, 10, 10])
  x = np.array([[0.0], [10.0], [0.0], [0.0], [3.0]])
  # window 3: median of edge-padded neighbourhoods, then mean of those.
  med = np.array([0.0, 0.0, 0.0, 0.0, 3.0])
  mean = np.array([0.0, 0.0, 0.0, 1.0, 2.0])
  np.testing.assert_allclose(face._running(x, 3, np.median)[:, 0], med)
  np.testing.assert_allclose(face.smooth_track(x, 3)[:, 0], mean)


def test_track_jitter_by_hand():
  boxes = np.array([[10.0, 10, 20], [12, 10, 20], [12, 13, 20], [12, 13, 20]])
  track = face.FaceTrack(boxes=boxes, detected=np.ones(4, bool), detection_frames=4)
  assert track.jitter == pytest.approx(np.median([2 / 20, 3 / 20, 0.0]))


def _real_clips():
  shared = os.path.join(ROOT, "..", "shared", "realdata")
  roots = [MEDIA] + ([shared] if os.path.isdir(shared) else [])
  seen, out = set(), []
  for root in roots:
    for d, _, fs in sorted(os.walk(root)):
      for f in sorted(fs):
        if f.lower().endswith(media.VIDEO_SUFFIXES) and f not in seen:
          seen.add(f)
          out.append(os.path.join(d, f))
  return out


def test_yunet_finds_the_face_in_turned_mirrored_and_small_versions_of_real_frames():
  # What bench/bench_detectors.py measures, as a floor: on 3 frames of every real clip, the face is found at the
  # place the geometry moved it to (the reference: YuNet at full resolution on the untouched frame).
  config = face.FaceConfig()
  paths = _real_clips()
  assert len(paths) >= 12
  for path in paths:
    clip = media.decode_media(path).frames
    for frame in clip[[0, len(clip) // 2, -1]]:
      cx, cy, w, h = _yunet_full(frame)
      fh, fw = frame.shape[:2]
      variants = []
      for degrees in (30, -30):
        m = cv2.getRotationMatrix2D((fw / 2, fh / 2), degrees, 1.0)
        variants.append((cv2.warpAffine(frame, m, (fw, fh), borderMode=cv2.BORDER_REPLICATE), m))
      variants.append((np.ascontiguousarray(frame[:, ::-1]), np.array([[-1.0, 0, fw], [0, 1.0, 0]])))
      s = 40 / h  # the face 40 pixels tall, in a grey frame of the original size
      small = cv2.resize(frame, (round(fw * s), round(fh * s)), interpolation=cv2.INTER_AREA)
      canvas = np.full_like(frame, 128)
      y0, x0 = (fh - small.shape[0]) // 2, (fw - small.shape[1]) // 2
      canvas[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
      variants.append((canvas, np.array([[s, 0, x0], [0, s, y0]])))
      for image, m in variants:
        found = face.detect_faces(image, config)
        assert len(found), path
        scale = np.sqrt(abs(np.linalg.det(m[:, :2])))
        want = m @ np.array([cx, cy, 1.0])
        got = found.centres[0]
        assert np.hypot(*(got[:2] - want)) < 0.25 * scale * h, path
        assert got[2] == pytest.approx(scale * (w + h) / 2, rel=0.35), path


def _openmp_threads_after_detecting(frame) -> list[int]:
  face.detect_faces(frame)
  return [p["num_threads"] for p in threadpoolctl.threadpool_info() if "yuface" in p["filepath"]]


def test_yunet_detects_on_one_openmp_thread_in_every_calling_thread(frames):
  # The wheel's OpenMP team is as wide as the machine by default; the busy-waiting teams of several preparation
  # workers starved each other (48 clips: two workers 35 s wall, one 15 s). threadpoolctl reads the runtime itself.
  frame = frames[CREMA][0]
  assert _openmp_threads_after_detecting(frame) == [1]
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    assert pool.submit(_openmp_threads_after_detecting, frame).result() == [1]
