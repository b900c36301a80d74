r"""Throughput of dataset preparation over the bundled sample media (sample/media).

  python bench/bench_prepare.py [--workers=1,2] [--repeats=3] [--copies=8] [--format=source|voxceleb2]
      [--face=track|centred] [--detector=yunet] [--detect_every=10] [--compare=<another checkout>]

`--format=voxceleb2` first re-encodes every clip the way VoxCeleb2 distributes its videos (face-centred 224 x 224
crops following the face, H.264 at 25 fps, AAC 16 kHz mono in mp4; made with data.face's tracker), so the figures
show the decoder and detector cost on that format; `--format=source` uses the files as shipped (CREMA-D's 480 x 360
VP6 FLV, GRID's 360 x 288 MPEG-1), whose decoders are several times slower.

Prints two tables:
  * per stage, one process: decode (PyAV, all frames to RGB + audio to 16 kHz), face (scene cuts, detection every
    k-th frame and tracking, on the 25 fps frames), crop (crop + resize to 64 x 64), log-mel, record encoding; in
    source video frames per second, and x real time (source seconds per second);
  * end to end: `python -m data.prepare` over `--copies` renamed copies of the video clips (so the process start-up
    and the spawned workers' imports are amortised as on a large dataset), timed from the command's start to its exit;
    x real time per core = source seconds / wall seconds / workers; then (`--beam`) the TFDS Beam builder path
    (data/tfds_builders.py, same extraction and options) over the same files on Beam's DirectRunner, in-process.
    With `--compare`, the same command runs from
    that checkout too (e.g. `git worktree add /tmp/old <commit>`), alternating with this one `--repeats` times, with
    its own default options (old checkouts know neither --face nor --detector).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from avt_jax import records  # noqa: E402
from data import extract, face, logmel, media  # noqa: E402

flags.DEFINE_string("media", "sample/media", "Media directory.")
flags.DEFINE_list("workers", ["1", "2"], "Worker counts for the end-to-end runs.")
flags.DEFINE_integer("repeats", 3, "Repeats (per-stage: the best is reported; end to end: alternated runs).")
flags.DEFINE_integer("copies", 8, "Copies of the clips in the end-to-end input.")
flags.DEFINE_enum("face", "track", list(face.MODES), "data.prepare --face.")
flags.DEFINE_enum("detector", face.FaceConfig.detector, list(face.DETECTORS), "data.prepare --detector.")
flags.DEFINE_integer("detect_every", face.FaceConfig.detect_every, "data.prepare --detect_every.")
flags.DEFINE_enum("format", "source", ["source", "voxceleb2"], "Inputs as shipped, or re-encoded as VoxCeleb2's.")
flags.DEFINE_bool("beam", True, "Time the TFDS Beam builder on the DirectRunner too.")
flags.DEFINE_string("compare", "", "Another checkout whose data.prepare runs side by side with this one.")
FLAGS = flags.FLAGS


def _video_files(root: str) -> list[str]:
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                if f.lower().endswith(media.VIDEO_SUFFIXES))


def _config() -> extract.ExtractConfig:
  return extract.ExtractConfig(face=face.FaceConfig(mode=FLAGS.face, detector=FLAGS.detector,
                                                    detect_every=FLAGS.detect_every))


def stage_table(files: list[str], repeats: int) -> list[tuple]:
  cv2.setNumThreads(1)
  config = _config()
  rows = []
  for path in files:
    best = None
    for _ in range(repeats):
      t0 = time.perf_counter()
      m = media.decode_media(path, max_short_side=config.max_short_side)
      t1 = time.perf_counter()
      origin = max(m.audio_start, m.video_start)
      n = extract.num_tokens_for(min(m.audio_end, m.video_end) - origin, config.token_rate)
      idx = media.nearest_frame_indices(m.frame_times, origin + np.arange(n * 5) / config.fps)
      frames = m.frames[idx]
      track = face.track_face(frames, config.face, path)
      t2 = time.perf_counter()
      crops = face.crop_faces(frames, track.boxes, config.face.size)
      t3 = time.perf_counter()
      mel = logmel.log_mel(m.audio)[:n * 20]
      t4 = time.perf_counter()
      records.encode(dict(clip_id="x", dataset="x", speaker="", session="", label=np.int32(-1),
                          targets=np.zeros(3, np.float32), num_tokens=np.int32(n), audio=mel, visual=crops))
      t5 = time.perf_counter()
      times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
      best = times if best is None or sum(times) < sum(best) else best
    rows.append((os.path.basename(path), m.num_frames, m.video_duration, track.detection_frames, *best))
  return rows


def voxceleb2_copy(path: str, out_dir: str) -> str:
  """The clip as VoxCeleb2 ships one: 224 x 224 face-centred crops (the tracked box enlarged so the face fills about
  half the side), H.264 yuv420p at 25 fps and AAC 16 kHz mono in mp4."""
  import av  # pylint: disable=import-outside-toplevel
  m = media.decode_media(path)
  n = int((m.video_end - m.video_start) * 25)
  frames = m.frames[media.nearest_frame_indices(m.frame_times, m.video_start + np.arange(n) / 25.0)]
  crops, _ = face.face_crops(frames, face.FaceConfig(size=224, margin=1.0, detect_every=1))
  dst = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".mp4")
  with av.open(dst, "w") as c:
    v = c.add_stream("libx264", rate=25, options={"crf": "23", "preset": "medium"})
    v.width = v.height = 224
    v.pix_fmt = "yuv420p"
    a = c.add_stream("aac", rate=16000)
    a.layout = "mono"
    for img in crops:
      for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in v.encode():
      c.mux(p)
    audio = m.audio[int(round((m.video_start - m.audio_start) * 16000)):][None]
    for s in range(0, audio.shape[1], 1024):
      fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, s:s + 1024]), format="fltp", layout="mono")
      fr.sample_rate = 16000
      for p in a.encode(fr):
        c.mux(p)
    for p in a.encode():
      c.mux(p)
  return dst


def copy_inputs(files: list[str], copies: int, out: str) -> float:
  """Links `copies` renamed copies of each clip into `out`; returns their source seconds."""
  seconds = 0.0
  for path in files:
    m = media.decode_media(path)
    stem, ext = os.path.splitext(os.path.basename(path))
    for c in range(copies):
      os.symlink(os.path.abspath(path), os.path.join(out, f"{stem}_c{c}{ext}"))
      seconds += m.video_duration
  return seconds


def run_prepare(checkout: str, inputs: str, workers: int, own_options: bool) -> tuple[float, int]:
  """Wall seconds of one `python -m data.prepare` run from `checkout`, and the clips it wrote."""
  out = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
  cmd = [sys.executable, "-m", "data.prepare", f"--input={inputs}", f"--output={out}", "--dataset=generic",
         f"--workers={workers}", "--noprogress"]
  if own_options:
    cmd += [f"--face={FLAGS.face}", f"--detector={FLAGS.detector}", f"--detect_every={FLAGS.detect_every}"]
  try:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=checkout, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "dataset_info.json")) as f:
      clips = json.load(f)["num_clips"]
  finally:
    shutil.rmtree(out, ignore_errors=True)
  return wall, clips


def time_beam(inputs: str) -> tuple[float, int]:
  """Wall seconds and clips of a TFDS Beam builder (generic names) over `inputs` on the DirectRunner."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  from data import tfds_builders  # pylint: disable=import-outside-toplevel

  class BenchClips(tfds_builders._AvtBuilder):  # pylint: disable=protected-access
    DATASET = "generic"
    EXTRACT = _config()
    pkg_dir_path = epath.Path(os.path.dirname(tfds_builders.__file__))  # where TFDS looks for metadata files
    MANUAL_DOWNLOAD_INSTRUCTIONS = "the benchmark's input directory"

  with tempfile.TemporaryDirectory() as data_dir:
    builder = BenchClips(data_dir=data_dir)
    t0 = time.perf_counter()
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=inputs))
    wall = time.perf_counter() - t0
    return wall, builder.info.splits["train"].num_examples


