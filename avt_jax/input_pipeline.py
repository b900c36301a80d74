"""Grain input pipeline: prepared clip records -> fixed-shape numpy batches.

The record and batch formats are described in docs/data_format.md. The pipeline is built from the Grain Dataset
API so that its iterator can be checkpointed (`get_state` / `set_state`, or `grain.checkpoint.CheckpointSave`
inside an Orbax `CheckpointManager`):

  train: source(s) -> shuffle per epoch -> repeat -> [mix] -> crop start -> batch (assemble) -> process slice
         -> to_iter_dataset, or prefetch workers -> [batch_transform] -> [finish]
  eval:  source(s) -> [concatenate] -> process slice -> pad with weight-0 items -> batch (assemble)
         -> to_iter_dataset, or prefetch workers -> [batch_transform] -> [finish]

Assembling (`BatchAssembler`) slices each clip's window and copies it once into the batch arrays, at stored scale;
finishing (`BatchFinisher`: normalisation, reconstruction targets, zeroed padding) is pure array arithmetic that
runs here in numpy or, in training, inside the jitted step on the devices (`finish=False`).

Batching happens on the random-access (MapDataset) side, so a batch's content depends only on the seed, the
process index/count and the batch size, never on the number of prefetch workers.

A dataset spec names one or more sources. Accepted forms (see `parse_spec`):
  "/path/to/prepared"                      a directory written by `python -m data.prepare`
  "tfds:<name>/<split>"                    a TFDS dataset (then `data_dir` is given in the mapping form)
  {"path": ..., "weight": 1.0, "split": "train", "clip_ids": [...], "exclude_clip_ids": [...],
   "where": {"speaker": [...]}, "where_not": {...}, "predicate": callable, "data_dir": ..., "info_dir": ...}
  a list of the above (a mixture for training, a concatenation for evaluation)
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

from flax import serialization
import grain
import msgpack
import numpy as np

from avt_jax import batch_workers, records, targets

MANIFEST = "manifest.jsonl"
TFDS_PREFIX = "tfds:"
BATCH_KEYS = ("audio", "visual", "mask", "audio_target", "visual_target", "label", "targets", "weight")
# Record fields read by the metadata pass (all small; the media arrays are skipped).
_META_FIELDS = ("clip_id", "dataset", "speaker", "session", "label", "num_tokens")
_STD_FLOOR = 1e-6


# --------------------------------------------------------------------------------------------------------------
# Dataset geometry and per-record checks.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Shapes of one clip on the token grid, read from dataset_info.json."""
  kind: str  # "raw" or "features"
  audio_frames: int  # Ka (1 for features)
  audio_dim: int  # Fa (n_mels) or Da
  visual_frames: int  # Kv (1 for features)
  visual_dim: int  # Dv for features, 0 for raw
  visual_size: int  # S for raw, 0 for features
  target_size: int  # g for raw, 0 for features

  @classmethod
  def from_info(cls, info: Mapping[str, Any], where: str = "dataset_info.json") -> "Geometry":
    try:
      kind = info["kind"]
      a, v = info["audio"], info["visual"]
      if kind == "raw":
        return cls(kind, int(a["frames_per_token"]), int(a["dim"]), int(v["frames_per_token"]), 0,
                   int(v["size"]), int(v["target_size"]))
      if kind == "features":
        return cls(kind, 1, int(a["dim"]), 1, int(v["dim"]), 0, 0)
    except (KeyError, TypeError) as e:
      raise records.RecordError(f"{where}: missing or malformed field {e} (see docs/data_format.md)") from e
    raise records.RecordError(f"{where}: kind is {kind!r}, expected 'raw' or 'features'")

  def check(self, ex: Mapping[str, Any], where: str) -> None:
    """Raises RecordError naming `where` and the field if `ex` does not fit this geometry."""
    t = int(np.asarray(ex["num_tokens"]))
    if t < 1:
      raise records.RecordError(f"{where}: record {ex['clip_id']!r} has num_tokens={t}, expected >= 1")
    if self.kind == "raw":
      expect = {"audio": ((t * self.audio_frames, self.audio_dim), np.float32),
                "visual": ((t * self.visual_frames, self.visual_size, self.visual_size, 3), np.uint8)}
    else:
      expect = {"audio": ((t, self.audio_dim), np.float32), "visual": ((t, self.visual_dim), np.float32)}
    expect["targets"] = ((3,), np.float32)
    for key, (shape, dtype) in expect.items():
      arr = ex[key]
      if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != dtype:
        got = f"{arr.dtype}{list(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise records.RecordError(f"{where}: record {ex['clip_id']!r} field {key!r} is {got}, expected "
                                  f"{np.dtype(dtype)}{list(shape)} ({self.kind} kind, num_tokens={t})")


