r"""Throughput of dataset preparation over the bundled sample media (sample/media).

  python bench/bench_prepare.py [--workers=1,2] [--repeats=1] [--media=sample/media]

Prints two tables:
  * per stage, single process: decode (PyAV, all frames to RGB + audio to 16 kHz), face (Haar detection and
    tracking on the 25 fps frames, crop + resize), log-mel, record encoding; in video frames per second;
  * end to end (`data.prepare.prepare` into a temporary directory, including process start-up, hashing, shard
    writing): clips/s and source video frames/s, in total and per core (= per worker process).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from avt_jax import records  # noqa: E402
from data import extract, face, logmel, media, prepare  # noqa: E402

flags.DEFINE_string("media", "sample/media", "Media directory.")
flags.DEFINE_list("workers", ["1", "2"], "Worker counts for the end-to-end runs.")
flags.DEFINE_integer("repeats", 1, "Repeats of the per-stage timing (best is reported).")
flags.DEFINE_integer("detect_every", 1, "Face detector on every k-th frame (data.prepare --detect_every).")
FLAGS = flags.FLAGS


def _video_files(root: str) -> list[str]:
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                if f.lower().endswith(media.VIDEO_SUFFIXES))


def _config() -> extract.ExtractConfig:
  return extract.ExtractConfig(face=face.FaceConfig(detect_every=FLAGS.detect_every))


def stage_table(files: list[str], repeats: int) -> list[tuple]:
  cv2.setNumThreads(1)
  config = _config()
  rows = []
  for path in files:
    best = None
    for _ in range(repeats):
      t0 = time.perf_counter()
      m = media.decode_media(path)
      t1 = time.perf_counter()
      n = extract.num_tokens_for(min(m.audio_end, m.video_end) - max(m.audio_start, m.video_start), 5.0)
      idx = media.nearest_frame_indices(m.frame_times, max(m.audio_start, m.video_start) + np.arange(n * 5) / 25.0)
      crops, _ = face.face_crops(m.frames[idx], config.face, path)
      t2 = time.perf_counter()
      mel = logmel.log_mel(m.audio)[:n * 20]
      t3 = time.perf_counter()
      records.encode(dict(clip_id="x", dataset="x", speaker="", session="", label=np.int32(-1),
                          targets=np.zeros(3, np.float32), num_tokens=np.int32(n), audio=mel, visual=crops))
      t4 = time.perf_counter()
      times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3)
      best = times if best is None or sum(times) < sum(best) else best
    rows.append((os.path.basename(path), m.num_frames, len(idx), *best))
  return rows


def end_to_end(root: str, workers: int) -> tuple[float, int, int]:
  with tempfile.TemporaryDirectory() as out:
    t0 = time.perf_counter()
    summary = prepare.prepare(prepare.PrepareOptions(input=root, output=out, workers=workers, progress=False,
                                                           config=_config()))
    wall = time.perf_counter() - t0
    with open(os.path.join(out, prepare.MANIFEST)) as f:
      entries = [json.loads(line) for line in f]
  frames = sum(e.get("source_video_frames", 0) for e in entries if e["status"] == "ok")
  return wall, summary["ok"], frames


def main(argv) -> None:
  del argv
  files = _video_files(FLAGS.media)
  print(f"{len(files)} video clips under {FLAGS.media}; {os.cpu_count()} CPUs visible; OpenCV threads 1; "
        f"face detector every {FLAGS.detect_every} frame(s)")
  rows = stage_table(files, FLAGS.repeats)
  print("\nper stage, one process (frames/s = source frames / stage seconds; face uses the 25 fps frames)")
  print(f"{'clip':<22}{'src fr':>7}{'25fps fr':>9}{'decode f/s':>11}{'face f/s':>10}{'logmel ms':>10}"
        f"{'encode ms':>10}{'total f/s':>10}")
  tot = np.zeros(4)
  nsrc = nout = 0
  for name, src, out, *t in rows:
    tot += t
    nsrc += src
    nout += out
    print(f"{name:<22}{src:>7}{out:>9}{src / t[0]:>11.0f}{out / t[1]:>10.1f}{1e3 * t[2]:>10.1f}{1e3 * t[3]:>10.1f}"
          f"{src / sum(t):>10.1f}")
  print(f"{'all':<22}{nsrc:>7}{nout:>9}{nsrc / tot[0]:>11.0f}{nout / tot[1]:>10.1f}{1e3 * tot[2]:>10.1f}"
        f"{1e3 * tot[3]:>10.1f}{nsrc / tot.sum():>10.1f}")
  print(f"share of time: decode {tot[0] / tot.sum():.0%}, face {tot[1] / tot.sum():.0%}, "
        f"log-mel {tot[2] / tot.sum():.0%}, encode {tot[3] / tot.sum():.0%}")

  print("\nend to end: python -m data.prepare over all media (audio-only files are skipped)")
  print(f"{'workers':>8}{'wall s':>9}{'clips':>7}{'clips/s':>9}{'clips/s/core':>13}{'frames/s':>10}"
        f"{'frames/s/core':>14}")
  for w in (int(x) for x in FLAGS.workers):
    wall, clips, frames = end_to_end(FLAGS.media, w)
    print(f"{w:>8}{wall:>9.1f}{clips:>7}{clips / wall:>9.2f}{clips / wall / w:>13.2f}{frames / wall:>10.1f}"
          f"{frames / wall / w:>14.1f}")


if __name__ == "__main__":
  app.run(main)