def main(argv) -> None:
  del argv
  files = _video_files(FLAGS.media)
  converted = tempfile.TemporaryDirectory()
  if FLAGS.format == "voxceleb2":
    files = [voxceleb2_copy(f, converted.name) for f in files]
  print(f"{len(files)} video clips under {FLAGS.media} ({FLAGS.format} format); {len(os.sched_getaffinity(0))} CPUs usable; OpenCV threads "
        f"1; face {FLAGS.face}, detector {FLAGS.detector} every {FLAGS.detect_every} frame(s)")
  rows = stage_table(files, FLAGS.repeats)
  print("\nper stage, one process (f/s = source frames / stage seconds)")
  print(f"{'clip':<22}{'src fr':>7}{'detect':>7}{'decode':>8}{'face':>8}{'crop':>8}{'logmel':>8}{'encode':>8}"
        f"{'total':>8}{'x real':>8}")
  tot = np.zeros(5)
  nsrc = secs = 0
  for name, src, dur, ndet, *t in rows:
    tot += t
    nsrc += src
    secs += dur
    print(f"{name:<22}{src:>7}{ndet:>7}" + "".join(f"{src / x:>8.0f}" for x in t) + f"{src / sum(t):>8.0f}"
          f"{dur / sum(t):>8.1f}")
  print(f"{'all':<22}{nsrc:>7}{'':>7}" + "".join(f"{nsrc / x:>8.0f}" for x in tot) + f"{nsrc / tot.sum():>8.0f}"
        f"{secs / tot.sum():>8.1f}")
  print("share of time: " + ", ".join(f"{k} {x / tot.sum():.0%}" for k, x in
                                      zip(("decode", "face", "crop", "log-mel", "encode"), tot)))

  checkouts = [("this", ROOT)] + ([("compare", os.path.abspath(FLAGS.compare))] if FLAGS.compare else [])
  with tempfile.TemporaryDirectory() as inputs:
    seconds = copy_inputs(files, FLAGS.copies, inputs)
    print(f"\nend to end: python -m data.prepare over {FLAGS.copies} copies = {FLAGS.copies * len(files)} clips, "
          f"{seconds:.1f} source seconds; runs alternate between checkouts")
    print(f"{'checkout':<10}{'workers':>8}{'wall s (runs)':>28}{'clips':>7}{'x real/core':>12}{'ratio':>7}")
    for w in (int(x) for x in FLAGS.workers):
      walls = {name: [] for name, _ in checkouts}
      clips = {}
      for _ in range(FLAGS.repeats):
        for name, path in checkouts:
          wall, clips[name] = run_prepare(path, inputs, w, own_options=name == "this")
          walls[name].append(wall)
      for name, _ in checkouts:
        best = min(walls[name])
        ratio = f"{min(walls['compare']) / best:>7.2f}" if name == "this" and FLAGS.compare else ""
        runs = " ".join(f"{x:.1f}" for x in walls[name])
        print(f"{name:<10}{w:>8}{runs:>28}{clips[name]:>7}{seconds / best / w:>12.1f}{ratio}")
    if FLAGS.beam:
      wall, n = time_beam(inputs)
      print(f"\nTFDS Beam builder, DirectRunner (in-process, after imports): {wall:.1f} s, {n} clips, "
            f"{seconds / wall:.1f} x real time")
  converted.cleanup()


if __name__ == "__main__":
  app.run(main)
