r"""Contact sheet of the face crops of a prepared (raw kind) dataset: one row per clip, evenly spaced frames.

  python -m data.contact_sheet --prepared=sample/prepared --output=docs/contact_sheet.png [--frames=8]
"""

from __future__ import annotations

import cv2
import numpy as np

from avt_jax import records


def contact_sheet(directory: str, frames: int = 8, scale: int = 1) -> np.ndarray:
  """RGB image [rows * S, label + frames * S, 3]: each clip's crops at `frames` evenly spaced time points."""
  info = records.load_dataset_info(directory)
  if not records.is_raw(info):
    raise ValueError(f"{directory}: contact sheets need a raw-kind dataset (face crops), got kind {info['kind']!r}")
  rows = []
  label_w = 190
  for path in records.shard_paths(directory, info):
    for ex in records.read_shard(path):
      v = ex["visual"]
      s = v.shape[1]
      picks = np.linspace(0, len(v) - 1, frames).round().astype(int)
      strip = np.concatenate(list(v[picks]), axis=1)
      label = np.full((s, label_w, 3), 255, np.uint8)
      lines = [ex["clip_id"][:22], f"{ex['dataset']} {ex['speaker'] or '-'}",
               f"label {int(ex['label'])}, T={int(ex['num_tokens'])}"]
      for i, text in enumerate(lines):
        cv2.putText(label, text, (4, 16 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
      rows.append(np.concatenate([label, strip], axis=1))
  if not rows:
    raise ValueError(f"{directory}: no clips")
  sheet = np.concatenate(rows, axis=0)
  if scale > 1:
    sheet = cv2.resize(sheet, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
  return sheet


def main(argv) -> None:
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  sheet = contact_sheet(FLAGS.prepared, FLAGS.frames)
  if not cv2.imwrite(FLAGS.output, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
    raise SystemExit(f"cannot write {FLAGS.output}")
  print(f"wrote {FLAGS.output} ({sheet.shape[1]}x{sheet.shape[0]})")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("prepared", "sample/prepared", "Prepared dataset directory (raw kind).")
  flags.DEFINE_string("output", "docs/contact_sheet.png", "PNG to write.")
  flags.DEFINE_integer("frames", 8, "Frames per clip.")
  app.run(main)
