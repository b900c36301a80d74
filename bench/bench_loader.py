"""Throughput of the training input pipeline, per core, with each batch on the devices at the end of its timing.

  python bench/bench_loader.py --kind=features --max_tokens=100 --workers=0,1
  python bench/bench_loader.py --kind=raw --max_tokens=50 --workers=0,1
  python bench/bench_loader.py --kind=raw --compare=/tmp/old_checkout     # another commit, side by side
  python bench/bench_loader.py --data=sample/prepared --batch_size=8 --max_tokens=20

Each measurement runs in its own process pinned to `--cpus` cores (prefetch workers inherit the pinning), builds
the pipeline as the trainer does (pretraining's batch keys; where the code has it, stored scale with the
finishing left to the device step), and times `--batches` batches after `--warmup`, each one assembled into a
global device array (`sharding.global_batch`) and waited for. clips/s per core = clips/s / cpus.

Without --data a synthetic dataset of the given kind is written first, by each compared checkout's own
`records.write_shard` (so an old commit reads the shards it would have written): features 512-d audio and 17
action units per token, clips of 60-140 tokens; raw the geometry of docs/data_format.md (20 x 80 log-mel,
5 x 64 x 64 x 3 faces per token), clips of 40-60 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEOMETRY = {"features": dict(da=512, dv=17, tokens=(60, 140)),
            "raw": dict(ka=20, fa=80, kv=5, s=64, tokens=(40, 60))}


def write_synthetic(root: str, kind: str, num_clips: int, seed: int = 0) -> None:
  """A prepared directory of `num_clips` random clips of `kind` (GEOMETRY), in two shards."""
  from avt_jax import records  # pylint: disable=g-import-not-at-top  (the checkout on sys.path)
  geo = GEOMETRY[kind]
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "shards"), exist_ok=True)

  def clips(lo, hi):
    for i in range(lo, hi):
      t = int(rng.integers(*geo["tokens"]))
      if kind == "raw":
        audio = rng.normal(size=(t * geo["ka"], geo["fa"])).astype(np.float32)
        visual = rng.integers(0, 256, size=(t * geo["kv"], geo["s"], geo["s"], 3), dtype=np.uint8)
      else:
        audio = rng.normal(size=(t, geo["da"])).astype(np.float32)
        visual = rng.normal(size=(t, geo["dv"])).astype(np.float32)
      yield {"clip_id": f"syn{i:05d}", "dataset": "bench", "speaker": f"s{i % 10}", "session": "",
             "label": np.int32(i % 6), "targets": np.full(3, np.nan, np.float32), "num_tokens": np.int32(t),
             "audio": audio, "visual": visual}

  names = []
  bounds = np.linspace(0, num_clips, 3).astype(int)
  for k in range(2):
    name = f"shards/clips-{k:05d}-of-00002.array_record"
    records.write_shard(os.path.join(root, name), clips(bounds[k], bounds[k + 1]))
    names.append(name)
  if kind == "raw":
    info = {"kind": "raw", "token_rate": 5.0,
            "audio": {"type": "logmel", "frames_per_token": geo["ka"], "dim": geo["fa"], "mean": [0.0] * geo["fa"],
                      "std": [1.0] * geo["fa"]},
            "visual": {"type": "face", "frames_per_token": geo["kv"], "fps": 25.0, "size": geo["s"], "channels": 3,
                       "target_size": 8, "target_mean": 0.5, "target_std": 0.25}}
  else:
    info = {"kind": "features", "token_rate": 25.0,
            "audio": {"type": "features", "frames_per_token": 1, "dim": geo["da"], "mean": [0.0] * geo["da"],
                      "std": [1.0] * geo["da"]},
            "visual": {"type": "features", "frames_per_token": 1, "dim": geo["dv"], "mean": [0.0] * geo["dv"],
                       "std": [1.0] * geo["dv"]}}
  info.update(num_clips=num_clips, shards=names)
  with open(os.path.join(root, records.DATASET_INFO), "w") as f:
    json.dump(info, f)


def measure(data: str, batch_size: int, max_tokens: int, workers: int, num_batches: int, warmup: int) -> dict:
  """Times the training pipeline of the checkout on sys.path (run inside a pinned process)."""
  import inspect  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from avt_jax import input_pipeline, sharding, tasks  # pylint: disable=g-import-not-at-top
  kwargs = dict(split="train", global_batch_size=batch_size, seed=0, max_tokens=max_tokens, process_index=0,
                process_count=1, worker_count=workers, keys=tasks.get("pretrain").batch_keys)
  stored = "finish" in inspect.signature(input_pipeline.make_dataset).parameters
  if stored:
    kwargs["finish"] = False  # the trainer's path: the step finishes the batch on the device
  mesh = sharding.make_mesh({"data": -1})
  it = iter(input_pipeline.make_dataset(data, **kwargs))
  t0 = time.perf_counter()
  for _ in range(warmup):
    jax.block_until_ready(sharding.global_batch(next(it), mesh))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(sharding.global_batch(next(it), mesh))
  dt = time.perf_counter() - t0
  if hasattr(it, "close"):
    it.close()
  return {"warmup_s": first, "clips_per_s": num_batches * batch_size / dt, "stored_scale": stored}


def _child(args) -> None:
  if args.cpus:
    os.sched_setaffinity(0, set(range(args.cpus)))
  sys.path.insert(0, args.repo)
  if args.cpu_device:
    os.environ["JAX_PLATFORMS"] = "cpu"
  if args.write:
    write_synthetic(args.data, args.kind, args.clips)
    return
  print(json.dumps(measure(args.data, args.batch_size, args.max_tokens, args.workers_one, args.batches,
                           args.warmup)))


def _run_child(repo: str, args, **extra) -> dict | None:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--repo={repo}", f"--kind={args.kind}",
         f"--batch_size={args.batch_size}", f"--max_tokens={args.max_tokens}", f"--batches={args.batches}",
         f"--warmup={args.warmup}", f"--cpus={args.cpus}", f"--clips={args.clips}"]
  cmd += [f"--{k}" if v is True else f"--{k}={v}" for k, v in extra.items()]
  if args.cpu_device:
    cmd.append("--cpu_device")
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  return json.loads(lines[-1]) if lines else None


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default="", help="prepared directory (default: a synthetic dataset of --kind)")
  p.add_argument("--kind", default="features", choices=sorted(GEOMETRY))
  p.add_argument("--clips", type=int, default=512, help="clips of the synthetic dataset")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--max_tokens", type=int, default=100)
  p.add_argument("--workers", default="0,1", help="prefetch worker counts (data.worker_count)")
  p.add_argument("--batches", type=int, default=20, help="timed batches")
  p.add_argument("--warmup", type=int, default=2, help="batches before the timing (worker start-up, file opening)")
  p.add_argument("--cpus", type=int, default=1, help="cores the measuring process (and its workers) may use")
  p.add_argument("--compare", default="", help="another checkout (e.g. a `git worktree` of an older commit)")
  p.add_argument("--cpu_device", action="store_true", help="force the CPU backend (JAX_PLATFORMS=cpu)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--repo", default=REPO, help=argparse.SUPPRESS)
  p.add_argument("--workers_one", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    _child(args)
    return

  repos = [("this checkout", REPO)] + ([("compared", os.path.abspath(args.compare))] if args.compare else [])
  tmp = tempfile.TemporaryDirectory()
  print(f"kind={args.data or args.kind} batch={args.batch_size} max_tokens={args.max_tokens} cpus={args.cpus} "
        f"(of {os.cpu_count()}) batches={args.batches}")
  for label, repo in repos:
    print(f"  {label}: {repo} ({_commit(repo)})")
  print(f"{'code':>14} {'workers':>7} {'warm-up s':>9} {'clips/s':>8} {'per core':>8} {'stored scale':>12}")
  rows = {}
  for label, repo in repos:
    data = args.data
    if not data:
      data = os.path.join(tmp.name, label.replace(" ", "_"))
      _run_child(repo, args, data=data, write=True)
    for w in [int(x) for x in args.workers.split(",")]:
      r = _run_child(repo, args, data=os.path.abspath(data), workers_one=w)
      rows[label, w] = r["clips_per_s"]
      print(f"{label:>14} {w:>7} {r['warmup_s']:>9.2f} {r['clips_per_s']:>8.0f} "
            f"{r['clips_per_s'] / max(args.cpus, 1):>8.0f} {str(r['stored_scale']):>12}", flush=True)
  if args.compare:
    for w in [int(x) for x in args.workers.split(",")]:
      print(f"ratio this / compared, {w} workers: {rows['this checkout', w] / rows['compared', w]:.2f}x")
  tmp.cleanup()


def _commit(repo: str) -> str:
  proc = subprocess.run(["git", "-C", repo, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
  return proc.stdout.strip()[:60] or "not a git checkout"


if __name__ == "__main__":
  main()