def check_compatible(infos: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Geometry:
  """Returns the common geometry of several datasets; raises naming both datasets if they differ."""
  geoms = [Geometry.from_info(i, f"{n}/{records.DATASET_INFO}") for i, n in zip(infos, names)]
  for g, n in zip(geoms[1:], names[1:]):
    if g != geoms[0]:
      diff = [f"{f.name}: {getattr(geoms[0], f.name)} vs {getattr(g, f.name)}"
              for f in dataclasses.fields(Geometry) if getattr(geoms[0], f.name) != getattr(g, f.name)]
      raise ValueError(f"datasets {names[0]!r} and {n!r} cannot be mixed: {'; '.join(diff)}")
  return geoms[0]


# --------------------------------------------------------------------------------------------------------------
# Metadata (for filtering folds and splits without decoding media).
# --------------------------------------------------------------------------------------------------------------


def read_manifest(directory: str) -> list[dict[str, Any]]:
  """The rows of `directory`/manifest.jsonl ([] if there is none)."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return []
  return records.read_jsonl(path, what="manifest")


def _small_fields(data: bytes, where: str) -> dict[str, Any]:
  """The small fields of an encoded record, skipping the media arrays without decoding them."""
  row = {}
  try:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    for _ in range(unpacker.read_map_header()):
      key = unpacker.unpack()
      start = unpacker.tell()
      unpacker.skip()
      if key in _META_FIELDS:
        row[key] = serialization.msgpack_restore(data[start:unpacker.tell()])
  except Exception as e:  # msgpack raises several unrelated types on garbage.
    raise records.RecordError(f"{where}: record is not a valid msgpack clip record ({type(e).__name__}: {e})") from e
  missing = [k for k in _META_FIELDS if k not in row]
  if missing:
    raise records.RecordError(f"{where}: record {row.get('clip_id', '?')!r} lacks keys {missing}")
  row["label"] = int(row["label"])
  row["num_tokens"] = int(row["num_tokens"])
  return row


def _scan_shard(path: str) -> list[dict[str, Any]]:
  with records.shard_reader(path) as reader:
    return [_small_fields(reader.read(), f"{path}[{i}]") for i in range(reader.num_records())]


def _clip_id_at(path: str, position: int) -> str:
  with records.shard_reader(path) as reader:
    return _small_fields(reader.read([position])[0], f"{path}[{position}]")["clip_id"]


def read_metadata(directory: str, info: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
  """One dict per record of a prepared directory, in record order (shard by shard).

  Each row has `shard` (path as listed in dataset_info.json), `position` (of the record in the shard) and
  `clip_id`. `data.prepare` writes the `ok` clips of manifest.jsonl in manifest order, shard after shard: when
  the manifest has exactly one `ok` row per record and the clip ids of the first and last record of every shard
  agree with it, the rows are the manifest rows and no media is read. Otherwise the small record fields
  (clip_id, dataset, speaker, session, label, num_tokens) are read from every record, skipping the media arrays
  without decoding them, and merged with the clip's manifest row (record fields win).
  """
  info = info if info is not None else records.load_dataset_info(directory)
  paths = records.shard_paths(directory, info)
  names = list(info["shards"])
  counts = [records.num_records(p) for p in paths]
  manifest = [r for r in read_manifest(directory) if r.get("status", "ok") == "ok"]

  if len(manifest) == sum(counts) and all("clip_id" in r for r in manifest):
    rows, ends_agree = [], True
    for name, path, count in zip(names, paths, counts):
      part = manifest[len(rows):len(rows) + count]
      if count and not (_clip_id_at(path, 0) == part[0]["clip_id"] and
                        _clip_id_at(path, count - 1) == part[-1]["clip_id"]):
        ends_agree = False
        break
      rows.extend(dict(r, shard=name, position=i) for i, r in enumerate(part))
    if ends_agree:
      return rows

  by_id = {r["clip_id"]: r for r in manifest if "clip_id" in r}
  rows = []
  for name, path in zip(names, paths):
    for i, row in enumerate(_scan_shard(path)):
      rows.append({**by_id.get(row["clip_id"], {}), **row, "shard": name, "position": i})
  return rows


@dataclasses.dataclass(frozen=True)
class RecordFilter:
  """Which records of a source to keep; all given conditions must hold.

  clip_ids / exclude_clip_ids: lists of clip ids (ids absent from the data are ignored: they may have been
  skipped during preparation); where / where_not: {field: allowed / excluded values} on the metadata rows of
  `read_metadata` (values compared as strings, so {"speaker": [1001]} matches "1001"; values absent from the
  data are ignored, but a condition none of whose values occurs is an error); predicate: callable(row) -> bool. `split` names a list of clip ids in dataset_info.json
  "splits".
  """
  clip_ids: Sequence[str] | None = None
  exclude_clip_ids: Sequence[str] | None = None
  where: Mapping[str, Sequence[Any]] | None = None
  where_not: Mapping[str, Sequence[Any]] | None = None
  predicate: Callable[[Mapping[str, Any]], bool] | None = None
  split: str | None = None

  def active(self) -> bool:
    return any(v is not None for v in dataclasses.astuple(self))

  def keep(self, rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any], name: str) -> np.ndarray:
    """Indices (into `rows`) of the kept records."""
    ids = None if self.clip_ids is None else {str(c) for c in self.clip_ids}
    if self.split is not None:
      splits = info.get("splits") or {}
      if self.split not in splits:
        raise KeyError(f"{name}: split {self.split!r} not in dataset_info.json splits {sorted(splits)}")
      split_ids = {str(c) for c in splits[self.split]}
      ids = split_ids if ids is None else ids & split_ids
    drop = {str(c) for c in self.exclude_clip_ids or ()}
    where = {k: {str(v) for v in vs} for k, vs in (self.where or {}).items()}
    where_not = {k: {str(v) for v in vs} for k, vs in (self.where_not or {}).items()}
    for label, cond in (("where", where), ("where_not", where_not)):
      for k, vs in cond.items():
        if rows and k not in rows[0]:
          raise KeyError(f"{name}: filter field {k!r} is not in the record metadata {sorted(rows[0])}")
        present = {str(r.get(k)) for r in rows}
        if vs and not vs & present:  # none at all (some may be absent from a subset): a typo or a wrong field
          raise ValueError(f"{name}: none of the {label}[{k!r}] values {sorted(vs)[:10]} matches a record; present "
                           f"values include {sorted(present)[:10]}")
    kept = []
    for i, r in enumerate(rows):
      cid = str(r["clip_id"])
      if ids is not None and cid not in ids or cid in drop:
        continue
      if any(str(r.get(k)) not in vs for k, vs in where.items()):
        continue
      if any(str(r.get(k)) in vs for k, vs in where_not.items()):
        continue
      if self.predicate is not None and not self.predicate(r):
        continue
      kept.append(i)
    return np.asarray(kept, np.int64)


# --------------------------------------------------------------------------------------------------------------
# Data sources.
# --------------------------------------------------------------------------------------------------------------


class ClipSource:
  """Random access to the (optionally filtered) decoded clip records of one prepared directory.

  `source[i]` returns the record dict of docs/data_format.md; errors name the shard file and the position of
  the record in it. Filters are applied once, at construction (see `RecordFilter`); only the kept record
  indices are stored, so the source pickles cheaply for prefetch workers.
  """

  def __init__(self, directory: str, record_filter: RecordFilter | None = None, *, check: bool = True):
    self.name = directory
    self.info = records.load_dataset_info(directory)
    self.geometry = Geometry.from_info(self.info, os.path.join(directory, records.DATASET_INFO))
    self.paths = records.shard_paths(directory, self.info)
    counts = [records.num_records(p) for p in self.paths]
    if "num_clips" in self.info and int(self.info["num_clips"]) != sum(counts):
      raise records.RecordError(f"{directory}: dataset_info.json says num_clips={self.info['num_clips']} but the "
                                f"shards hold {sum(counts)} records ({dict(zip(self.info['shards'], counts))})")
    self._ends = list(np.cumsum(counts))
    self._reader = grain.sources.ArrayRecordDataSource(self.paths)
    media = records.MediaFiles()
    self._media_of = {p: media.beside(p) for p in self.paths}  # one resolver per shard, not one per record read
    self._check = check
    self._keep = None
    self.metadata_rows = None
    if record_filter is not None and record_filter.active():
      rows = read_metadata(directory, self.info)
      self._keep = record_filter.keep(rows, self.info, directory)
      self.metadata_rows = [rows[i] for i in self._keep]

  def __len__(self) -> int:
    return int(self._ends[-1]) if self._keep is None else len(self._keep)

  def locate(self, index: int) -> tuple[str, int]:
    """(shard path, position in shard) of the record at `index` of this source."""
    if not 0 <= index < len(self):
      raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
    g = int(index if self._keep is None else self._keep[index])
    k = bisect.bisect_right(self._ends, g)
    return self.paths[k], g - (int(self._ends[k - 1]) if k else 0)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    path, pos = self.locate(index)
    where = f"{path}[{pos}]"
    g = int(index if self._keep is None else self._keep[index])
    try:
      data = self._reader[g]
    except Exception as e:
      raise records.RecordError(f"{where}: cannot read record ({type(e).__name__}: {e})") from e
    ex = records.decode(data, where, self._media_of[path])
    if self._check:
      self.geometry.check(ex, where)
    return ex

  def __repr__(self) -> str:
    return f"ClipSource({self.name!r}, {len(self)} clips)"


def _as_str(x: Any) -> str:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode() if isinstance(x, bytes) else str(x)


class TfdsClipSource:
  """Adapter over `tfds.data_source(name, split=..., data_dir=...)` giving the same records as `ClipSource`.

  The TFDS features must carry the record keys of docs/data_format.md. The dataset_info dict comes from the
  builder metadata (`metadata["dataset_info"]`, dict or JSON string) or from `info_dir`/dataset_info.json.
  Filtering decodes every example once at construction (TFDS sources have no cheap metadata pass).
  """

  def __init__(self, spec: str, data_dir: str | None, record_filter: RecordFilter | None = None, *,
               info_dir: str | None = None, check: bool = True):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only when used)
    name, sep, split = spec[len(TFDS_PREFIX):].rpartition("/")
    if not sep or not name or not split:
      raise ValueError(f"dataset spec {spec!r}: expected 'tfds:<name>/<split>'")
    self.name = spec
    self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
    self.info = self._find_info(info_dir)
    self.geometry = Geometry.from_info(self.info, f"{spec} dataset_info")
    self._check = check
    self._keep = None
    self.metadata_rows = None
    if record_filter is not None and record_filter.active():
      rows = []
      for i in range(len(self._ds)):
        ex = self._convert(self._ds[i], i)
        rows.append({k: ex[k] for k in _META_FIELDS})
      self._keep = record_filter.keep(rows, self.info, spec)
      self.metadata_rows = [rows[i] for i in self._keep]

  def _find_info(self, info_dir: str | None) -> dict[str, Any]:
    if info_dir is not None:
      return records.load_dataset_info(info_dir)
    meta = getattr(self._ds.dataset_info, "metadata", None) or {}
    info = meta.get("dataset_info") if hasattr(meta, "get") else None
    if isinstance(info, str):
      info = json.loads(info)
    if not isinstance(info, Mapping):
      raise ValueError(f"{self.name}: the builder metadata has no 'dataset_info'; give 'info_dir' in the spec "
                       "(a directory holding dataset_info.json)")
    return dict(info)

  def _convert(self, raw: Mapping[str, Any], index: int) -> dict[str, Any]:
    where = f"{self.name}[{index}]"
    missing = [k for k in records.REQUIRED_KEYS if k not in raw]
    if missing:
      raise records.RecordError(f"{where}: example lacks keys {missing}")
    ex = dict(raw)
    for k in ("clip_id", "dataset", "speaker", "session"):
      ex[k] = _as_str(ex[k])
    ex["label"] = np.int32(ex["label"])
    ex["num_tokens"] = np.int32(ex["num_tokens"])
    for k in ("targets", "audio"):
      ex[k] = np.asarray(ex[k])
    ex["visual"] = np.asarray(ex["visual"])
    return ex

  def __len__(self) -> int:
    return len(self._ds) if self._keep is None else len(self._keep)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
    g = int(index if self._keep is None else self._keep[index])
    try:
      raw = self._ds[g]
    except Exception as e:
      raise records.RecordError(f"{self.name}[{g}]: cannot read example ({type(e).__name__}: {e})") from e
    ex = self._convert(raw, g)
    if self._check:
      self.geometry.check(ex, f"{self.name}[{g}]")
    return ex

  def __repr__(self) -> str:
    return f"TfdsClipSource({self.name!r}, {len(self)} clips)"


# --------------------------------------------------------------------------------------------------------------
# Dataset specs.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One entry of a dataset spec: where the clips are, which of them to keep, and the mixture weight."""
  path: str
  weight: float = 1.0
  data_dir: str | None = None  # TFDS data_dir for "tfds:<name>/<split>"
  info_dir: str | None = None  # TFDS only: directory with dataset_info.json if the builder metadata lacks it
  filter: RecordFilter = RecordFilter()

  def open(self, check: bool = True) -> ClipSource | TfdsClipSource:
    if self.path.startswith(TFDS_PREFIX):
      return TfdsClipSource(self.path, self.data_dir, self.filter, info_dir=self.info_dir, check=check)
    return ClipSource(self.path, self.filter, check=check)


_SPEC_KEYS = {"path", "weight", "data_dir", "info_dir"}
_FILTER_KEYS = {f.name for f in dataclasses.fields(RecordFilter)}


def parse_spec(spec: Any) -> list[SourceSpec]:
  """Normalises a dataset spec (string, mapping, SourceSpec, ConfigDict, or a list of those) to SourceSpecs."""
  if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict
    spec = spec.to_dict()
  if isinstance(spec, (str, os.PathLike)):
    return [SourceSpec(os.fspath(spec))]
  if isinstance(spec, SourceSpec):
    return [spec]
  if isinstance(spec, Mapping):
    unknown = set(spec) - _SPEC_KEYS - _FILTER_KEYS
    if "path" not in spec or unknown:
      raise ValueError(f"dataset spec {dict(spec)!r}: needs 'path'; unknown keys {sorted(unknown)}; allowed "
                       f"{sorted(_SPEC_KEYS | _FILTER_KEYS)}")
    flt = RecordFilter(**{k: spec[k] for k in _FILTER_KEYS if k in spec})
    return [SourceSpec(os.fspath(spec["path"]), float(spec.get("weight", 1.0)), spec.get("data_dir"),
                       spec.get("info_dir"), flt)]
  if isinstance(spec, Sequence) and spec:
    return [s for item in spec for s in parse_spec(item)]
  raise ValueError(f"dataset spec {spec!r}: expected a path, 'tfds:<name>/<split>', a mapping or a list of them")


def open_sources(spec: Any, check: bool = True) -> tuple[list[ClipSource | TfdsClipSource], Geometry]:
  """Opens every source of a spec and checks they can be mixed. Returns (sources, common geometry)."""
  sources = [s.open(check) for s in parse_spec(spec)]
  geometry = check_compatible([s.info for s in sources], [s.name for s in sources])
  return sources, geometry


def spec_info(spec: Any) -> dict[str, Any]:
  """The dataset_info of the (first) source of a spec, after checking that all sources are compatible."""
  sources, _ = open_sources(spec)
  return sources[0].info


# --------------------------------------------------------------------------------------------------------------
# Per-record transform.
# --------------------------------------------------------------------------------------------------------------


def zero_example(geometry: Geometry, max_tokens: int, keys: Sequence[str] = BATCH_KEYS) -> dict[str, np.ndarray]:
  """A padding clip (its `keys`): zeros everywhere, mask False, label -1, targets NaN (unknown), weight 0."""
  t = max_tokens
  if geometry.kind == "raw":
    s, g = geometry.visual_size, geometry.target_size
    audio = np.zeros((t, geometry.audio_frames, geometry.audio_dim), np.float32)
    visual = np.zeros((t, geometry.visual_frames, s, s, 3), np.uint8)
    audio_target = np.zeros((t, geometry.audio_dim), np.float32)
    visual_target = np.zeros((t, g * g), np.float32)
  else:
    audio = np.zeros((t, geometry.audio_dim), np.float32)
    visual = np.zeros((t, geometry.visual_dim), np.float32)
    audio_target, visual_target = audio.copy(), visual.copy()
  ex = {"audio": audio, "visual": visual, "mask": np.zeros((t,), bool), "audio_target": audio_target,
        "visual_target": visual_target, "label": np.int32(-1), "targets": np.full((3,), np.nan, np.float32),
        "weight": np.float32(0.0)}
  return {k: ex[_known_key(k)] for k in keys}


def _known_key(key: str) -> str:
  if key not in BATCH_KEYS:
    raise ValueError(f"batch key {key!r} is not produced by the input pipeline; expected some of {BATCH_KEYS}")
  return key


def dummy_batch(geometry: Geometry, batch_size: int, max_tokens: int,
                keys: Sequence[str] = BATCH_KEYS) -> dict[str, np.ndarray]:
  """A batch of padding clips with the exact shapes and dtypes the pipeline produces."""
  ex = zero_example(geometry, max_tokens, keys)
  return {k: np.stack([v] * batch_size) for k, v in ex.items()}


def batch_shapes(geometry: Geometry, batch_size: int, max_tokens: int,
                 keys: Sequence[str] = BATCH_KEYS) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} of the batches the pipeline produces (no batch is built)."""
  ex = zero_example(geometry, max_tokens, keys)
  return {k: ((batch_size,) + np.shape(v), np.asarray(v).dtype) for k, v in ex.items()}


# --------------------------------------------------------------------------------------------------------------
# Input normalisation: which statistics scale the inputs (and the face target).
# --------------------------------------------------------------------------------------------------------------

NO_NORMALIZATION = {"kind": "none"}


def normalization_of(info: Mapping[str, Any], source: str = "dataset_info.json") -> dict[str, Any]:
  """The statistics a dataset_info gives: audio mean/std per dimension; visual mean/std per dimension (features) or
  the face target's scalar target_mean/target_std (raw). Modalities without statistics are left unscaled."""
  a, v = info.get("audio", {}), info.get("visual", {})
  visual_keys = ("target_mean", "target_std") if info.get("kind") == "raw" else ("mean", "std")
  return {"kind": "stats", "source": source, "audio": {k: a[k] for k in ("mean", "std") if k in a},
          "visual": {k: v[k] for k in visual_keys if k in v}}


