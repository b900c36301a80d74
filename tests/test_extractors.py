"""Media decoding, log-mel, face tracking, token grid and feature import, checked on the bundled real clips."""

import csv
import math
import os

import av
import cv2
import librosa
import numpy as np
import pytest

from avt_jax import targets
from data import datasets
from data import extract
from data import face
from data import features
from data import logmel
from data import media

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIA = os.path.join(ROOT, "sample", "media")
CREMA = os.path.join(MEDIA, "crema_d/video/1001_DFA_HAP_XX.flv")
GRID = os.path.join(MEDIA, "grid/video/bbaf2n.mpg")


def _manifest():
  with open(os.path.join(MEDIA, "MANIFEST.tsv"), newline="") as f:
    return list(csv.DictReader(f, delimiter="\t"))


MANIFEST = _manifest()


@pytest.fixture(scope="module")
def decoded():
  return {p: media.decode_media(p) for p in (CREMA, GRID)}


def _pyav_audio(path):
  """Independent decode: PyAV frames -> float64 [channels, samples] at the source rate."""
  with av.open(path) as c:
    stream = c.streams.audio[0]
    chunks = []
    for fr in c.decode(stream):
      x = fr.to_ndarray().astype(np.float64)
      if fr.format.name.startswith("s16"):
        x /= 32768.0
      chunks.append(x)
    return np.concatenate(chunks, axis=1), stream.codec_context.sample_rate


# --- decoding ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", MANIFEST, ids=[r["file"] for r in MANIFEST])
def test_decoded_counts_match_manifest(row):
  path = os.path.join(MEDIA, row["file"])
  if row["n_video_frames"]:
    m = media.decode_media(path)
    assert m.num_frames == int(row["n_video_frames"])
    w, h = map(int, row["resolution"].split("x"))
    assert m.frames.shape == (m.num_frames, h, w, 3) and m.frames.dtype == np.uint8
    assert m.info.video_codec == row["vcodec"]
  else:
    with pytest.raises(media.NoVideoStreamError, match=r"1002_DFA_.*no video stream \(audio-only file\)"):
      media.decode_media(path)
    m = media.decode_media(path, need_video=False)
  assert m.source_num_samples == int(row["n_audio_samples"])
  assert m.source_sample_rate == int(row["sample_rate"])
  assert m.source_channels == int(row["channels"])
  assert m.audio.dtype == np.float32 and np.abs(m.audio).max() <= 1.0
  # 16 kHz output length: ceil(n * 16000 / 44100) (polyphase resampling keeps the duration).
  assert m.audio.size == math.ceil(int(row["n_audio_samples"]) * 16000 / int(row["sample_rate"]))


def test_crema_d_flv_traps(decoded):
  m = decoded[CREMA]
  with av.open(CREMA) as c:
    kinds = [s.type for s in c.streams]
    v = c.streams.video[0]
    assert "data" in kinds  # the extra FLV data stream is present and ignored
    assert v.average_rate.numerator == 989 and v.average_rate.denominator == 33
  # Frame period from timestamps follows average_rate (989/33), not guessed_rate (30000/1001).
  assert m.frame_period == pytest.approx(33 / 989, rel=1e-3)
  # The audio stream is ~37 ms longer than the video (part of it before the first frame, at 27 ms).
  assert 0.03 < m.audio_duration - m.video_duration < 0.045
  assert m.audio_end > m.video_end
  assert m.video_start == pytest.approx(0.027) and m.audio_start == 0.0


def test_grid_stereo_downmix_and_resample_against_librosa(decoded):
  m = decoded[GRID]
  stereo, rate = _pyav_audio(GRID)
  assert stereo.shape[0] == 2 and rate == 44100
  ref = np.clip(librosa.resample(stereo.mean(0), orig_sr=44100, target_sr=16000, res_type="soxr_hq"), -1, 1)
  n = min(ref.size, m.audio.size)
  assert abs(ref.size - m.audio.size) <= 1
  assert np.abs(m.audio.max()) <= 1.0
  np.testing.assert_allclose(m.audio[:n], ref[:n], atol=0.02)
  assert np.corrcoef(m.audio[:n], ref[:n])[0, 1] > 0.9999


