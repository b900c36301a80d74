"""End-to-end preparation on real clips: shards, manifest, statistics, resume, bad files, CLI, TFDS, sample."""

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from avt_jax import records
from data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIA = os.path.join(ROOT, "sample", "media")
PREPARED = os.path.join(ROOT, "sample", "prepared")
CLIPS = ("crema_d/video/1001_DFA_HAP_XX.flv", "crema_d/audio/1002_DFA_ANG_XX.mp3", "grid/video/bbaf2n.mpg",
         "grid/video/lbbc2a.mpg")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """3 real video clips, 1 audio-only file, 1 random-bytes .mp4, 1 truncated clip (first 30% of its bytes)."""
  d = tmp_path_factory.mktemp("inputs")
  for rel in CLIPS:
    os.makedirs(d / os.path.dirname(rel), exist_ok=True)
    shutil.copy(os.path.join(MEDIA, rel), d / rel)
  (d / "grid" / "video" / "corrupt.mp4").write_bytes(
      np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
  data = open(os.path.join(MEDIA, "grid/video/lwbsza.mpg"), "rb").read()
  (d / "grid" / "video" / "truncated.mpg").write_bytes(data[:int(0.3 * len(data))])
  return str(d)


def _options(inputs, out, **kw):
  kw.setdefault("shard_size", 2)
  return prepare.PrepareOptions(input=inputs, output=str(out), progress=False, **kw)


@pytest.fixture(scope="module")
def full(inputs, tmp_path_factory):
  out = tmp_path_factory.mktemp("full")
  summary = prepare.prepare(_options(inputs, out))
  return str(out), summary


def _manifest(out):
  with open(os.path.join(out, prepare.MANIFEST)) as f:
    return [json.loads(line) for line in f]


def _shard_bytes(out):
  d = os.path.join(out, prepare.SHARD_DIR)
  return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def _all_records(out):
  info = records.load_dataset_info(out)
  return [ex for p in records.shard_paths(out, info) for ex in records.read_shard(p)]


def test_manifest_reports_every_input(full):
  out, summary = full
  entries = {e["source"]: e for e in _manifest(out)}
  assert sorted(entries) == sorted(list(CLIPS) + ["grid/video/corrupt.mp4", "grid/video/truncated.mpg"])
  assert entries["crema_d/audio/1002_DFA_ANG_XX.mp3"]["reason"] == "no video stream (audio-only file)"
  assert entries["grid/video/corrupt.mp4"]["status"] == "skipped"
  assert "unreadable media file" in entries["grid/video/corrupt.mp4"]["reason"]
  assert "truncated or damaged" in entries["grid/video/truncated.mpg"]["reason"]
  ok = [e for e in entries.values() if e["status"] == "ok"]
  assert len(ok) == 3 and summary["ok"] == 3
  assert {s for s, _ in summary["skipped"]} == {"crema_d/audio/1002_DFA_ANG_XX.mp3", "grid/video/corrupt.mp4",
                                                 "grid/video/truncated.mpg"}
  text = prepare.format_summary(summary)
  assert "grid/video/truncated.mpg" in text and "no video stream (audio-only file)" in text
  hap = entries["crema_d/video/1001_DFA_HAP_XX.flv"]
  assert hap["sha256"] == "e72a1221a240f2e6c232b871734ec6ea367228f3feb076dfe448941731752b14"  # MANIFEST.tsv
  assert (hap["source_video_frames"], hap["source_audio_samples"]) == (56, 84096)
  assert hap["video_frames"] == 5 * hap["num_tokens"] and hap["audio_frames"] == 20 * hap["num_tokens"]
  assert hap["extractors"]["face"]["detector"] == "yunet" and "YuNet" in hap["extractors"]["face"]["detector_model"]
  assert hap["face_detection_rate"] > 0.9 and hap["face_jitter"] < 0.02 and len(hap["face_landmarks"]) == 10


def test_records_follow_the_format(full):
  out, _ = full
  info = records.load_dataset_info(out)
  assert info["kind"] == "raw" and info["num_clips"] == 3
  # shard_size 2 over 6 sorted inputs: [mp3, flv], [bbaf2n, corrupt], [lbbc2a, truncated]
  assert info["shards"] == [f"shards/clips-0000{i}-of-00003.array_record" for i in range(3)]
  exs = {ex["clip_id"]: ex for ex in _all_records(out)}
  assert sorted(exs) == ["1001_DFA_HAP_XX", "bbaf2n", "lbbc2a"]
  hap = exs["1001_DFA_HAP_XX"]
  assert (hap["dataset"], hap["speaker"], int(hap["label"])) == ("crema_d", "crema_1001", 3)
  assert (exs["bbaf2n"]["dataset"], exs["bbaf2n"]["speaker"], int(exs["bbaf2n"]["label"])) == ("grid", "", -1)
  for ex in exs.values():
    t = int(ex["num_tokens"])
    assert ex["audio"].shape == (20 * t, 80) and ex["audio"].dtype == np.float32
    assert ex["visual"].shape == (5 * t, 64, 64, 3) and ex["visual"].dtype == np.uint8
    assert ex["targets"].shape == (3,) and np.isnan(ex["targets"]).all()
  # floor(min(56 / 29.97, 84096 / 44100) * 5) = 9; GRID: floor(min(3.0, 2.978) * 5) = 14
  assert [int(exs[k]["num_tokens"]) for k in ("1001_DFA_HAP_XX", "bbaf2n", "lbbc2a")] == [9, 14, 14]


def test_normalisation_statistics(full):
  out, _ = full
  info = records.load_dataset_info(out)
  exs = _all_records(out)
  mel = np.concatenate([ex["audio"] for ex in exs]).astype(np.float64)
  np.testing.assert_allclose(info["audio"]["mean"], mel.mean(0), atol=2e-5)
  np.testing.assert_allclose(info["audio"]["std"], mel.std(0), atol=2e-5)
  targets = []
  for ex in exs:
    v = ex["visual"].astype(np.float64)
    gray = (v[..., 0] * 0.299 + v[..., 1] * 0.587 + v[..., 2] * 0.114) / 255.0  # [T*5, 64, 64]
    t = gray.shape[0] // 5
    targets.append(gray.reshape(t, 5, 8, 8, 8, 8).mean(axis=(1, 3, 5)).ravel())
  targets = np.concatenate(targets)
  assert info["visual"]["target_mean"] == pytest.approx(targets.mean(), abs=2e-6)
  assert info["visual"]["target_std"] == pytest.approx(targets.std(), abs=2e-6)


def test_interrupted_run_resumes_to_identical_shards(inputs, full, tmp_path):
  out_full, _ = full
  out = tmp_path / "resumed"
  first = prepare.prepare(_options(inputs, out, stop_after=3))
  assert not first["done"]
  written = {n: os.stat(os.path.join(out, "shards", n)) for n in os.listdir(out / "shards")}
  assert [n.split(".")[:2] for n in sorted(written)] == [["clips-00000-of-00003", "array_record"]] * 2
  assert sorted(written)[1].endswith(records.MEDIA_SUFFIX)  # inputs 0, 1 finished (shard + media); input 2 cached
  assert os.path.exists(out / "work" / "0000002.json") and os.path.exists(out / "work" / "0000002.rec")
  second = prepare.prepare(_options(inputs, out, stop_after=1, workers=2))
  assert not second["done"] and len(os.listdir(out / "shards")) == 4
  final = prepare.prepare(_options(inputs, out, workers=2))
  assert final["done"] and final["note"] == "processed 2 clips"
  assert _shard_bytes(str(out)) == _shard_bytes(out_full)
  for name in ("manifest.jsonl", "dataset_info.json"):
    assert open(out / name, "rb").read() == open(os.path.join(out_full, name), "rb").read()
  for n, st in written.items():  # shards written before the interruption were left alone
    now = os.stat(os.path.join(out, "shards", n))
    assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
  assert not os.path.exists(out / "work")
  again = prepare.prepare(_options(inputs, out))
  assert again["note"] == "already complete; nothing to do"
  with pytest.raises(prepare.PrepareError, match="other inputs or parameters"):
    prepare.prepare(_options(inputs, out, shard_size=3))


def test_strict_stops_on_corrupt_file(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  shutil.copy(os.path.join(MEDIA, "crema_d/audio/1002_DFA_SAD_XX.mp3"), d)
  (d / "zz_broken.mp4").write_bytes(b"\x00" * 4096)
  with pytest.raises(prepare.PrepareError, match="--strict: zz_broken.mp4: unreadable media file"):
    prepare.prepare(_options(str(d), tmp_path / "out", strict=True))


def test_cli_flags_and_summary(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  shutil.copy(os.path.join(MEDIA, "crema_d/audio/1002_DFA_SAD_XX.mp3"), d)
  (d / "broken.mp4").write_bytes(b"not a video" * 100)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "data.prepare", f"--input={d}", f"--output={out}", "--dataset=crema_d",
         "--workers=1", "--shard_size=8", "--noprogress"]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  # Nothing usable among the inputs: the summary is printed, and the exit status says the run produced nothing.
  assert res.returncode == 1, res.stderr
  assert "error: no clip could be written" in res.stderr and "all 2 inputs were skipped" in res.stderr
  assert "broken.mp4" in res.stdout and "no video stream (audio-only file)" in res.stdout
  # crema_d naming is enforced: broken.mp4 is reported for its name before it is even opened
  entries = {e["source"]: e for e in _manifest(str(out))}
  assert "ActorID_Sentence_Emotion_Level" in entries["broken.mp4"]["reason"]
  assert entries["broken.mp4"]["category"] == "error"


def _write_openface(path, n_rows, rng):
  aus = [f"AU{x:02d}" for x in (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 45)]
  values = rng.uniform(0, 5, (n_rows, 17)).round(2)
  with open(path, "w") as f:
    f.write(", ".join(["frame", "timestamp", "confidence", "success"] + [f"{a}_r" for a in aus]) + "\n")
    for i in range(n_rows):
      f.write(", ".join([str(i + 1), f"{i * 0.04:.2f}", "0.9", "1"] + [str(x) for x in values[i]]) + "\n")
  return values


def test_features_kind(tmp_path):
  rng = np.random.default_rng(3)
  (tmp_path / "audio").mkdir()
  (tmp_path / "openface").mkdir()
  expected = {}
  for stem, n_npy, n_rows in (("1001_DFA_ANG_XX", 10, 60), ("talk", 4, 25)):
    emb = rng.normal(size=(n_npy, 24)).astype(np.float32)
    np.save(tmp_path / "audio" / f"{stem}.npy", emb)
    aus = _write_openface(tmp_path / "openface" / f"{stem}.csv", n_rows, rng)
    t = min(n_npy, n_rows // 5)  # 25 fps rows: 5 rows per token
    ts = np.array([float(f"{i * 0.04:.2f}") for i in range(n_rows)])
    rows = [int(np.argmin(np.abs(ts - (k + 0.5) / 5))) for k in range(t)]  # row nearest each token centre
    expected[stem] = (emb[:t], aus[rows].astype(np.float32))
  np.save(tmp_path / "audio" / "lonely.npy", np.zeros((3, 24), np.float32))
  out = tmp_path / "out"
  summary = prepare.prepare(_options(str(tmp_path), out, kind="features"))
  assert summary["skipped"] == [(["audio/lonely.npy", ""], "no matching .csv (OpenFace) file for audio/lonely.npy")]
  info = records.load_dataset_info(str(out))
  assert info["kind"] == "features" and info["audio"]["dim"] == 24 and info["visual"]["dim"] == 17
  exs = {ex["clip_id"]: ex for ex in _all_records(str(out))}
  assert exs["1001_DFA_ANG_XX"]["label"] == 0 and exs["talk"]["dataset"] == "generic"
  for stem, (audio, visual) in expected.items():
    np.testing.assert_array_equal(exs[stem]["audio"], audio)
    np.testing.assert_allclose(exs[stem]["visual"], visual, atol=1e-6)
    assert int(exs[stem]["num_tokens"]) == len(audio)


def test_tfds_avt_sample_builds_and_reads(full, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from data import tfds_builders
  builder = tfds_builders.AvtSample(data_dir=str(tmp_path), config="tiny")
  builder.download_and_prepare(file_format="array_record")
  source = tfds.data_source("avt_sample/tiny", data_dir=str(tmp_path), download=False)["train"]
  got = {source[i]["clip_id"].decode(): source[i] for i in range(len(source))}
  assert sorted(got) == ["1001_DFA_HAP_XX", "bbaf2n", "lbbc2a"]
  # Same extraction as data.prepare: identical arrays and, for the same clips, identical statistics.
  for ex in _all_records(full[0]):
    np.testing.assert_array_equal(got[ex["clip_id"]]["visual"], ex["visual"])
    np.testing.assert_array_equal(got[ex["clip_id"]]["audio"], ex["audio"])
    assert got[ex["clip_id"]]["label"] == ex["label"]
  meta = source.dataset_info.metadata["dataset_info"]
  info = records.load_dataset_info(full[0])
  assert meta["num_clips"] == 3
  for key in ("audio", "visual"):
    assert meta[key] == info[key]


def test_tfds_beam_builder(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from data import tfds_builders
  manual = tmp_path / "manual"
  manual.mkdir()
  for rel in ("crema_d/video/1001_DFA_HAP_XX.flv", "crema_d/audio/1002_DFA_ANG_XX.mp3"):
    shutil.copy(os.path.join(MEDIA, rel), manual)
  builder = tfds_builders.AvtCremaD(data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  source = tfds.data_source("avt_crema_d", data_dir=str(tmp_path / "tfds"), download=False)["train"]
  assert len(source) == 1  # the .mp3 has no video
  ex = source[0]
  assert (ex["clip_id"], ex["speaker"], ex["label"]) == (b"1001_DFA_HAP_XX", b"crema_1001", 3)
  assert ex["visual"].shape == (45, 64, 64, 3) and ex["audio"].shape == (180, 80)
  meta = source.dataset_info.metadata["dataset_info"]
  mel = ex["audio"].astype(np.float64)
  np.testing.assert_allclose(meta["audio"]["mean"], mel.mean(0), atol=2e-5)
  assert meta["num_clips"] == 1 and meta["visual"]["frames_per_token"] == 5


def test_bundled_sample_is_consistent():
  info = records.load_dataset_info(PREPARED)
  with open(os.path.join(MEDIA, "MANIFEST.tsv"), newline="") as f:
    rows = {r["file"]: r for r in csv.DictReader(f, delimiter="\t")}
  entries = _manifest(PREPARED)
  assert sorted(e["source"] for e in entries) == sorted(rows)  # every media file is accounted for
  for e in entries:
    assert e["sha256"] == rows[e["source"]]["sha256"]
    assert e["status"] == ("ok" if rows[e["source"]]["n_video_frames"] else "skipped")
  exs = _all_records(PREPARED)
  assert info["num_clips"] == len(exs) == 12
  labels = {"anger": 0, "happiness": 3, "neutral": 4, "sadness": 5, "": -1}
  for ex in exs:
    row = next(r for f, r in rows.items() if os.path.splitext(os.path.basename(f))[0] == ex["clip_id"])
    assert int(ex["label"]) == labels[row["label"]]
    assert ex["visual"].shape[0] == 5 * int(ex["num_tokens"]) and ex["audio"].shape[0] == 20 * int(ex["num_tokens"])


# ---- Continuous ratings from a CSV (--ratings) ----

def test_bundled_sample_carries_the_standin_ratings():
  import csv as csv_lib
  from avt_jax import records as records_lib
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(repo, "sample", "crema_d_standin_ratings.csv")) as f:
    want = {r["clip_id"]: (float(r["arousal"]), float(r["valence"])) for r in csv_lib.DictReader(f)}
  info = records_lib.load_dataset_info(os.path.join(repo, "sample", "prepared"))
  got = {}
  for shard in records_lib.shard_paths(os.path.join(repo, "sample", "prepared"), info):
    for rec in records_lib.read_shard(shard):
      got[rec["clip_id"]] = rec["targets"]
  for cid, (a, v) in want.items():
    assert got[cid][0] == a and got[cid][1] == v and np.isnan(got[cid][2])
  assert all(np.isnan(t).all() for cid, t in got.items() if cid not in want)


def test_ratings_csv_errors_name_file_line_and_field(tmp_path):
  from data import datasets as datasets_lib
  bad = tmp_path / "r.csv"
  bad.write_text("clip_id,arousal,valence\na,1.0,2\nb,high,3\n")
  with pytest.raises(datasets_lib.LabelError, match=r"r.csv:3: arousal='high' is not a number"):
    datasets_lib.read_ratings_csv(str(bad))
  bad.write_text("id,arousal\nx,1\n")
  with pytest.raises(datasets_lib.LabelError, match="expected a header with clip_id"):
    datasets_lib.read_ratings_csv(str(bad))
  bad.write_text("clip_id,valence\nx,1\nx,2\n")
  with pytest.raises(datasets_lib.LabelError, match="rated twice"):
    datasets_lib.read_ratings_csv(str(bad))
  ok = tmp_path / "ok.csv"
  ok.write_text("clip_id,valence\nx,2.5\n")
  got = datasets_lib.read_ratings_csv(str(ok))["x"]
  assert np.isnan(got[0]) and got[1] == 2.5 and np.isnan(got[2])


# ---- Ctrl-C during `python -m data.prepare` ----

def _default_sigint():
  signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell may start background jobs with SIGINT ignored


def _start_cli(inputs, out, workers, own_group):
  cmd = [sys.executable, "-m", "data.prepare", f"--input={inputs}", f"--output={out}", "--shard_size=2",
         f"--workers={workers}", "--noprogress"]

  def preexec():
    _default_sigint()
    if own_group:
      os.setpgrp()  # its own process group, so the test can signal it the way a terminal does

  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=preexec)
  return cmd, proc


def _wait_for(paths, proc, timeout=120):
  deadline = time.time() + timeout
  while not all(os.path.exists(p) for p in paths):
    assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
    assert time.time() < deadline, f"no progress files {paths} after {timeout} s"
    time.sleep(0.02)


def _work_files(out):
  work = os.path.join(out, prepare.WORK_DIR)
  return {n: open(os.path.join(work, n), "rb").read() for n in sorted(os.listdir(work))}


def _check_interrupted(cmd, proc, out):
  stdout, stderr = proc.communicate(timeout=120)
  # A string message, which pytest prints whole (a crash's thread dump included), where it would shorten a tuple.
  assert proc.returncode == 130, f"exit status {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  done = sum(1 for n in os.listdir(os.path.join(out, "work")) if n[:7].isdigit() and n.endswith(".json"))
  assert lines[0] == (f"interrupted: {done} of 6 clips done (progress kept in {out}/work); "
                      f"resume with: {shlex.join(cmd)}")
  # What was finished is whole: every entry parses, every record decodes.
  for name, data in _work_files(out).items():
    if name.endswith(".json"):
      json.loads(data)
    elif name.endswith(".rec"):
      records.decode(data, name)
  return done


def _resume_and_compare(cmd, out, full_out, done):
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_default_sigint)
  assert res.returncode == 0, res.stderr
  assert f"processed {6 - done} clips" in res.stdout  # finished clips were not redone
  assert _shard_bytes(out) == _shard_bytes(full_out)
  for name in ("manifest.jsonl", "dataset_info.json"):
    assert open(os.path.join(out, name), "rb").read() == open(os.path.join(full_out, name), "rb").read()
  assert not os.path.exists(os.path.join(out, "work"))


def test_ctrl_c_reports_progress_and_resume_command(inputs, full, tmp_path):
  out = str(tmp_path / "out")
  cmd, proc = _start_cli(inputs, out, workers=1, own_group=False)
  # Inputs 0 (mp3) and 1 (flv) finished: shard 0 is written; interrupt while input 2 is being extracted.
  _wait_for([f"{out}/work/0000001.json", f"{out}/shards/clips-00000-of-00003.array_record"], proc)
  proc.send_signal(signal.SIGINT)
  done = _check_interrupted(cmd, proc, out)
  assert done >= 2
  shard0 = os.path.join(out, "shards", "clips-00000-of-00003.array_record")
  before = os.stat(shard0)
  _resume_and_compare(cmd, out, full[0], done)
  after = os.stat(shard0)
  assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


def test_ctrl_c_with_worker_pool_prints_no_child_tracebacks(inputs, full, tmp_path):
  out = str(tmp_path / "out")
  cmd, proc = _start_cli(inputs, out, workers=2, own_group=True)
  _wait_for([f"{out}/work/0000000.json", f"{out}/work/0000001.json"], proc)
  os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C in a terminal: the parent and every worker get it
  done = _check_interrupted(cmd, proc, out)
  deadline = time.time() + 30
  while True:  # no worker outlives the run
    try:
      os.killpg(proc.pid, 0)
    except ProcessLookupError:
      break
    assert time.time() < deadline, "worker processes are still running after the interrupted run exited"
    time.sleep(0.1)
  _resume_and_compare(cmd, out, full[0], done)


def test_contact_sheet_shows_random_clips_with_their_tracked_boxes():
  from data import contact_sheet
  sheet = contact_sheet.contact_sheet(PREPARED, frames=4, clips=3, seed=0, media_root=MEDIA)
  assert sheet.shape[0] == 3 * 64 and sheet.dtype == np.uint8
  again = contact_sheet.contact_sheet(PREPARED, frames=4, clips=3, seed=0, media_root=MEDIA)
  np.testing.assert_array_equal(sheet, again)  # the pick is seeded
  label_w = contact_sheet.LABEL_WIDTH
  source = sheet[:, label_w:label_w + 60]  # the source frames (about 85 pixels wide at 64 tall) with the box
  green = (source[..., 1] == 255) & (source[..., 0] == 0) & (source[..., 2] == 0)
  for band in green.reshape(3, 64, -1):  # per clip: a box about a third of the frame tall or more, closed
    rows = np.flatnonzero(band.any(axis=1))
    assert rows[-1] - rows[0] >= 20 and band[rows[0]].sum() >= 10 and band[rows[-1]].sum() >= 10
  plain = contact_sheet.contact_sheet(PREPARED, frames=4)
  assert plain.shape == (12 * 64, label_w + 4 * 64, 3)


def test_voxceleb2_builder_configs_choose_the_face_mode():
  from data import tfds_builders
  assert [c.name for c in tfds_builders.AvtVoxceleb2.BUILDER_CONFIGS] == ["centred", "track"]
  for mode in ("centred", "track"):
    builder = tfds_builders.AvtVoxceleb2(config=mode, data_dir="/nonexistent-tfds-dir")
    assert builder.extract_config().face.mode == mode
