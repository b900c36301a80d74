"""`python -m data.prepare` exit status on unusable inputs, and its reading of its own state files.

Bad inputs are real: a text file named .mp4, a real clip re-encoded without its audio, a real clip turned on its
side (no detectable frontal face), a truncated clip and an audio-only file.
"""

import fractions
import json
import os
import shutil
import subprocess
import sys

import av
import cv2
import numpy as np
import pytest

from avt_jax import records
from data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIA = os.path.join(ROOT, "sample", "media")
GRID = os.path.join(MEDIA, "grid", "video", "bbaf2n.mpg")


def _reencode_video(src, dst, pixelate=False, keep_audio=True):
  """Re-encodes the video of a real clip (MPEG-4 Part 2), optionally pixelated to 8 x 6 blocks so that no face can be
  found in it; copies its audio."""
  with av.open(src) as inp, av.open(dst, "w") as out:
    v = inp.streams.video[0]
    w, h = v.codec_context.width, v.codec_context.height
    ov = out.add_stream("mpeg4", rate=25)
    ov.width, ov.height = w, h
    ov.pix_fmt, ov.bit_rate = "yuv420p", 2 << 20
    oa = out.add_stream_from_template(inp.streams.audio[0]) if keep_audio else None
    for i, frame in enumerate(inp.decode(v)):
      rgb = frame.to_ndarray(format="rgb24")
      if pixelate:
        rgb = cv2.resize(cv2.resize(rgb, (8, 6), interpolation=cv2.INTER_AREA), (w, h),
                         interpolation=cv2.INTER_NEAREST)
      new = av.VideoFrame.from_ndarray(rgb, format="rgb24")
      new = new.reformat(format="yuv420p")
      new.pts, new.time_base = i, fractions.Fraction(1, 25)
      for packet in ov.encode(new):
        out.mux(packet)
    for packet in ov.encode():
      out.mux(packet)
    if oa is not None:
      inp.seek(0)
      a = inp.streams.audio[0]
      for packet in inp.demux(a):
        if packet.dts is not None:
          packet.stream = oa
          out.mux(packet)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  shutil.copy(os.path.join(ROOT, "README.md"), d / "notes.mp4")  # text under a video name
  _reencode_video(GRID, str(d / "silent.mp4"), keep_audio=False)
  _reencode_video(GRID, str(d / "pixelated.mkv"), pixelate=True)
  data = open(os.path.join(MEDIA, "grid/video/lwbsza.mpg"), "rb").read()
  (d / "truncated.mpg").write_bytes(data[:int(0.3 * len(data))])
  shutil.copy(os.path.join(MEDIA, "crema_d/audio/1002_DFA_SAD_XX.mp3"), d)
  return str(d)


def _cli(*args):
  cmd = [sys.executable, "-m", "data.prepare", "--noprogress", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _files(d):
  return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
          for r, _, fs in os.walk(d) for f in fs}


def test_exit_status_is_nonzero_when_no_clip_is_written(bad_inputs, tmp_path):
  out = str(tmp_path / "out")
  res = _cli(f"--input={bad_inputs}", f"--output={out}")
  assert res.returncode == 1, (res.stdout, res.stderr)
  assert res.stderr == f"error: no clip could be written to {out}: all 5 inputs were skipped (reasons above)\n"
  # The usual summary comes first, with every input and its reason.
  assert "0 clips written to 0 shard(s); 5 skipped" in res.stdout
  reasons = {e["source"]: e["reason"] for e in records.read_jsonl(os.path.join(out, "manifest.jsonl"))}
  assert "unreadable media file" in reasons["notes.mp4"]
  assert reasons["silent.mp4"] == "no audio stream"
  assert reasons["pixelated.mkv"].startswith("no face found")
  assert "truncated" in reasons["truncated.mpg"]
  assert reasons["1002_DFA_SAD_XX.mp3"] == "no video stream (audio-only file)"
  for src in reasons:
    assert src in res.stdout
  # The same command again: nothing to do, still nothing written, and the directory is left as it was.
  before = _files(out)
  again = _cli(f"--input={bad_inputs}", f"--output={out}")
  assert again.returncode == 1 and "already complete; nothing to do" in again.stdout
  assert "error: no clip could be written" in again.stderr
  assert _files(out) == before