def test_corrupt_truncated_and_streamless_files(tmp_path):
  junk = tmp_path / "junk.mp4"
  junk.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
  with pytest.raises(media.CorruptMediaError, match="junk.mp4: unreadable"):
    media.decode_media(str(junk))
  for src in (GRID, CREMA):
    data = open(src, "rb").read()
    cut = tmp_path / ("cut_" + os.path.basename(src))
    cut.write_bytes(data[:int(len(data) * 0.3)])
    with pytest.raises(media.CorruptMediaError, match=f"cut_{os.path.basename(src)}: .*(truncated|damaged)"):
      media.decode_media(str(cut))
  video_only = tmp_path / "video_only.mp4"
  _write_video(str(video_only), audio=False)
  with pytest.raises(media.NoAudioStreamError, match="video_only.mp4: no audio stream"):
    media.decode_media(str(video_only))
  with pytest.raises(FileNotFoundError, match="missing.mp4"):
    media.decode_media(str(tmp_path / "missing.mp4"))


def test_max_short_side_scales_frames_down(decoded):
  small = media.decode_media(CREMA, max_short_side=180)
  full = decoded[CREMA]
  assert small.frames.shape == (full.num_frames, 180, 240, 3)
  np.testing.assert_array_equal(small.frame_times, full.frame_times)
  ref = cv2.resize(full.frames[10], (240, 180), interpolation=cv2.INTER_AREA).astype(np.float64)
  assert np.abs(small.frames[10].astype(np.float64) - ref).mean() < 4.0  # same picture, different scaler
  assert media.decode_media(GRID, max_short_side=480).frames.shape[1:] == (288, 360, 3)  # never upscaled


def test_nearest_frame_indices_against_brute_force(decoded):
  times = decoded[CREMA].frame_times
  targets = times[0] + np.arange(45) / 25.0
  brute = np.array([int(np.argmin(np.abs(times - t))) for t in targets])
  np.testing.assert_array_equal(media.nearest_frame_indices(times, targets), brute)
  # 25 fps -> 25 fps is the identity.
  g = decoded[GRID].frame_times
  np.testing.assert_array_equal(media.nearest_frame_indices(g, g[0] + np.arange(70) / 25.0), np.arange(70))


# --- log-mel ----------------------------------------------------------------------------------------------------

def _librosa_logmel(y):
  mel = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=400, hop_length=160, win_length=400, window="hann",
                                       center=True, pad_mode="constant", power=2.0, n_mels=80, fmin=0.0,
                                       fmax=8000.0, htk=False, norm="slaney")
  return np.log(mel + 1e-6).T


@pytest.mark.parametrize("path", [CREMA, GRID], ids=["crema_d", "grid"])
def test_logmel_matches_librosa(decoded, path):
  y = decoded[path].audio
  ours = logmel.log_mel(y)
  ref = _librosa_logmel(y)
  assert ours.shape == ref.shape == (1 + y.size // 160, 80)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_mel_filterbank_matches_librosa():
  ref = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80, fmin=0.0, fmax=8000.0, htk=False, norm="slaney")
  np.testing.assert_allclose(logmel.mel_filterbank(16000, 400, 80, 0.0, 8000.0), ref, rtol=1e-5, atol=1e-9)


# --- face -------------------------------------------------------------------------------------------------------

