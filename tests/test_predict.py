"""Predictions on videos with a fine-tuned run (avt_jax/predict.py).

A tiny model is pretrained for two steps on the bundled sample (configs/pretrain.py:tiny) and fine-tuned from it
for two steps on the bundled CREMA-D clips (configs/finetune_cremad.py:tiny with init_from, the command predict
suggests for a pretraining run), both through the real trainer with a persistent XLA cache. The extraction of a
bundled video is checked against the record that `python -m data.prepare` stored for the same file, the
probabilities against scipy's softmax of the model's logits for that record, the windows against hand-made lists.
Videos without a face / without audio / without video / unreadable bytes give errors naming the file and the
reason, and a non-zero exit status. The README's command runs as a subprocess from another directory with
relative paths; the timeline PNG is checked for its number of points and for a legend outside the data area.
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


ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _train(config, wd, *overrides):
  cmd = [sys.executable, "-m", "avt_jax.main", f"--config={REPO}/{config}", f"--config.compilation_cache_dir={CACHE}",
         f"--workdir={wd}", "--config.total_steps=2", "--config.eval_every_steps=0",
         "--config.checkpoint_every_steps=0", *overrides]
  proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return wd


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory):
  return _train("configs/pretrain.py:tiny", str(tmp_path_factory.mktemp("pretrained")), "--config.data.eval=")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pretrain_dir):
  wd = _train("configs/finetune_cremad.py:tiny", str(tmp_path_factory.mktemp("finetuned")),
              f"--config.init_from={pretrain_dir}", "--config.data.test=")
  assert os.path.isdir(os.path.join(wd, "best"))
  return wd


def _predict_cli(args, cwd):
  return subprocess.run([sys.executable, "-m", "avt_jax.predict", *args], env=ENV, cwd=cwd, capture_output=True,
                        text=True, timeout=300)


def _listing(root):
  """{relative path: bytes} of every file under root (to show that nothing was changed)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      path = os.path.join(d, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


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
  result = p.predict(VIDEO, timeline=True)
  assert [(w["start_s"], w["tokens"]) for w in result["windows"]] == [
      (0.0, 4), (0.4, 4), (0.8, 4), (1.2, 4), (1.4, 4)]
  for w in result["windows"]:
    assert abs(sum(w["probabilities"].values()) - 1.0) < 1e-9
  # Explicit --window_tokens / --hop_tokens are the timeline's windows too.
  assert (result["timeline"]["window_tokens"], result["timeline"]["hop_tokens"]) == (4, 2)
  assert result["timeline"]["windows"] == result["windows"]


@pytest.mark.parametrize("n,max_tokens,window,hop,expected", [
    (11, 16, 0, 0, (4, 1)),      # the README's clip with configs/finetune_cremad.py: 8 windows of 0.8 s
    (11, 8, 0, 0, (4, 1)),
    (30, 16, 0, 0, (16, 1)),     # long enough for full windows
    (20, 16, 0, 0, (13, 1)),
    (5, 16, 0, 0, (2, 1)),       # never below 2 tokens
    (1000, 16, 0, 0, (16, 5)),   # hop grows: at most 200 points
    (11, 16, 6, 0, (6, 1)),      # explicit values are kept
    (11, 16, 0, 3, (4, 3)),
    (11, 16, 16, 16, (16, 16)),
])
def test_timeline_windows(n, max_tokens, window, hop, expected):
  assert predict.timeline_windows(n, max_tokens, window, hop) == expected
  w, h = expected
  if not window and not hop:
    assert len(predict.windows(n, w, h)) >= min(predict.TIMELINE_MIN_POINTS, n - 1)
  assert len(predict.windows(n, w, h)) <= predict.TIMELINE_MAX_POINTS


def test_timeline_curve_and_legend_outside_the_axes(predictor, tmp_path):
  result = predictor.predict(VIDEO, timeline=True)
  curve = result["timeline"]
  # 11 tokens: 4-token windows one token apart, while the clip-level result keeps the run's 8-token windows.
  assert [(w["start_s"], w["tokens"]) for w in curve["windows"]] == [(k / 5, 4) for k in range(8)]
  assert len(result["windows"]) == 2 and result["clip"]["predicted"] in predictor.names
  for w in curve["windows"]:
    assert abs(sum(w["probabilities"].values()) - 1.0) < 1e-9

  fig = predict.timeline_figure(result)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  ax = fig.axes[0]
  legend = ax.get_legend()
  box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
  assert not box.overlaps(area), (box, area)
  assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
  assert [t.get_text() for t in legend.get_texts()] == predictor.names
  assert ax.get_xlabel().startswith("time") and "(s" in ax.get_xlabel() and ax.get_ylabel() == "probability"
  assert [len(line.get_xdata()) for line in ax.get_lines()] == [8] * 6
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)

  # The PNG replaces an older one whole; a path that cannot be written is named, and the blocker is untouched.
  png = tmp_path / "angry.png"
  png.write_bytes(b"old")
  assert predict.write_timeline(result, str(png)) == str(png)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(os.listdir(tmp_path)) == ["angry.png"]
  (tmp_path / "plots").write_text("a file, not a folder")
  with pytest.raises(predict.PredictError, match=r"plots/a\.png: cannot write the timeline PNG"):
    predict.write_timeline(result, str(tmp_path / "plots" / "a.png"))
  assert (tmp_path / "plots").read_text() == "a file, not a folder"