def compute_normalization(sources: Sequence[Any], source: str = "data.train") -> dict[str, Any]:
  """The statistics of `sources`' clips as they are (filters applied): what normalization_of gives for a prepared
  directory, computed over these clips only (e.g. a fold's training speakers). Population std, float64 sums."""
  sums: dict[str, Any] = {}

  def add(name, x):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1]) if np.ndim(x) > 1 else np.asarray(x, np.float64)
    n, s1, s2 = sums.get(name, (0, 0.0, 0.0))
    sums[name] = (n + x.shape[0], s1 + x.sum(axis=0), s2 + (x * x).sum(axis=0))

  geometry = None
  for src in sources:
    geometry = geometry or src.geometry
    for i in range(len(src)):
      ex = src[i]
      add("audio", ex["audio"])
      if geometry.kind == "raw":
        t, kv, s = int(ex["num_tokens"]), geometry.visual_frames, geometry.visual_size
        add("target", targets.face_target(ex["visual"].reshape(t, kv, s, s, 3), geometry.target_size).reshape(-1, 1))
      else:
        add("visual", ex["visual"])

  def mean_std(name):
    n, s1, s2 = sums[name]
    mean = s1 / max(n, 1)
    return mean, np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 0.0))

  am, astd = mean_std("audio")
  out = {"kind": "stats", "source": source, "audio": {"mean": am.tolist(), "std": astd.tolist()}}
  if geometry.kind == "raw":
    tm, ts = mean_std("target")
    out["visual"] = {"target_mean": float(tm[0]), "target_std": float(ts[0])}
  else:
    vm, vs = mean_std("visual")
    out["visual"] = {"mean": vm.tolist(), "std": vs.tolist()}
  return out