def _write_video(path, seconds=1.2, audio=True):
  """A talking-face-free clip (colour gradients) written with PyAV."""
  with av.open(path, "w") as c:
    v = c.add_stream("mpeg4", rate=25)
    v.width, v.height, v.pix_fmt = 160, 120, "yuv420p"
    a = c.add_stream("aac", rate=16000) if audio else None
    if a is not None:
      a.layout = "mono"
    for i in range(int(seconds * 25)):
      img = np.zeros((120, 160, 3), np.uint8)
      img[..., 0] = np.linspace(0, 255, 160, dtype=np.uint8)[None]
      img[..., 1] = (i * 8) % 256
      for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in v.encode():
      c.mux(p)
    if a is not None:
      x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * 16000)) / 16000)).astype(np.float32)[None]
      for s in range(0, x.shape[1], 1024):
        fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, s:s + 1024]), format="fltp", layout="mono")
        fr.sample_rate = 16000
        for p in a.encode(fr):
          c.mux(p)
      for p in a.encode():
        c.mux(p)


def test_no_face_error_names_file(tmp_path):
  path = tmp_path / "gradient.mp4"
  _write_video(str(path))
  with pytest.raises(face.NoFaceError, match="gradient.mp4: no face found"):
    extract.extract_raw(str(path))


# --- token grid -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extracted():
  return {p: extract.extract_raw(p) for p in (CREMA, GRID)}


@pytest.mark.parametrize("path", [CREMA, GRID], ids=["crema_d", "grid"])
def test_token_grid_is_exact(extracted, path):
  row = next(r for r in MANIFEST if r["file"] == os.path.relpath(path, MEDIA))
  video_s = int(row["n_video_frames"]) / float(row["fps"])
  audio_s = int(row["n_audio_samples"]) / int(row["sample_rate"])
  expected = math.floor(min(video_s, audio_s) * 5)
  clip = extracted[path]
  assert clip.num_tokens == expected
  assert clip.audio.shape == (expected * 20, 80) and clip.audio.dtype == np.float32
  assert clip.visual.shape == (expected * 5, 64, 64, 3) and clip.visual.dtype == np.uint8


def test_extraction_is_deterministic(extracted):
  again = extract.extract_raw(GRID)
  np.testing.assert_array_equal(again.audio, extracted[GRID].audio)
  np.testing.assert_array_equal(again.visual, extracted[GRID].visual)


def test_grid_audio_frames_are_logmel_of_the_clip(extracted, decoded):
  # GRID streams both start at 0, so the record's frames are the first T*20 librosa frames of the 16 kHz audio.
  ref = _librosa_logmel(decoded[GRID].audio)
  n = extracted[GRID].audio.shape[0]
  np.testing.assert_allclose(extracted[GRID].audio, ref[:n], atol=1e-4)


def test_visual_targets_by_hand():
  rng = np.random.default_rng(0)
  v = rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
  got = targets.face_target(v.reshape(2, 5, 64, 64, 3), 8)
  gray = (0.299 * v[..., 0] + 0.587 * v[..., 1] + 0.114 * v[..., 2]) / 255.0
  ref = np.array([[gray[5 * t:5 * t + 5, 8 * i:8 * i + 8, 8 * j:8 * j + 8].mean() for i in range(8) for j in range(8)]
                  for t in range(2)])
  np.testing.assert_allclose(got, ref, atol=1e-5)


# --- precomputed features ---------------------------------------------------------------------------------------

def _write_openface(path, timestamps, aus, success):
  names = features.OPENFACE_AUS
  header = ["frame", " face_id", " timestamp", " confidence", " success"] + [f" {a}_r" for a in names] + \
           [f" {a}_c" for a in names]
  with open(path, "w") as f:
    f.write(",".join(header) + "\n")
    for i, (t, row, ok) in enumerate(zip(timestamps, aus, success)):
      f.write(", ".join([str(i + 1), "0", f"{t:.3f}", "0.98", str(int(ok))] + [f"{x:.2f}" for x in row] +
                        ["1"] * 17) + "\n")


