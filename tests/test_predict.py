"""Predictions on videos with a fine-tuned run (avt_jax/predict.py).

A tiny model is fine-tuned for two steps on the bundled CREMA-D sample (configs/finetune_cremad.py:tiny, through
the real trainer, persistent XLA cache). The extraction of a bundled video is checked against the record that
`python -m data.prepare` stored for the same file, the probabilities against scipy's softmax of the model's
logits for that record, the windows against hand-made lists. Videos without a face / without audio / without
video / unreadable bytes give errors naming the file and the reason, and a non-zero exit status.
"""

import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
from scipy import special

from avt_jax import config_lib, input_pipeline, predict, records

REPO = config_lib.REPO
CACHE = os.path.join(os.environ.get("PYTEST_XLA_CACHE", "/tmp"), f"avt_jax_test_xla_{os.getuid()}")
VIDEO = os.path.join(REPO, "sample", "media", "crema_d", "video", "1001_DFA_ANG_XX.flv")
MP3 = os.path.join(REPO, "sample", "media", "crema_d", "audio", "1002_DFA_ANG_XX.mp3")
CLIP_ID = "1001_DFA_ANG_XX"


def _write_video(path, seconds=2.0, fps=25, size=128, sample_rate=16000, audio=True):
  """A flat grey video (no face) with a 440 Hz tone, written with PyAV."""
  c = av.open(path, "w")
  v = c.add_stream("mpeg4", rate=fps)
  v.width = v.height = size
  v.pix_fmt = "yuv420p"
  a = None
  if audio:
    a = c.add_stream("aac", rate=sample_rate)
    a.layout = "mono"
  for i in range(int(seconds * fps)):
    frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 90 + i % 10, np.uint8), format="rgb24")
    for p in v.encode(frame):
      c.mux(p)
  if a is not None:
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * sample_rate)) / sample_rate)).astype(np.float32)
    for k in range(0, len(x), 1024):
      f = av.AudioFrame.from_ndarray(x[None, k:k + 1024], format="flt", layout="mono")
      f.sample_rate, f.pts = sample_rate, k
      for p in a.encode(f):
        c.mux(p)
    for p in a.encode():
      c.mux(p)
  for p in v.encode():
    c.mux(p)
  c.close()
  return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("finetuned"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "-m", "avt_jax.main", f"--config={REPO}/configs/finetune_cremad.py:tiny",
         f"--config.compilation_cache_dir={CACHE}", f"--workdir={wd}", "--config.total_steps=2",
         "--config.eval_every_steps=0", "--config.checkpoint_every_steps=0", "--config.data.test="]
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert os.path.isdir(os.path.join(wd, "best"))
  return wd


@pytest.fixture(scope="module")
def predictor(run_dir):
  return predict.Predictor(run_dir)


def _stored_record(clip_id):
  info = records.load_dataset_info(config_lib.SAMPLE)
  for shard in records.shard_paths(config_lib.SAMPLE, info):
    for rec in records.read_shard(shard):
      if rec["clip_id"] == clip_id:
        return rec
  raise KeyError(clip_id)


@pytest.mark.parametrize("n,window,hop,expected", [
    (11, 8, 8, [(0, 8), (3, 8)]),
    (16, 8, 8, [(0, 8), (8, 8)]),
    (5, 8, 8, [(0, 5)]),
    (8, 8, 3, [(0, 8)]),
    (20, 8, 4, [(0, 8), (4, 8), (8, 8), (12, 8)]),
    (21, 8, 4, [(0, 8), (4, 8), (8, 8), (12, 8), (13, 8)]),
    (0, 8, 8, []),
])
def test_windows(n, window, hop, expected):
  assert predict.windows(n, window, hop) == expected


def test_crema_video_probabilities(predictor):
  stored = _stored_record(CLIP_ID)
  n = int(stored["num_tokens"])
  result = predictor.predict(VIDEO)
  assert result["num_tokens"] == n == 11
  assert predictor.names == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
  assert [(w["start_s"], w["end_s"]) for w in result["windows"]] == [(0.0, 1.6), (0.6, 2.2)]  # 8 tokens at 5/s
  probs = np.array([[w["probabilities"][c] for c in predictor.names] for w in result["windows"]])
  assert probs.shape == (2, 6) and np.all(probs > 0)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
  clip = np.array([result["clip"]["probabilities"][c] for c in predictor.names])
  np.testing.assert_allclose(clip, probs.mean(axis=0), atol=1e-12)
  assert result["clip"]["predicted"] == predictor.names[int(np.argmax(clip))]

  # The extraction reproduces what data.prepare stored for this file (same parameters, from dataset_info.json).
  from data import extract  # pylint: disable=g-import-not-at-top
  raw = extract.extract_raw(VIDEO, predictor.extract_config)
  np.testing.assert_array_equal(raw.visual, stored["visual"])
  np.testing.assert_allclose(raw.audio, stored["audio"], atol=1e-5)
  # Window 0 is what evaluation sees for the stored record (crop from token 0): same logits, and the
  # probabilities are scipy's softmax of them.
  transform = input_pipeline.ClipTransform(predictor.info, predictor.window, train=False)
  logits = predictor._run_model([transform(stored)])[0]
  np.testing.assert_allclose(probs[0], special.softmax(logits), rtol=1e-5)