# Keys the finishing step computes from the others; everything else is what the host assembles.
TARGET_KEYS = ("audio_target", "visual_target")


def stored_keys(keys: Sequence[str]) -> tuple[str, ...]:
  """The keys the host assembles for a model batch of `keys`: the inputs and labels, plus `mask`, which finishing
  needs; never the reconstruction targets (computed from the inputs by `BatchFinisher`)."""
  keys = tuple(_known_key(k) for k in keys)
  out = tuple(k for k in keys if k not in TARGET_KEYS)
  return out if "mask" in out else out + ("mask",)


class BatchAssembler:
  """(record, crop start) items -> one batch at stored scale: each clip's window sliced and copied once into the
  batch arrays, zeros past its end; mask, label, targets, weight. Items whose record is None are padding clips
  (mask False, label -1, targets NaN, weight 0). Used as grain's `batch_fn` in the consuming process, or by the
  prefetch workers (`batch_workers`) with their shared memory as `out`. Batches made here reuse the memory of
  batches no longer referred to (`batch_workers.BufferPool`); every array is 64-byte aligned, so it reaches a CPU
  device without a copy."""

  def __init__(self, geometry: Geometry, max_tokens: int, keys: Sequence[str]):
    self.geometry, self.max_tokens, self.keys = geometry, int(max_tokens), stored_keys(keys)
    if not {"audio", "visual"} <= set(self.keys):
      raise ValueError(f"batch keys {tuple(keys)} lack 'audio' or 'visual': every model batch has both")
    self._buffers = batch_workers.BufferPool()
    self._layouts: dict[int, batch_workers.SlotLayout] = {}

  def shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of a batch of `batch_size` clips."""
    geo, t, b = self.geometry, self.max_tokens, int(batch_size)
    if geo.kind == "raw":
      s = geo.visual_size
      media = {"audio": ((b, t, geo.audio_frames, geo.audio_dim), np.float32),
               "visual": ((b, t, geo.visual_frames, s, s, 3), np.uint8)}
    else:
      media = {"audio": ((b, t, geo.audio_dim), np.float32), "visual": ((b, t, geo.visual_dim), np.float32)}
    small = {"mask": ((b, t), np.bool_), "label": ((b,), np.int32), "targets": ((b, 3), np.float32),
             "weight": ((b,), np.float32)}
    every = {**media, **small}
    return {k: (every[k][0], np.dtype(every[k][1])) for k in self.keys}

  def layout(self, batch_size: int) -> batch_workers.SlotLayout:
    """Where the arrays of a batch of `batch_size` clips lie in one buffer (its memory, a worker's slot)."""
    if batch_size not in self._layouts:
      self._layouts[batch_size] = batch_workers.SlotLayout.of(self.shapes(batch_size))
    return self._layouts[batch_size]

  def __call__(self, items: Sequence[tuple[Mapping[str, Any] | None, int]],
               out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The batch of `items`; with `out` (arrays of `shapes(n)` for some n >= len(items), e.g. a prefetch
    worker's shared memory) written into the first len(items) rows of those arrays instead of new ones."""
    geo, t, b = self.geometry, self.max_tokens, len(items)
    ka, kv = (geo.audio_frames, geo.visual_frames) if geo.kind == "raw" else (1, 1)
    if out is None:
      out = self._buffers.take(self.layout(b))
    out = {k: v[:b] for k, v in out.items()}
    # Media as [B, frames, ...] views: each clip's window is then one slice.
    audio = out["audio"].reshape(b, t * ka, *out["audio"].shape[-1:])
    visual = out["visual"].reshape(b, t * kv, *out["visual"].shape[2 + (geo.kind == "raw"):])
    mask, label = out.get("mask"), out.get("label")
    clip_targets, weight = out.get("targets"), out.get("weight")
    for i, (record, start) in enumerate(items):
      n = 0
      if record is not None:
        n = min(int(np.asarray(record["num_tokens"])), t)
        audio[i, :n * ka] = record["audio"][start * ka:(start + n) * ka]
        visual[i, :n * kv] = record["visual"][start * kv:(start + n) * kv]
      audio[i, n * ka:] = 0  # uninitialised arrays: only the tail past the clip is written twice
      visual[i, n * kv:] = 0
      if mask is not None:
        mask[i, :n], mask[i, n:] = True, False
      if label is not None:
        label[i] = np.asarray(record["label"]) if record is not None else -1
      if clip_targets is not None:
        clip_targets[i] = np.asarray(record["targets"], np.float32).reshape(3) if record is not None else np.nan
      if weight is not None:
        weight[i] = 1.0 if record is not None else 0.0
    return out


class BatchFinisher:
  """Stored-scale batch -> model batch: inputs scaled with the run's normalisation, the reconstruction targets
  (pretraining), padding frames zeroed. Pure array arithmetic, so the same code runs on the host
  (`finisher(batch)`, numpy) and inside the jitted step on the devices (`finisher(batch, jnp)`).

  Normalisation (see `normalization_of`): per-dimension audio mean/std; per-dimension visual mean/std (features)
  or the face target's scalar target_mean/target_std (raw); {"kind": "none"} leaves everything unscaled.
  """

  def __init__(self, geometry: Geometry, normalization: Mapping[str, Any], keys: Sequence[str] = BATCH_KEYS):
    self.geometry = geometry
    self.keys = tuple(_known_key(k) for k in keys)
    self._with_targets = bool(set(TARGET_KEYS) & set(self.keys))
    self.normalization = dict(normalization)
    norm = self.normalization
    where = norm.get("source", "dataset_info.json")
    if norm.get("kind") == "none":
      norm = {"audio": {}, "visual": {"target_mean": 0.0, "target_std": 1.0}}
    elif geometry.kind == "raw" and ("mean" not in norm["audio"] or "target_mean" not in norm["visual"]):
      raise records.RecordError(f"{where} (raw kind): audio mean/std and visual target_mean/target_std are "
                                "required")
    self.audio_mean, self.audio_std = self._stats(norm["audio"], geometry.audio_dim, where)
    if geometry.kind == "raw":
      self.target_mean = np.float32(norm["visual"]["target_mean"])
      self.target_std = np.float32(max(float(norm["visual"]["target_std"]), _STD_FLOOR))
    else:
      self.visual_mean, self.visual_std = self._stats(norm["visual"], geometry.visual_dim, where)

  @staticmethod
  def _stats(mod: Mapping[str, Any], dim: int, where: str):
    """Per-dimension mean/std (identity if the modality has none)."""
    if "mean" not in mod:
      return np.zeros((dim,), np.float32), np.ones((dim,), np.float32)
    mean, std = np.asarray(mod["mean"], np.float32), np.asarray(mod["std"], np.float32)
    if mean.shape != (dim,) or std.shape != (dim,):
      raise records.RecordError(f"{where}: mean/std have shapes {mean.shape}/{std.shape}, expected ({dim},)")
    return mean, np.maximum(std, _STD_FLOOR)

  def __call__(self, batch: Mapping[str, Any], xp: Any = np) -> dict[str, Any]:
    geo = self.geometry
    valid = batch["mask"]                                            # [B, T]
    frames = valid[..., None, None] if geo.kind == "raw" else valid[..., None]
    audio = xp.where(frames, (batch["audio"] - self.audio_mean) / self.audio_std, xp.float32(0))
    out = dict(batch, audio=audio)
    if geo.kind != "raw":
      out["visual"] = xp.where(frames, (batch["visual"] - self.visual_mean) / self.visual_std, xp.float32(0))
    if self._with_targets:
      if geo.kind == "raw":
        audio_target = audio.mean(axis=2)
        face = targets.face_target(batch["visual"], geo.target_size, xp)
        visual_target = (face - self.target_mean) / self.target_std
      else:
        audio_target, visual_target = out["audio"], out["visual"]
      out["audio_target"] = xp.where(valid[..., None], audio_target, xp.float32(0)).astype(xp.float32)
      out["visual_target"] = xp.where(valid[..., None], visual_target, xp.float32(0)).astype(xp.float32)
    return {k: out[k] for k in self.keys}


class ClipTransform:
  """One record -> one model example (crop/pad to `max_tokens`, normalise, targets, mask, zero padding): the
  pipeline's `BatchAssembler` and `BatchFinisher` (numpy) on a batch of one clip, for callers that build
  examples themselves (sliding-window prediction).

  Called as `transform(record, rng)`: with `train=True` the crop start is drawn from `rng` as in training; with
  `train=False` (or rng None) the crop starts at token 0.
  """

  def __init__(self, info: Mapping[str, Any], max_tokens: int, *, train: bool, keys: Sequence[str] = BATCH_KEYS,
               normalization: Mapping[str, Any] | None = None):
    if max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    self.geometry = Geometry.from_info(info)
    self.train = train
    self._crop = CropStart(max_tokens)
    self._assemble = BatchAssembler(self.geometry, max_tokens, keys)
    self._finish = BatchFinisher(self.geometry, normalization if normalization is not None else
                                 normalization_of(info), keys)
    self.normalization = self._finish.normalization

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    item = self._crop(record, rng) if self.train and rng is not None else (record, 0)
    return {k: v[0] for k, v in self._finish(self._assemble([item])).items()}


class CropStart:
  """record -> (record, crop start): training crops start uniformly over the windows of `max_tokens` tokens that
  fit (0 when the clip is not longer)."""

  def __init__(self, max_tokens: int):
    self.max_tokens = int(max_tokens)

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> tuple[Mapping[str, Any], int]:
    total = int(np.asarray(record["num_tokens"]))
    return record, (int(rng.integers(0, total - self.max_tokens + 1)) if total > self.max_tokens else 0)


def _at_start(record: Mapping[str, Any]) -> tuple[Mapping[str, Any], int]:
  return record, 0


class _PaddingSource:
  """`count` padding items (no record) for the last eval batch."""

  def __init__(self, count: int):
    self._count = count

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, index: int) -> tuple[None, int]:
    if not 0 <= int(index) < self._count:
      raise IndexError(index)
    return None, 0


# --------------------------------------------------------------------------------------------------------------
# Dataset assembly.
# --------------------------------------------------------------------------------------------------------------


class _BatchTransform:
  """Adapts `fn(batch, rng) -> batch` to grain's random_map."""

  def __init__(self, fn: Callable[[dict, np.random.Generator], dict]):
    self.fn = fn

  def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
    return self.fn(batch, rng)


def _derive_seed(seed: int, *keys: int) -> int:
  return int(np.random.SeedSequence([int(seed), *keys]).generate_state(1)[0])


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  return process_index, process_count


def make_dataset(spec: Any, *, split: str, global_batch_size: int, seed: int, max_tokens: int,
                 process_index: int | None = None, process_count: int | None = None, shuffle: bool = True,
                 num_epochs: int | None = None, worker_count: int = 0, mixture: Sequence[float] | None = None,
                 batch_transform: Callable[[dict, np.random.Generator], dict] | None = None,
                 keys: Sequence[str] = BATCH_KEYS, normalization: Mapping[str, Any] | None = None,
                 finish: bool = True) -> grain.IterDataset:
  """Builds the Grain dataset of batches (docs/data_format.md) for this process.

  Args:
    spec: dataset spec (see `parse_spec`); several sources are mixed with their weights for training and
      concatenated for evaluation. All sources must have the same kind and shapes.
    split: "train" (shuffled, random crops, `drop_remainder`, repeats forever unless `num_epochs`) or "eval" (one
      pass in record order, crops from token 0, last batch padded with clips of weight 0; every process yields
      the same number of batches).
    global_batch_size: batch size over all processes; this process yields batches of
      global_batch_size // process_count.
    seed: seeds shuffling (a new order per epoch), the random crops and `batch_transform`.
    max_tokens: T, the fixed token length of every clip (cropped or zero-padded).
    process_index, process_count: this process's slice of the data (default: jax.process_index/count()).
    shuffle: train only; False keeps record order.
    num_epochs: train only; None repeats forever. With a mixture, the epochs of the source exhausted first.
    worker_count: > 0 makes batches ahead in that many processes (`batch_workers`: assembled in shared memory
      that is reused); the batches and the iterator's state do not depend on it.
    mixture: optional weights overriding the `weight` of each source of the spec.
    batch_transform: optional picklable `fn(batch, rng) -> batch` applied to every assembled numpy batch (stored
      scale, before finishing) in the consuming process (e.g. an augmentation); rng is a numpy Generator,
      deterministic and checkpointed. It must keep the keys, shapes and dtypes.
    keys: the model batch keys (a task's `batch_keys`); reconstruction targets are computed only if asked for.
    normalization: the statistics that scale the inputs (`normalization_of`, `compute_normalization` or
      NO_NORMALIZATION); default: the first source's dataset_info.
    finish: True: batches are finished on the host (`BatchFinisher`, numpy): the model batch of `keys`. False:
      batches stay at stored scale (`stored_keys(keys)`: inputs as stored, uint8 faces, no targets) and the
      caller finishes them on the devices (`finisher(...)(batch, jnp)` inside its jitted step), which is what
      the trainer does: the host then only reads, slices and copies.

  Returns:
    A grain IterDataset; `iter(ds)` gives a checkpointable iterator of dicts of numpy arrays.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  process_index, process_count = _process_defaults(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
  batch_size = global_batch_size // process_count
  if batch_size < 1:
    raise ValueError(f"global_batch_size {global_batch_size} gives no clip per process ({process_count})")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  specs = parse_spec(spec)
  sources = [s.open() for s in specs]
  geometry = check_compatible([s.info for s in sources], [s.name for s in sources])
  for s in sources:
    if len(s) == 0:
      raise ValueError(f"dataset {s.name!r} has no clips (after filtering)")
  train = split == "train"
  assemble = BatchAssembler(geometry, max_tokens, keys)

  if train:
    parts = []
    for k, src in enumerate(sources):
      ds = grain.MapDataset.source(src)
      if shuffle:
        ds = ds.shuffle(seed=_derive_seed(seed, 1, k))
      parts.append(ds.repeat(num_epochs))
    if len(parts) == 1:
      ds = parts[0]
    else:
      weights = list(mixture) if mixture is not None else [s.weight for s in specs]
      if len(weights) != len(parts) or min(weights) <= 0:
        raise ValueError(f"mixture weights {weights} must be {len(parts)} positive numbers")
      ds = grain.MapDataset.mix(parts, weights)
    items = ds.random_map(CropStart(max_tokens), seed=_derive_seed(seed, 2))
    # Batch, then give process p the batches p, p + n, ...: global batch k (the processes' local batches k, process
    # 0 first) is then exactly the single-process batch k, clips in the same order, for any process count.
    ds = items.batch(batch_size, drop_remainder=True, batch_fn=assemble)
    ds = ds[process_index::process_count]
    stride, offset = process_count, process_index
  else:
    ds = grain.MapDataset.source(sources[0])
    if len(sources) > 1:
      ds = grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in sources])
    total = len(ds)
    ds = ds[process_index::process_count].map(_at_start)
    num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
    pad = num_batches * batch_size - len(ds)
    if pad:
      padding = grain.MapDataset.source(_PaddingSource(pad))
      ds = grain.MapDataset.concatenate([ds, padding]) if len(ds) else padding
    items = ds
    ds = ds.batch(batch_size, drop_remainder=False, batch_fn=assemble)
    stride, offset = 1, 0

  if worker_count > 0:
    it = batch_workers.worker_batches(items, assemble, batch_size=batch_size, num_workers=worker_count,
                                      stride=stride, offset=offset, num_batches=len(ds))
  else:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if batch_transform is not None:
    it = it.random_map(_BatchTransform(batch_transform), seed=_derive_seed(seed, 3, process_index))
  if finish:
    it = it.map(BatchFinisher(geometry, normalization if normalization is not None else
                              normalization_of(sources[0].info), keys))
  return it