def test_exit_status_is_zero_when_some_clip_is_written(bad_inputs, tmp_path):
  d = tmp_path / "in"
  shutil.copytree(bad_inputs, d)
  shutil.copy(GRID, d)
  res = _cli(f"--input={d}", f"--output={tmp_path / 'out'}")
  assert res.returncode == 0, res.stderr
  assert "1 clips written to 1 shard(s); 5 skipped" in res.stdout and "error" not in res.stderr


def test_exit_status_when_the_input_matches_no_media(bad_inputs, tmp_path):
  out = tmp_path / "out"
  res = _cli(f"--input={bad_inputs}/*.txt", f"--output={out}")
  assert res.returncode == 1
  assert res.stderr.startswith(f"error: --input='{bad_inputs}/*.txt' contains no files ending in .mp4, .flv")
  assert not out.exists()


# ---- The preparation's own state files ----

@pytest.fixture(scope="module")
def quick_inputs(tmp_path_factory):
  """Inputs that are all skipped quickly (audio-only and unreadable): 3 real mp3s and a text file named .mp4."""
  d = tmp_path_factory.mktemp("quick")
  for emotion in ("ANG", "DIS", "FEA"):
    shutil.copy(os.path.join(MEDIA, f"crema_d/audio/1002_DFA_{emotion}_XX.mp3"), d)
  shutil.copy(os.path.join(ROOT, "README.md"), d / "zz_notes.mp4")
  return str(d)


def _opts(inputs, out, **kw):
  return prepare.PrepareOptions(input=inputs, output=str(out), shard_size=2, progress=False, **kw)


def test_malformed_work_entry_names_path_and_line(quick_inputs, tmp_path):
  out = tmp_path / "out"
  assert not prepare.prepare(_opts(quick_inputs, out, stop_after=2))["done"]
  entry = out / "work" / "0000001.json"
  entry.write_bytes(entry.read_bytes()[:40])  # damaged outside the preparation
  before = _files(str(out))
  with pytest.raises(prepare.PrepareError) as e:
    prepare.prepare(_opts(quick_inputs, out))
  assert str(e.value).startswith(f"{entry}:1: malformed work entry: ")
  assert str(e.value).endswith("(delete it to redo input 1)")
  assert _files(str(out)) == before  # nothing written, nothing removed
  # Following the advice finishes the preparation with the same result as an uninterrupted run.
  entry.unlink()
  assert prepare.prepare(_opts(quick_inputs, out))["done"]
  ref = tmp_path / "ref"
  prepare.prepare(_opts(quick_inputs, ref))
  assert _files(str(out)) == _files(str(ref))


def test_malformed_plan_names_path_and_line(quick_inputs, tmp_path):
  out = tmp_path / "out"
  prepare.prepare(_opts(quick_inputs, out, stop_after=1))
  plan = out / "work" / "plan.json"
  text = json.dumps(json.loads(plan.read_text()), indent=1)
  lines = text.splitlines()
  lines[3] = lines[3].rstrip(",")  # a missing comma on line 4 (line 5 starts the next key)
  plan.write_text("\n".join(lines))
  before = _files(str(out))
  with pytest.raises(prepare.PrepareError, match=f"^{plan}:5: malformed preparation plan: Expecting ','"):
    prepare.prepare(_opts(quick_inputs, out))
  assert _files(str(out)) == before


def test_malformed_dataset_info_and_manifest_name_path_and_line(quick_inputs, tmp_path):
  out = tmp_path / "out"
  prepare.prepare(_opts(quick_inputs, out))
  info = out / "dataset_info.json"
  good_info = info.read_bytes()
  lines = good_info.decode().splitlines()
  lines[2] = lines[2].replace(":", "", 1)  # '"token_rate" 5.0,' on line 3
  info.write_text("\n".join(lines) + "\n")
  before = _files(str(out))
  with pytest.raises(prepare.PrepareError, match=f"^{info}:3: malformed dataset_info.json: Expecting ':'"):
    prepare.prepare(_opts(quick_inputs, out))
  assert _files(str(out)) == before and not (out / "work").exists()
  info.write_bytes(good_info)
  manifest = out / "manifest.jsonl"
  rows = manifest.read_text().splitlines()
  rows[1] = rows[1][:-1]  # line 2 loses its closing brace
  manifest.write_text("\n".join(rows) + "\n")
  before = _files(str(out))
  with pytest.raises(prepare.PrepareError, match=f"^{manifest}:2: malformed manifest line: "):
    prepare.prepare(_opts(quick_inputs, out))
  assert _files(str(out)) == before
