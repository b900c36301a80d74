r"""Prepares a dataset directory (docs/data_format.md) from media files or precomputed features.

  python -m data.prepare --input=<dir or glob> --output=<dir> [--dataset=auto|crema_d|grid|voxceleb2|msp_improv|generic]
      [--kind=raw|features] [--workers=N] [--strict] [--shard_size=256] [--stop_after=N] ...

Inputs are processed in sorted order of their path relative to the input root. Shard s holds the successful clips
among inputs [s * shard_size, (s + 1) * shard_size), so the shard layout is fixed before any clip is processed.
Progress lives in `<output>/work/`: one JSON per finished clip (its manifest entry and statistics sums) and its
encoded record until the clip's shard is written. A shard is written (atomically) as soon as all its clips are
finished and is never touched again; an interrupted run re-run with the same arguments skips finished clips and
shards and produces byte-identical shards. When every shard is written, manifest.jsonl and dataset_info.json are
written and `work/` is removed. Re-running on a finished directory with the same inputs and parameters does
nothing; with different ones it fails (choose a new --output).

Skipped clips (manifest status "skipped") are listed with their reasons at the end. Audio-only files are skipped
with the reason "no video stream (audio-only file)"; an audio-only file with the clip id of a video file (MSP-IMPROV's
Audio/ tree, CREMA-D's AudioWAV next to VideoFlash) is skipped without being decoded. With --strict, an
unreadable/corrupt/truncated file or a file name that does not follow its dataset's convention stops the run with
an error naming the file.

Exit status: 0 when the preparation finished with at least one clip (or stopped by --stop_after); 1 on errors and
when it finished without writing any clip (the summary lists why); 130 after Ctrl-C, with one line on stderr giving
the progress and the command that resumes the run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import sys
from typing import Any, Sequence

import numpy as np
import threadpoolctl

from avt_jax import records
from data import datasets as datasets_lib
from data import extract as extract_lib
from data import features as features_lib
from data import face as face_lib
from data import logmel as logmel_lib
from data import media as media_lib

PREPARE_VERSION = 1
WORK_DIR = "work"
SHARD_DIR = "shards"
MANIFEST = "manifest.jsonl"
PLAN = "plan.json"

# Skip categories: "expected" skips are part of normal operation (audio-only inputs, clips shorter than the
# minimum, no usable face); "error" skips are bad inputs (unreadable, corrupt or truncated files, bad names,
# malformed feature files) and stop the run under --strict.
EXPECTED, ERROR = "expected", "error"


class PrepareError(RuntimeError):
  """The preparation cannot proceed (bad arguments, an output directory from other inputs, --strict failures)."""


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  input: str
  output: str
  dataset: str = "auto"
  kind: str = "raw"  # raw: media files -> log-mel + face crops; features: <stem>.npy + <stem>.csv pairs
  workers: int = 1
  strict: bool = False
  shard_size: int = 256  # input clips per shard
  shard_prefix: str = "clips"
  msp_labels: str = ""  # MSP-IMPROV label file (default: Evalution.txt or Evaluation.txt in the input root)
  ratings: str = ""  # CSV clip_id,arousal,valence[,dominance]: continuous targets that override the dataset's
  stop_after: int = 0  # >0: process at most this many clips, then stop as if interrupted (re-run to continue)
  config: extract_lib.ExtractConfig = extract_lib.ExtractConfig()
  progress: bool = True


@dataclasses.dataclass(frozen=True)
class Task:
  index: int
  relpaths: tuple[str, ...]  # raw: (media,), features: (npy, csv); relative to the input root
  paths: tuple[str, ...]
  meta: datasets_lib.ClipMeta | None
  skip_reason: str = ""  # decided while planning (bad name, duplicate id, unpaired feature file)
  skip_category: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Inputs and plan.
# ----------------------------------------------------------------------------------------------------------------

def _has_magic(s: str) -> bool:
  return any(c in s for c in "*?[")


def list_inputs(pattern: str, suffixes: Sequence[str]) -> tuple[str, list[str]]:
  """(root, sorted relative paths) of files under a directory or matching a glob, filtered by suffix."""
  if _has_magic(pattern):
    static = []
    for part in pattern.split(os.sep):
      if _has_magic(part):
        break
      static.append(part)
    root = os.sep.join(static) or "."
    files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  elif os.path.isdir(pattern):
    root = pattern
    files = [os.path.join(d, f) for d, _, fs in os.walk(pattern) for f in fs]
  elif os.path.isfile(pattern):
    root, files = os.path.dirname(pattern) or ".", [pattern]
  else:
    raise PrepareError(f"--input={pattern!r} is neither a directory, a file nor a glob matching files")
  rel = sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in files
               if p.lower().endswith(tuple(suffixes)))
  if not rel:
    raise PrepareError(f"--input={pattern!r} contains no files ending in {', '.join(suffixes)}")
  return os.path.abspath(root), rel


def _msp_labels(options: PrepareOptions, root: str) -> tuple[dict | None, str, str]:
  """(labels, label file, note) for MSP-IMPROV; (None, "", "") when no labels apply."""
  if not (options.msp_labels or options.dataset in ("msp_improv", "auto")):
    return None, "", ""
  try:
    return datasets_lib.load_msp_improv_labels(root, options.msp_labels)
  except datasets_lib.MissingLabelFileError as e:
    if options.dataset == "auto" and not options.msp_labels:  # an auto input need not be MSP-IMPROV
      return None, "", ""
    raise PrepareError(f"--msp_labels: {e}" if options.msp_labels else f"{e} (or pass --msp_labels)") from None
  except datasets_lib.LabelError as e:
    raise PrepareError(str(e)) from None


def _is_audio_only_name(relpath: str) -> bool:
  return relpath.lower().endswith(media_lib.AUDIO_SUFFIXES)


def plan_tasks(options: PrepareOptions) -> tuple[str, list[Task], list[str]]:
  """Sorted, deterministic task list (labels resolved, duplicates and unpaired files marked as skips), and notes
  for the summary (which label file was used)."""
  if options.kind == "raw":
    root, rel = list_inputs(options.input, media_lib.MEDIA_SUFFIXES)
    groups = [(r,) for r in rel]
  elif options.kind == "features":
    root, rel = list_inputs(options.input, (".npy", ".csv"))
    groups = _pair_features(rel)
  else:
    raise PrepareError(f"--kind must be raw or features, got {options.kind!r}")
  msp, label_file, note = _msp_labels(options, root)
  notes = [f"MSP-IMPROV labels: {label_file}"] if label_file else []
  notes += [note] if note else []
  resolver = datasets_lib.Resolver(options.dataset, msp, label_file)
  ratings = datasets_lib.read_ratings_csv(options.ratings) if options.ratings else {}
  tasks: list[Task | None] = [None] * len(groups)
  metas = {}
  for i, group in enumerate(groups):
    paths = tuple(os.path.join(root, r) if r else "" for r in group)
    if options.kind == "features" and not all(group):
      have = [r for r in group if r][0]
      missing = ".csv (OpenFace)" if not group[1] else ".npy (audio features)"
      tasks[i] = Task(i, group, paths, None, f"no matching {missing} file for {have}", ERROR)
      continue
    try:
      meta = resolver(group[0])
    except datasets_lib.LabelError as e:
      tasks[i] = Task(i, group, paths, None, str(e), ERROR)
      continue
    if options.kind == "features" and meta.dataset == "generic":
      meta = dataclasses.replace(meta, clip_id=os.path.splitext(os.path.basename(group[0]))[0])
    metas[i] = (paths, meta)
  # Clip ids are claimed by video files first: a separate audio track with its video's id is not a duplicate.
  audio_only = {i for i in metas if options.kind == "raw" and _is_audio_only_name(groups[i][0])}
  seen = {}
  for i in sorted(metas, key=lambda i: (i in audio_only, i)):
    (paths, meta), group = metas[i], groups[i]
    other = seen.get(meta.clip_id)
    if other is not None and i in audio_only and other[1]:
      tasks[i] = Task(i, group, paths, meta, f"audio-only file with the clip_id of the video {other[0]} "
                                             f"(the clip is prepared from the video)", EXPECTED)
      continue
    if other is not None:
      tasks[i] = Task(i, group, paths, meta, f"duplicate clip_id {meta.clip_id!r} (also {other[0]})", ERROR)
      continue
    seen[meta.clip_id] = (group[0], i not in audio_only)
    if meta.clip_id in ratings:
      meta = dataclasses.replace(meta, targets=ratings[meta.clip_id])
    tasks[i] = Task(i, group, paths, meta)
  unknown = sorted(set(ratings) - set(seen))
  if unknown:
    raise PrepareError(f"--ratings={options.ratings!r} rates clips that are not among the inputs: {unknown[:10]}")
  return root, tasks, notes


def _pair_features(rel: list[str]) -> list[tuple[str, str]]:
  by_stem: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: {".npy": [], ".csv": []})
  for r in rel:
    stem, suffix = os.path.splitext(os.path.basename(r))
    by_stem[stem][suffix.lower()].append(r)
  groups = []
  for stem in sorted(by_stem):
    npys, csvs = by_stem[stem][".npy"], by_stem[stem][".csv"]
    if len(npys) > 1 or len(csvs) > 1:
      raise PrepareError(f"feature stem {stem!r} is ambiguous: {npys + csvs}; stems must be unique")
    groups.append((npys[0] if npys else "", csvs[0] if csvs else ""))
  return groups


def _plan_record(options: PrepareOptions, tasks: list[Task]) -> dict[str, Any]:
  inputs = [[list(t.relpaths), [os.path.getsize(p) if p else -1 for p in t.paths]] for t in tasks]
  plan = dict(version=PREPARE_VERSION, kind=options.kind, dataset=options.dataset, shard_size=options.shard_size,
              shard_prefix=options.shard_prefix, config=options.config.to_dict(), inputs=inputs)
  if options.ratings:  # Kept out of the digest when unused, so earlier outputs stay valid.
    plan["ratings"] = [[t.meta.clip_id, list(t.meta.targets)] for t in tasks if t.meta is not None
                       and not all(math.isnan(x) for x in t.meta.targets)]
  plan["digest"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
  return plan


# ----------------------------------------------------------------------------------------------------------------
# One clip (runs in worker processes).
# ----------------------------------------------------------------------------------------------------------------

def extractor_info(kind: str, config: extract_lib.ExtractConfig) -> dict[str, Any]:
  if kind == "features":
    return dict(prepare_version=PREPARE_VERSION, audio="npy features (as stored)",
                visual=f"OpenFace CSV, AU intensities {list(features_lib.AU_COLUMNS)}, nearest row to token centre",
                token_rate=config.token_rate)
  return dict(prepare_version=PREPARE_VERSION, decoder=media_lib.libav_versions(),
              decode_max_short_side=config.max_short_side,
              audio_resampler="scipy.signal.resample_poly (mono mean downmix, clip to [-1, 1])",
              logmel=config.logmel.to_dict(), face=config.face.to_dict(), token_rate=config.token_rate,
              fps=config.fps, video_resampling="nearest timestamp", min_tokens=config.min_tokens)


def _load_entry(work: str, index: int) -> dict:
  path = _entry_path(work, index, ".json")
  try:
    return records.read_json(path, what="work entry")
  except records.RecordError as e:
    raise PrepareError(f"{e} (delete it to redo input {index})") from None


def _read_record(path: str) -> dict:
  with open(path, "rb") as f:
    return records.decode(f.read(), path)


def _entry_path(work: str, index: int, suffix: str) -> str:
  return os.path.join(work, f"{index:07d}{suffix}")


def process_task(task: Task, kind: str, config: extract_lib.ExtractConfig, work: str, strict: bool) -> dict:
  """Extracts one clip, writes its work files (unless it fails under --strict) and returns its manifest entry."""
  entry: dict[str, Any] = dict(index=task.index, clip_id=task.meta.clip_id if task.meta else "", status="ok",
                               reason="", category="")
  if task.meta:
    entry.update(task.meta.to_json())
  entry["source"] = task.relpaths[0] if kind == "raw" else list(task.relpaths)
  if kind == "raw" or all(task.paths):
    digests = [records.file_sha256(p) for p in task.paths if p]
    entry["sha256"] = digests[0] if kind == "raw" else digests
  entry["extractors"] = extractor_info(kind, config)
  record = None
  if task.skip_reason:
    entry.update(status="skipped", reason=task.skip_reason, category=task.skip_category)
  else:
    try:
      if kind == "raw":
        clip = extract_lib.extract_raw(task.paths[0], config)
        stats = extract_lib.clip_statistics(clip.audio, clip.visual, config.video_frames_per_token,
                                            config.target_size)
      else:
        clip = features_lib.extract_features(task.paths[0], task.paths[1], config.token_rate, config.min_tokens)
        stats = extract_lib.clip_statistics(clip.audio, clip.visual)
      entry.update(clip.info)
      entry["_stats"] = stats
      m = task.meta
      record = dict(clip_id=m.clip_id, dataset=m.dataset, speaker=m.speaker, session=m.session,
                    label=np.int32(m.label), targets=np.asarray(m.targets, np.float32),
                    num_tokens=np.int32(clip.num_tokens), audio=clip.audio, visual=clip.visual)
    except media_lib.ClipError as e:
      expected = isinstance(e, (media_lib.NoVideoStreamError, extract_lib.TooShortError, face_lib.NoFaceError))
      entry.update(status="skipped", reason=e.reason, category=EXPECTED if expected else ERROR)
    except Exception as e:  # pylint: disable=broad-except
      # Anything else a damaged input can trigger deep inside a decoder or OpenCV: reported, not fatal.
      entry.update(status="skipped", reason=f"unexpected {type(e).__name__} while extracting: {e}", category=ERROR)
  if strict and entry["category"] == ERROR:
    return entry
  if record is not None:
    records.write_atomic(_entry_path(work, task.index, ".rec"), records.encode(record))
  records.write_atomic(_entry_path(work, task.index, ".json"), json.dumps(entry, sort_keys=True).encode())
  return entry


def _worker_init() -> None:
  # Ctrl-C reaches every process of the terminal's process group: the parent alone reports it and terminates the
  # pool, so workers ignore SIGINT (from process start on, see _sigint_ignored) instead of printing tracebacks.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  import cv2  # one OpenCV and one BLAS thread per worker process: the pool provides the parallelism
  cv2.setNumThreads(1)
  threadpoolctl.threadpool_limits(1, user_api="blas")


@contextlib.contextmanager
def _sigint_ignored():
  """Ignores SIGINT while worker processes start: they inherit that through exec, so it covers their imports."""
  try:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
  except ValueError:  # not the main thread: signals are not ours to change
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, old)


def _run_task(args) -> dict:
  return process_task(*args)


# ----------------------------------------------------------------------------------------------------------------
# Shards, manifest, dataset_info.
# ----------------------------------------------------------------------------------------------------------------

class _Writer:
  """Writes shards in order once all their clips are finished; finalises manifest and dataset_info."""

  def __init__(self, options: PrepareOptions, tasks: list[Task], work: str):
    self.options, self.tasks, self.work = options, tasks, work
    self.num_shards = max(1, math.ceil(len(tasks) / options.shard_size))
    self.next_shard = 0
    self.dims: tuple[int, int] | None = None  # features kind: widths of the first successful clip

  def shard_name(self, s: int) -> str:
    return f"{SHARD_DIR}/{self.options.shard_prefix}-{s:05d}-of-{self.num_shards:05d}.array_record"

  def shard_tasks(self, s: int) -> list[Task]:
    size = self.options.shard_size
    return self.tasks[s * size:(s + 1) * size]

  def load_entry(self, index: int) -> dict:
    return _load_entry(self.work, index)

  def flush(self) -> None:
    while self.next_shard < self.num_shards:
      s = self.next_shard
      tasks = self.shard_tasks(s)
      path = os.path.join(self.options.output, self.shard_name(s))
      if not all(os.path.exists(_entry_path(self.work, t.index, ".json")) for t in tasks):
        return
      entries = [self.load_entry(t.index) for t in tasks]
      # A shard whose inputs were all skipped gets no file, only a marker in work/.
      empty_marker = os.path.join(self.work, f"shard-{s:05d}.empty")
      if not os.path.exists(path) and not os.path.exists(empty_marker):
        self._check_dims(entries)
        if any(e["status"] == "ok" for e in entries):
          records.write_shard(path, (_read_record(_entry_path(self.work, e["index"], ".rec"))
                                     for e in entries if e["status"] == "ok"))
        else:
          records.write_atomic(empty_marker, b"")
      else:
        self._note_dims(entries)
      for t in tasks:
        rec = _entry_path(self.work, t.index, ".rec")
        if os.path.exists(rec):
          os.remove(rec)
      self.next_shard += 1

  def _note_dims(self, entries: list[dict]) -> None:
    for e in entries:
      if self.dims is None and e["status"] == "ok" and "audio_dim" in e:
        self.dims = (e["audio_dim"], e["visual_dim"])

  def _check_dims(self, entries: list[dict]) -> None:
    if self.options.kind != "features":
      return
    for e in entries:
      if e["status"] != "ok":
        continue
      dims = (e["audio_dim"], e["visual_dim"])
      if self.dims is None:
        self.dims = dims
      elif dims != self.dims:
        e.update(status="skipped", category=ERROR, reason=f"feature widths (audio, visual) = {dims} differ from "
                                                          f"{self.dims} of the first clip")
        e.pop("_stats", None)
        records.write_atomic(_entry_path(self.work, e["index"], ".json"), json.dumps(e, sort_keys=True).encode())
        os.remove(_entry_path(self.work, e["index"], ".rec"))

  def finalise(self, plan: dict) -> dict:
    entries = [self.load_entry(t.index) for t in self.tasks]
    ok = [e for e in entries if e["status"] == "ok"]
    stats = [e.pop("_stats") for e in ok]
    for e in entries:
      e.pop("_stats", None)
    lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
    records.write_atomic(os.path.join(self.options.output, MANIFEST), lines.encode())
    shards = [self.shard_name(s) for s in range(self.num_shards)
              if any(e["status"] == "ok" for e in entries[s * self.options.shard_size:
                                                           (s + 1) * self.options.shard_size])]
    info = self._dataset_info(ok, stats, shards, entries, plan)
    records.write_atomic(os.path.join(self.options.output, records.DATASET_INFO),
                  (json.dumps(info, indent=1, sort_keys=False) + "\n").encode())
    return info

  def _dataset_info(self, ok, stats, shards, entries, plan) -> dict:
    info = dataset_info(self.options.kind, self.options.config, extract_lib.merge_statistics(stats), self.dims)
    skipped = collections.Counter(e["reason"] for e in entries if e["status"] != "ok")
    info.update(num_tokens=int(sum(e["num_tokens"] for e in ok)), shards=shards,
                datasets=dict(sorted(collections.Counter(e["dataset"] for e in ok).items())),
                num_skipped=sum(skipped.values()), skipped_reasons=dict(sorted(skipped.items())),
                extractors=extractor_info(self.options.kind, self.options.config), plan_digest=plan["digest"])
    return info


def dataset_info(kind: str, c: extract_lib.ExtractConfig, merged: dict[str, Any],
                 dims: tuple[int, int] | None = None) -> dict[str, Any]:
  """The kind/grid/statistics part of dataset_info.json from merged clip statistics (also used by TFDS builds)."""
  a_mean, a_std, _ = extract_lib.mean_std(merged, "audio")
  v_mean, v_std, _ = extract_lib.mean_std(merged, "visual")
  r = lambda x: [round(float(v), 6) for v in x]
  if kind == "raw":
    lm = c.logmel
    audio = dict(type="logmel", frames_per_token=c.audio_frames_per_token, dim=lm.n_mels,
                 sample_rate=lm.sample_rate, n_fft=lm.n_fft, win_length=lm.win_length, hop_length=lm.hop_length,
                 n_mels=lm.n_mels, fmin=lm.fmin, fmax=lm.fmax, mel_scale="slaney", log_offset=logmel_lib.LOG_OFFSET,
                 mean=r(a_mean), std=r(a_std))
    visual = dict(type="face", frames_per_token=c.video_frames_per_token, fps=c.fps, size=c.face.size, channels=3,
                  target_size=c.target_size,
                  target_mean=round(float(v_mean[0]), 6) if v_mean.size else 0.0,
                  target_std=round(float(v_std[0]), 6) if v_std.size else 1.0,
                  target="mean over the token's frames of BT.601 luma of RGB/255, block-averaged to "
                         "target_size x target_size")
  else:
    da, dv = dims or (0, 0)
    audio = dict(type="features", frames_per_token=1, dim=da, source="npy", mean=r(a_mean), std=r(a_std))
    visual = dict(type="features", frames_per_token=1, dim=dv, source="openface_au_r",
                  columns=list(features_lib.AU_COLUMNS), mean=r(v_mean), std=r(v_std))
  return dict(kind=kind, token_rate=c.token_rate, audio=audio, visual=visual,
              num_clips=int(merged.get("clip_count", 0)))


# ----------------------------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------------------------

def prepare(options: PrepareOptions) -> dict[str, Any]:
  """Runs (or resumes) a preparation. Returns a summary: done, ok, skipped entries, shards, output."""
  if options.shard_size < 1:
    raise PrepareError(f"--shard_size must be >= 1, got {options.shard_size}")
  import cv2
  cv2.setNumThreads(1)
  _, tasks, notes = plan_tasks(options)
  plan = _plan_record(options, tasks)
  out = options.output
  work = os.path.join(out, WORK_DIR)
  info_path = os.path.join(out, records.DATASET_INFO)
  if os.path.exists(info_path):
    info = _read_state(info_path, records.DATASET_INFO)
    if info.get("plan_digest") != plan["digest"]:
      raise PrepareError(f"{out} already holds a prepared dataset made from other inputs or parameters; "
                         f"choose a new --output")
    shutil.rmtree(work, ignore_errors=True)
    return _summary(out, info, done=True, note="already complete; nothing to do", notes=notes)
  os.makedirs(os.path.join(out, SHARD_DIR), exist_ok=True)
  os.makedirs(work, exist_ok=True)
  plan_path = os.path.join(work, PLAN)
  if os.path.exists(plan_path):
    old = _read_state(plan_path, "preparation plan")
    if old.get("digest") != plan["digest"]:
      raise PrepareError(f"{out} holds an unfinished preparation of other inputs or parameters "
                         f"({plan_path}); re-run it with its original arguments or choose a new --output")
  elif os.listdir(os.path.join(out, SHARD_DIR)):
    raise PrepareError(f"{out}/{SHARD_DIR} already has files but no preparation record; choose a new --output")
  else:
    records.write_atomic(plan_path, json.dumps(plan, sort_keys=True).encode())

  writer = _Writer(options, tasks, work)
  writer.flush()
  done_shards = set(range(writer.next_shard))
  pending = [t for t in tasks if t.index // options.shard_size not in done_shards
             and not os.path.exists(_entry_path(work, t.index, ".json"))]
  stopped = bool(options.stop_after) and len(pending) > options.stop_after
  if options.stop_after:
    pending = pending[:options.stop_after]
  args = [(t, options.kind, options.config, work, options.strict) for t in pending]
  _run_all(args, options, writer)
  writer.flush()
  if stopped or writer.next_shard < writer.num_shards:
    return dict(done=False, output=out, processed=len(pending), shards_written=writer.next_shard,
                note=f"stopped after {len(pending)} clips (--stop_after); re-run the same command to continue",
                notes=notes)
  info = writer.finalise(plan)
  shutil.rmtree(work, ignore_errors=True)
  return _summary(out, info, done=True, note=f"processed {len(pending)} clips", notes=notes)


def _read_state(path: str, what: str) -> Any:
  """A JSON state file of the output directory; a malformed one is an error naming its path and line."""
  try:
    return records.read_json(path, what=what, object_only=True)
  except records.RecordError as e:
    raise PrepareError(str(e)) from None


def _run_all(args: list, options: PrepareOptions, writer: _Writer) -> None:
  try:
    from tqdm import tqdm
  except ImportError:  # progress bar is optional
    tqdm = None
  bar = tqdm(total=len(args), unit="clip", disable=not options.progress, file=sys.stderr) if tqdm else None

  def handle(entry: dict) -> None:
    if bar:
      bar.update(1)
    if options.strict and entry["category"] == ERROR:
      src = entry["source"] if isinstance(entry["source"], str) else entry["source"][-1]
      raise PrepareError(f"--strict: {src}: {entry['reason']}")
    writer.flush()

  try:
    if options.workers <= 1 or len(args) <= 1:
      # OpenBLAS's idle threads spin after each log-mel product and take the core from decoding and detection.
      with threadpoolctl.threadpool_limits(1, user_api="blas"):
        for a in args:
          handle(_run_task(a))
    else:
      ctx = multiprocessing.get_context("spawn")
      with _sigint_ignored():
        pool = ctx.Pool(min(options.workers, len(args)), initializer=_worker_init)
      with pool:  # on any exception, KeyboardInterrupt included, the workers are terminated
        for entry in pool.imap(_run_task, args, chunksize=1):
          handle(entry)
  finally:
    if bar:
      bar.close()


def _summary(out: str, info: dict, done: bool, note: str, notes: Sequence[str] = ()) -> dict[str, Any]:
  entries = []
  manifest = os.path.join(out, MANIFEST)
  if os.path.exists(manifest):
    try:
      entries = records.read_jsonl(manifest, what="manifest")
    except records.RecordError as e:
      raise PrepareError(str(e)) from None
  skipped = []
  for n, e in enumerate(entries, 1):
    if not isinstance(e, dict) or not {"source", "status", "reason"} <= set(e):
      raise PrepareError(f"{manifest}: entry {n} is not a manifest entry (expected an object with source, status "
                         f"and reason)")
    if e["status"] != "ok":
      skipped.append((e["source"], e["reason"]))
  return dict(done=done, output=out, ok=info.get("num_clips", 0), skipped=skipped, shards=info.get("shards", []),
              note=note, notes=list(notes))


def format_summary(summary: dict[str, Any]) -> str:
  lines = [f"{summary['output']}: {summary['note']}"] + [f"  note: {n}" for n in summary.get("notes", [])]
  if not summary["done"]:
    return "\n".join(lines)
  lines.append(f"{summary['ok']} clips written to {len(summary['shards'])} shard(s); "
               f"{len(summary['skipped'])} skipped")
  by_reason = collections.defaultdict(list)
  for src, reason in summary["skipped"]:
    by_reason[reason].append(src if isinstance(src, str) else "+".join(s for s in src if s))
  for reason, srcs in sorted(by_reason.items()):
    lines.append(f"  skipped {len(srcs)}: {reason}")
    lines.extend(f"    {s}" for s in srcs)
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------

def _define_flags():
  from absl import flags
  f = flags
  f.DEFINE_string("input", None, "Directory (searched recursively) or glob of media files (or, with "
                  "--kind=features, of <stem>.npy + <stem>.csv pairs).")
  f.DEFINE_string("output", None, "Output directory.")
  f.DEFINE_enum("dataset", "auto", list(datasets_lib.DATASETS), "Naming convention for ids, speakers and labels.")
  f.DEFINE_enum("kind", "raw", ["raw", "features"], "raw: media -> log-mel + face crops; features: npy + OpenFace.")
  f.DEFINE_integer("workers", 1, "Worker processes.")
  f.DEFINE_bool("strict", False, "Stop on unreadable/corrupt/truncated files and bad file names.")
  f.DEFINE_integer("shard_size", 256, "Input clips per shard.")
  f.DEFINE_string("shard_prefix", "clips", "Shard file name prefix (e.g. train).")
  f.DEFINE_string("msp_labels", "", "MSP-IMPROV Evaluation.txt (default <input root>/Evaluation.txt).")
  f.DEFINE_string("ratings", "", "CSV with a clip_id column and arousal / valence / dominance columns: continuous "
                  "targets for those clips (overriding the dataset's own).")
  f.DEFINE_integer("stop_after", 0, "Process at most this many clips, then stop (re-run to continue).")
  f.DEFINE_float("token_rate", 5.0, "Tokens per second.")
  f.DEFINE_float("fps", 25.0, "Video frame rate after resampling.")
  f.DEFINE_integer("min_tokens", 1, "Skip clips with fewer tokens.")
  f.DEFINE_integer("face_size", 64, "Face crop side S.")
  f.DEFINE_enum("face", "track", list(face_lib.MODES), "track: detect and follow the face; centred: the videos are "
                "face-centred crops already (VoxCeleb2's mp4s), used as they are after a check for a face.")
  f.DEFINE_enum("detector", face_lib.FaceConfig.detector, list(face_lib.DETECTORS), "Face detector.")
  f.DEFINE_integer("detect_every", face_lib.FaceConfig.detect_every,
                   "Run the face detector on every k-th frame (the tracker fills the frames in between).")
  f.DEFINE_float("min_face_rate", 0.25, "Skip clips with a face in fewer of the detection frames.")
  f.DEFINE_float("face_margin", 0.3, "Crop side = detected face side * (1 + margin).")
  f.DEFINE_integer("target_size", 8, "Grayscale reconstruction-target side (statistics).")
  f.DEFINE_integer("n_mels", 80, "Mel bins.")
  f.DEFINE_integer("max_short_side", 480, "Scale larger videos down to this short side while decoding (0: never).")
  f.DEFINE_bool("progress", True, "Show a progress bar.")
  return flags.FLAGS


def options_from_flags(FLAGS) -> PrepareOptions:
  if not FLAGS.input or not FLAGS.output:
    raise PrepareError("--input and --output are required")
  config = extract_lib.ExtractConfig(
      token_rate=FLAGS.token_rate, fps=FLAGS.fps, min_tokens=FLAGS.min_tokens, target_size=FLAGS.target_size,
      max_short_side=FLAGS.max_short_side, logmel=logmel_lib.LogMelConfig(n_mels=FLAGS.n_mels),
      face=face_lib.FaceConfig(size=FLAGS.face_size, mode=FLAGS.face, detector=FLAGS.detector,
                               detect_every=FLAGS.detect_every,
                               min_detection_rate=FLAGS.min_face_rate, margin=FLAGS.face_margin))
  return PrepareOptions(input=FLAGS.input, output=FLAGS.output, dataset=FLAGS.dataset, kind=FLAGS.kind,
                        workers=FLAGS.workers, strict=FLAGS.strict, shard_size=FLAGS.shard_size,
                        shard_prefix=FLAGS.shard_prefix, msp_labels=FLAGS.msp_labels, ratings=FLAGS.ratings,
                        stop_after=FLAGS.stop_after,
                        config=config, progress=FLAGS.progress)


def resume_command() -> str:
  """The command line of this process, quoted for a POSIX shell (re-running it resumes the preparation)."""
  argv = getattr(sys, "orig_argv", None) or [sys.executable, "-m", "data.prepare"] + sys.argv[1:]
  return shlex.join(argv)


def progress_counts(output: str) -> tuple[int, int | None]:
  """(finished inputs, all inputs or None when unknown) of an unfinished preparation in `output`."""
  work = os.path.join(output, WORK_DIR)
  try:
    done = sum(1 for name in os.listdir(work) if re.fullmatch(r"\d{7,}\.json", name))
  except OSError:
    return 0, None
  try:
    total = len(records.read_json(os.path.join(work, PLAN), what="preparation plan")["inputs"])
  except (records.RecordError, KeyError, TypeError):
    total = None
  return done, total


def interrupted_message(output: str) -> str:
  """The single line printed after Ctrl-C: progress so far and the command that resumes the run."""
  if not output:
    return f"interrupted before any clip was done; start again with: {resume_command()}"
  if os.path.exists(os.path.join(output, records.DATASET_INFO)):
    return f"interrupted: {output} is complete; re-running {resume_command()} only tidies up"
  done, total = progress_counts(output)
  of = f" of {total}" if total is not None else ""
  return (f"interrupted: {done}{of} clips done (progress kept in {os.path.join(output, WORK_DIR)}); "
          f"resume with: {resume_command()}")


def main(argv: Sequence[str]) -> int:
  from absl import flags
  if len(argv) > 1:
    raise PrepareError(f"unexpected arguments {argv[1:]}")
  try:
    summary = prepare(options_from_flags(flags.FLAGS))
  except (PrepareError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return _report_interrupt(flags.FLAGS.output or "")
  print(format_summary(summary))
  if summary["done"] and not summary["ok"]:
    print(f"error: no clip could be written to {summary['output']}: all {len(summary['skipped'])} inputs were "
          f"skipped (reasons above)", file=sys.stderr)
    return 1
  return 0


def _report_interrupt(output: str) -> int:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while reporting must not end in a traceback
  print(interrupted_message(output), file=sys.stderr, flush=True)
  return 130


if __name__ == "__main__":
  from absl import app
  _define_flags()
  try:
    app.run(main)
  except KeyboardInterrupt:  # before main (flag parsing, absl start-up)
    sys.exit(_report_interrupt(""))
