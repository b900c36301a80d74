r"""Contact sheet of the face crops of a prepared (raw kind) dataset: one row per clip, evenly spaced frames.

  python -m data.contact_sheet --prepared=sample/prepared --output=docs/contact_sheet.png [--frames=8]
      [--clips=12 --seed=0] [--media=sample/media]

`--clips` picks that many clips at random (seeded; 0: all). With `--media` (the directory the dataset was prepared
from), each row starts with the clip's source frame at the middle crop, with the tracked crop box drawn in green
and, where the detector gives them, the five landmarks: the tracker is re-run with the parameters stored in
dataset_info.json, so the box is the one the crops were cut with.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from avt_jax import records

LABEL_WIDTH = 190


def _label(lines: list[str], height: int) -> np.ndarray:
  label = np.full((height, LABEL_WIDTH, 3), 255, np.uint8)
  for i, text in enumerate(lines):
    cv2.putText(label, text, (4, 16 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
  return label


def source_frame_with_box(path: str, info: dict, frame_index: int, height: int) -> np.ndarray:
  """The `frame_index`-th output-grid frame of the media file, the crop box and landmarks drawn, `height` tall."""
  from data import extract, face, media  # pylint: disable=import-outside-toplevel
  config = extract.ExtractConfig.from_info(info)
  m = media.decode_media(path, sample_rate=config.logmel.sample_rate, max_short_side=config.max_short_side)
  origin = max(m.audio_start, m.video_start)
  n = extract.num_tokens_for(min(m.audio_end, m.video_end) - origin, config.token_rate)
  index = media.nearest_frame_indices(m.frame_times, origin + np.arange(n * config.video_frames_per_token)
                                      / config.fps)
  frames = m.frames[index]
  track = face.track_face(frames, config.face, path)
  img = frames[frame_index]
  k = height / img.shape[0]  # drawn after scaling down, so the lines stay one pixel wide
  img = cv2.resize(img, (round(img.shape[1] * k), height), interpolation=cv2.INTER_AREA)
  cx, cy, side = track.boxes[frame_index] * k
  cv2.rectangle(img, (round(cx - side / 2), round(cy - side / 2)), (round(cx + side / 2), round(cy + side / 2)),
                (0, 255, 0), 1)
  if track.landmarks is not None:
    for x, y in track.landmarks[frame_index] * k:
      img[min(height - 1, round(y)), min(img.shape[1] - 1, round(x))] = (255, 0, 0)
  return img


def contact_sheet(directory: str, frames: int = 8, scale: int = 1, clips: int = 0, seed: int = 0,
                  media_root: str = "") -> np.ndarray:
  """RGB image: per clip, its crops at `frames` evenly spaced time points (and the source frame with its box)."""
  info = records.load_dataset_info(directory)
  if not records.is_raw(info):
    raise ValueError(f"{directory}: contact sheets need a raw-kind dataset (face crops), got kind {info['kind']!r}")
  sources = {e["clip_id"]: e["source"] for e in records.read_jsonl(os.path.join(directory, "manifest.jsonl"))
             if e.get("status") == "ok"} if media_root else {}
  examples = [ex for path in records.shard_paths(directory, info) for ex in records.read_shard(path)]
  if clips and clips < len(examples):
    pick = np.sort(np.random.default_rng(seed).choice(len(examples), clips, replace=False))
    examples = [examples[i] for i in pick]
  rows = []
  for ex in examples:
    v = ex["visual"]
    s = v.shape[1]
    picks = np.linspace(0, len(v) - 1, frames).round().astype(int)
    parts = [_label([ex["clip_id"][:22], f"{ex['dataset']} {ex['speaker'] or '-'}",
                     f"label {int(ex['label'])}, T={int(ex['num_tokens'])}"], s)]
    if media_root:
      if ex["clip_id"] not in sources:
        raise ValueError(f"{directory}/manifest.jsonl: no source file for clip {ex['clip_id']!r}")
      parts.append(source_frame_with_box(os.path.join(media_root, sources[ex["clip_id"]]), info,
                                         int(picks[len(picks) // 2]), s))
    parts.append(np.concatenate(list(v[picks]), axis=1))
    rows.append(np.concatenate(parts, axis=1))
  if not rows:
    raise ValueError(f"{directory}: no clips")
  width = max(r.shape[1] for r in rows)  # source frames of other aspect ratios make rows of other widths
  sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
  if scale > 1:
    sheet = cv2.resize(sheet, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
  return sheet


def main(argv) -> None:
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  sheet = contact_sheet(FLAGS.prepared, FLAGS.frames, clips=FLAGS.clips, seed=FLAGS.seed, media_root=FLAGS.media)
  if not cv2.imwrite(FLAGS.output, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
    raise SystemExit(f"cannot write {FLAGS.output}")
  print(f"wrote {FLAGS.output} ({sheet.shape[1]}x{sheet.shape[0]})")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("prepared", "sample/prepared", "Prepared dataset directory (raw kind).")
  flags.DEFINE_string("output", "docs/contact_sheet.png", "PNG to write.")
  flags.DEFINE_integer("frames", 8, "Frames per clip.")
  flags.DEFINE_integer("clips", 0, "Clips picked at random (0: all).")
  flags.DEFINE_integer("seed", 0, "Seed of the random pick.")
  flags.DEFINE_string("media", "", "Directory the dataset was prepared from: show each clip's source frame with "
                      "its crop box.")
  app.run(main)