def test_openface_csv_and_npy(tmp_path):
  rng = np.random.default_rng(1)
  ts = np.arange(70) / 30.0  # 30 fps, 2.333 s -> 11 tokens at 5 per second
  aus = rng.uniform(0, 5, (70, 17)).round(2)
  ok = np.ones(70, bool)
  ok[[18, 21]] = False  # failed tracking rows are never picked (row 21 is nearest token 3's centre, 0.7 s)
  _write_openface(tmp_path / "c.csv", ts, aus, ok)
  table = features.read_openface_csv(str(tmp_path / "c.csv"))
  np.testing.assert_allclose(table.aus, aus, atol=1e-6)
  tokens = features.openface_tokens(table, 5.0)
  assert tokens.shape == (11, 17)
  good = np.flatnonzero(ok)
  ts_csv = np.round(ts, 3)  # as written to the CSV
  for t in range(11):
    centre = (t + 0.5) / 5.0
    row = good[np.argmin(np.abs(ts_csv[good] - centre))]
    assert row not in (18, 21)
    np.testing.assert_allclose(tokens[t], aus[row], atol=1e-6)
  np.save(tmp_path / "c.npy", rng.normal(size=(9, 512)).astype(np.float32))
  clip = features.extract_features(str(tmp_path / "c.npy"), str(tmp_path / "c.csv"))
  assert clip.num_tokens == 9 and clip.audio.shape == (9, 512) and clip.visual.shape == (9, 17)
  np.testing.assert_array_equal(clip.audio, np.load(tmp_path / "c.npy"))


def test_feature_file_errors_name_the_file(tmp_path):
  (tmp_path / "bad.csv").write_text("frame, timestamp, success\n1, 0.0, 1\n")
  with pytest.raises(features.FeatureFileError, match=r"bad.csv: OpenFace CSV lacks columns \['confidence'"):
    features.read_openface_csv(str(tmp_path / "bad.csv"))
  np.save(tmp_path / "flat.npy", np.zeros(7, np.float32))
  with pytest.raises(features.FeatureFileError, match=r"flat.npy: expected a \[frames, dim\] array"):
    features.load_npy_features(str(tmp_path / "flat.npy"))


# --- dataset naming ---------------------------------------------------------------------------------------------

def test_dataset_conventions(tmp_path):
  r = datasets.Resolver("auto")
  m = r("crema_d/video/1001_DFA_SAD_XX.flv")
  assert (m.dataset, m.clip_id, m.speaker, m.label) == ("crema_d", "1001_DFA_SAD_XX", "crema_1001", 5)
  m = r("s7/bbaf2n.mpg")
  assert (m.dataset, m.speaker, m.label) == ("grid", "grid_s7", -1)
  assert r("grid/video/id2_vcd_swwp2s.mpg").speaker == ""
  m = r("dev/mp4/id00012/21Uxsk56VDQ/00001.mp4")
  assert (m.dataset, m.clip_id, m.speaker) == ("voxceleb2", "id00012/21Uxsk56VDQ/00001", "id00012")
  assert r("misc/talk.mp4").dataset == "generic"
  with pytest.raises(datasets.LabelError, match="ActorID_Sentence_Emotion_Level"):
    datasets.Resolver("crema_d")("clips/hello.flv")
  (tmp_path / "Evaluation.txt").write_text(
      "UTD-IMPROV-S01A-F01-P-FM01.avi; A; A:3.600000; V:2.000000; D:3.400000 ; N:2.800000;\n"
      "Mturk1; Angry; Angry; A:4.000000; V:2.000000; D:4.000000; N:3.000000;\n"
      "UTD-IMPROV-S02H-M03-R-MM03.avi; X; A:2.500000; V:3.500000; D:3.000000 ; N:3.000000;\n")
  labels = datasets.read_msp_improv_labels(str(tmp_path / "Evaluation.txt"))
  msp = datasets.Resolver("msp_improv", labels)
  m = msp("session1/S01A/P/MSP-IMPROV-S01A-F01-P-FM01.avi")
  assert (m.speaker, m.session, m.label) == ("msp_F01", "session1", 0)
  np.testing.assert_allclose(m.targets, (3.6, 2.0, 3.4))
  assert msp("session3/S02H/R/MSP-IMPROV-S02H-M03-R-MM03.avi").label == -1
