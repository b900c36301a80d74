"""Throughput of the Grain input pipeline: batches/s and clips/s for several prefetch worker counts.

  python bench/bench_loader.py --data sample/prepared --batch_size 8 --max_tokens 20 --workers 0,1,2
  python bench/bench_loader.py --synthetic 96      # a synthetic raw dataset (doc geometry) in a temp dir

The first batch (worker start-up, file opening) is timed separately from the steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avt_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from avt_jax import records  # pylint: disable=g-import-not-at-top,wrong-import-position


def write_synthetic(root: str, num_clips: int, seed: int = 0) -> None:
  """A raw-kind dataset with the geometry of docs/data_format.md (20 x 80 log-mel, 5 x 64 x 64 x 3 faces)."""
  ka, fa, kv, s = 20, 80, 5, 64
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "shards"), exist_ok=True)

  def clips(lo, hi):
    for i in range(lo, hi):
      t = int(rng.integers(10, 30))  # 2 to 6 s at 5 tokens/s
      yield {"clip_id": f"syn{i:05d}", "dataset": "avt_synth", "speaker": f"s{i % 10}", "session": "",
             "label": np.int32(i % 6), "targets": np.full(3, np.nan, np.float32), "num_tokens": np.int32(t),
             "audio": rng.normal(size=(t * ka, fa)).astype(np.float32),
             "visual": rng.integers(0, 256, size=(t * kv, s, s, 3), dtype=np.uint8)}

  names = []
  bounds = np.linspace(0, num_clips, 3).astype(int)
  for k in range(2):
    name = f"shards/clips-{k:05d}-of-00002.array_record"
    records.write_shard(os.path.join(root, name), clips(bounds[k], bounds[k + 1]))
    names.append(name)
  info = {"kind": "raw", "token_rate": 5.0,
          "audio": {"type": "logmel", "frames_per_token": ka, "dim": fa, "mean": [0.0] * fa, "std": [1.0] * fa},
          "visual": {"type": "face", "frames_per_token": kv, "fps": 25.0, "size": s, "channels": 3,
                     "target_size": 8, "target_mean": 0.5, "target_std": 0.25},
          "num_clips": num_clips, "shards": names}
  with open(os.path.join(root, records.DATASET_INFO), "w") as f:
    json.dump(info, f)


def measure(data: str, batch_size: int, max_tokens: int, workers: int, num_batches: int, split: str):
  ds = input_pipeline.make_dataset(data, split=split, global_batch_size=batch_size, seed=0, max_tokens=max_tokens,
                                   process_index=0, process_count=1, worker_count=workers)
  it = iter(ds)
  try:
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for _ in range(num_batches):
      try:
        next(it)
      except StopIteration:
        break
      n += 1
    dt = time.perf_counter() - t0
  finally:
    it.close()
  return first, n, dt


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default="", help="prepared directory (or 'tfds:<name>/<split>')")
  p.add_argument("--synthetic", type=int, default=0, help="clips of a synthetic raw dataset (used if no --data)")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_tokens", type=int, default=20)
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--batches", type=int, default=30, help="timed batches after the first one")
  p.add_argument("--split", default="train", choices=["train", "eval"])
  args = p.parse_args()

  tmp = None
  data = args.data
  if not data:
    tmp = tempfile.TemporaryDirectory()
    data = tmp.name
    t0 = time.perf_counter()
    write_synthetic(data, args.synthetic or 96)
    print(f"synthetic raw dataset: {args.synthetic or 96} clips in {time.perf_counter() - t0:.1f}s -> {data}")
  info = input_pipeline.spec_info(data)
  print(f"data={args.data or 'synthetic'} kind={info['kind']} clips={info.get('num_clips')} "
        f"batch={args.batch_size} max_tokens={args.max_tokens} split={args.split} cpus={os.cpu_count()}")
  print(f"{'workers':>7} {'first batch s':>13} {'batches':>7} {'batches/s':>9} {'clips/s':>8}")
  for w in [int(x) for x in args.workers.split(",")]:
    first, n, dt = measure(data, args.batch_size, args.max_tokens, w, args.batches, args.split)
    rate = n / dt if dt > 0 else float("nan")
    print(f"{w:>7} {first:>13.2f} {n:>7} {rate:>9.2f} {rate * args.batch_size:>8.1f}", flush=True)
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