def test_readme_command_with_relative_paths_from_another_directory(run_dir, tmp_path):
  # The README's command, run from a directory that holds the run and the media under relative names.
  os.makedirs(tmp_path / "runs")
  os.symlink(run_dir, tmp_path / "runs" / "ft_cremad")
  os.symlink(os.path.join(REPO, "sample"), tmp_path / "sample")
  (tmp_path / "notes.txt").write_text("mine")
  proc = _predict_cli(["--workdir=runs/ft_cremad", "--video=sample/media/crema_d/video/1001_DFA_ANG_XX.flv",
                       "--timeline=angry.png", "--output=out/pred.json"], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  doc = json.loads((tmp_path / "out" / "pred.json").read_text())
  assert doc == json.loads(proc.stdout)
  assert doc["workdir"] == str(tmp_path / "runs" / "ft_cremad")
  assert doc["params"] == str(tmp_path / "runs" / "ft_cremad" / "best" / "checkpoints" / "2" / "state")
  (video,) = doc["videos"]
  assert video["video"] == str(tmp_path / "sample" / "media" / "crema_d" / "video" / "1001_DFA_ANG_XX.flv")
  assert len(video["timeline"]["windows"]) >= 8
  png = tmp_path / "angry.png"
  assert video["timeline"]["png"] == str(png)
  data = png.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
  assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (900, 380)  # IHDR size
  assert sorted(os.listdir(tmp_path)) == ["angry.png", "notes.txt", "out", "runs", "sample"]
  assert os.listdir(tmp_path / "out") == ["pred.json"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_pretraining_run_is_refused_with_the_way_out(pretrain_dir, run_dir, tmp_path, capsys):
  before = _listing(pretrain_dir)
  out = tmp_path / "pred.json"
  out.write_text('{"videos": ["from an earlier run"]}')
  rc = predict.main([f"--workdir={pretrain_dir}", f"--video={VIDEO}", f"--output={out}",
                     f"--timeline={tmp_path / 'angry.png'}"])
  err = capsys.readouterr().err
  assert rc == 1
  assert f"{pretrain_dir}/config.json: {pretrain_dir} is a pretraining run (mode='pretrain')" in err
  assert "no emotion head" in err and "Predictions need a fine-tuned run (task classification or regression)" in err
  assert (f"python -m avt_jax.main --config=configs/finetune_cremad.py --config.init_from={pretrain_dir} "
          f"--workdir=<new run dir>") in err
  assert "task='classification'" not in err and "no params" not in err
  # Nothing written or changed: the earlier predictions, the pretraining run, no PNG.
  assert out.read_text() == '{"videos": ["from an earlier run"]}' and sorted(os.listdir(tmp_path)) == ["pred.json"]
  assert _listing(pretrain_dir) == before
  # The suggested command is how run_dir was made, and predict accepts that run.
  config = json.loads(open(os.path.join(run_dir, "config.json")).read())
  assert (config["mode"], config["task"], config["init_from"]) == ("finetune", "classification", pretrain_dir)


@pytest.mark.parametrize("unfinished", [False, True])
def test_run_without_a_checkpoint_yet(run_dir, tmp_path, capsys, unfinished):
  wd = tmp_path / "ft_new"
  wd.mkdir()
  shutil.copy(os.path.join(run_dir, "config.json"), wd / "config.json")
  if unfinished:  # a save in progress: Orbax renames '<step>.orbax-checkpoint-tmp' to '<step>' when it is done
    shutil.copytree(os.path.join(run_dir, "checkpoints", "2"), wd / "checkpoints" / "4.orbax-checkpoint-tmp")
  before = _listing(wd)
  rc = predict.main([f"--workdir={wd}", f"--video={VIDEO}"])
  err = capsys.readouterr().err
  assert rc == 1
  assert f"{wd}: no checkpoint yet: neither {wd / 'best'} nor {wd / 'checkpoints'} holds a finished checkpoint" in err
  assert "init_from" not in err and "no params" not in err
  assert _listing(wd) == before


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
  assert a["timeline"]["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(a["timeline"]["windows"]) == 8 and "timeline" not in b
  assert sorted(os.listdir(timeline)) == ["a.png"]

  assert predict.main([f"--workdir={run_dir}", f"--video={tmp_path / 'missing.mp4'}"]) == 1
  assert "missing.mp4: no such file" in capsys.readouterr().err


def test_run_and_info_checks(tmp_path):
  with pytest.raises(predict.PredictError, match="config.json: not found"):
    predict.load_run_config(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"mode": "pretrain", "task": "classification"}))
  with pytest.raises(predict.PredictError, match="fine-tuned run"):
    predict.load_run_config(str(tmp_path))
  (tmp_path / "config.json").write_text('{\n  "mode": "finetune",\n  "task": classification\n}\n')
  with pytest.raises(predict.PredictError, match=r"config\.json:3: malformed run config"):
    predict.load_run_config(str(tmp_path))
  with pytest.raises(predict.PredictError, match=r"--workdir=.*missing: no such directory"):
    predict.load_run_config(str(tmp_path / "missing"))
  bad_info = tmp_path / "info.json"
  bad_info.write_text('{"kind": "raw",\n "token_rate": }')
  with pytest.raises(predict.PredictError, match=r"info\.json:2: malformed dataset_info\.json"):
    predict.load_training_info(None, str(bad_info))
  assert bad_info.read_text() == '{"kind": "raw",\n "token_rate": }'
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