def test_hop_gives_overlapping_windows(run_dir):
  p = predict.Predictor(run_dir, window_tokens=4, hop_tokens=2, batch_size=3)
  result = p.predict(VIDEO)
  assert [(w["start_s"], w["tokens"]) for w in result["windows"]] == [
      (0.0, 4), (0.4, 4), (0.8, 4), (1.2, 4), (1.4, 4)]
  for w in result["windows"]:
    assert abs(sum(w["probabilities"].values()) - 1.0) < 1e-9


def test_unusable_videos_name_the_file_and_reason(predictor, tmp_path):
  no_face = _write_video(str(tmp_path / "grey wall.mp4"))
  with pytest.raises(predict.PredictError, match=r"grey wall\.mp4: no face"):
    predictor.predict(no_face)
  with pytest.raises(predict.PredictError, match=r"1002_DFA_ANG_XX\.mp3: no video stream"):
    predictor.predict(MP3)
  silent = _write_video(str(tmp_path / "silent.mp4"), audio=False)
  with pytest.raises(predict.PredictError, match=r"silent\.mp4: no audio stream"):
    predictor.predict(silent)
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(predict.PredictError, match=r"garbage\.mp4: unreadable"):
    predictor.predict(str(garbage))


def test_cli_folder_output_timeline_and_exit_status(run_dir, tmp_path, capsys):
  folder = tmp_path / "videos"
  folder.mkdir()
  shutil.copy(VIDEO, folder / "a.flv")
  shutil.copy(MP3, folder / "b.mp3")
  _write_video(str(folder / "c.mp4"))
  out, timeline = tmp_path / "out" / "pred.json", tmp_path / "plots"
  rc = predict.main([f"--workdir={run_dir}", f"--video={folder}", f"--output={out}", f"--timeline={timeline}"])
  captured = capsys.readouterr()
  assert rc == 1
  assert f"{folder / 'b.mp3'}: no video stream" in captured.err and f"{folder / 'c.mp4'}: no face" in captured.err
  doc = json.loads(out.read_text())
  assert doc == json.loads(captured.out)
  assert doc["task"] == "classification" and doc["window_tokens"] == 8 and doc["class_names"][0] == "ANG"
  a, b, c = doc["videos"]
  assert a["video"].endswith("a.flv") and len(a["windows"]) == 2 and "error" not in a
  assert "no video stream" in b["error"] and "no face" in c["error"]
  png = timeline / "a.png"
  assert a["timeline"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(timeline)) == ["a.png"]

  assert predict.main([f"--workdir={run_dir}", f"--video={tmp_path / 'missing.mp4'}"]) == 1
  assert "missing.mp4: no such file" in capsys.readouterr().err


def test_run_and_info_checks(tmp_path):
  with pytest.raises(predict.PredictError, match="config.json: not found"):
    predict.load_run_config(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"mode": "pretrain", "task": "classification"}))
  with pytest.raises(predict.PredictError, match="fine-tuned run"):
    predict.load_run_config(str(tmp_path))
  with pytest.raises(predict.PredictError, match="precomputed features"):
    predict.extract_config_from_info({"kind": "features", "audio": {}, "visual": {}})
  info = records.load_dataset_info(config_lib.SAMPLE)
  c = predict.extract_config_from_info(info)
  assert (c.token_rate, c.fps, c.face.size, c.logmel.n_mels, c.video_frames_per_token, c.audio_frames_per_token) == (
      5.0, 25.0, 64, 80, 5, 20)


def test_names_from_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict({"model": {"num_classes": 4, "num_targets": 2}, "data": {},
                                 "loss": {"target_names": ("arousal", "valence")}})
  assert predict.class_names(c, {"datasets": {"msp_improv": 10}}) == ["A", "H", "S", "N"]
  assert predict.class_names(c, {}) == ["class_0", "class_1", "class_2", "class_3"]
  c.class_names = ("w", "x", "y", "z")
  assert predict.class_names(c, {}) == ["w", "x", "y", "z"]
  assert predict.target_names(c) == ["arousal", "valence"]
  c.model.num_targets = 3
  assert predict.target_names(c) == ["target_0", "target_1", "target_2"]
