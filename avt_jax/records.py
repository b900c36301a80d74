"""Reading and writing clip records (see docs/data_format.md).

A record is a dict of numpy arrays / scalars / strings serialised with msgpack in flax.serialization's layout, stored
one per ArrayRecord entry. This module is the single place that knows the byte format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Any, Iterable, Iterator, Mapping

import msgpack
import numpy as np
from array_record.python import array_record_module

REQUIRED_KEYS = ("clip_id", "dataset", "speaker", "session", "label", "targets", "num_tokens", "audio", "visual")
DATASET_INFO = "dataset_info.json"
# One record per chunk, uncompressed: a clip is one read of its bytes. Compression saves little on these arrays
# (15% on real uint8 face crops, nothing on float features) and made reading a record about 10x slower (2.3 ms
# against 0.23 ms per raw sample clip); shards written with compression stay readable.
SHARD_OPTIONS = "group_size:1,uncompressed"
# What the `label` field means, per dataset (data.prepare writes the index; -1 = no label).
CLASS_NAMES = {
    "crema_d": ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"),
    "msp_improv": ("A", "H", "S", "N"),  # angry, happy, sad, neutral; O (other) and X (no agreement) are -1
}


class RecordError(ValueError):
  """A record or shard does not have the expected content."""


def encode(example: Mapping[str, Any]) -> bytes:
  missing = [k for k in REQUIRED_KEYS if k not in example]
  if missing:
    raise RecordError(f"record {example.get('clip_id', '?')!r} lacks keys {missing}")
  return msgpack.packb(_keys_sorted(example), default=_pack_array, strict_types=True)


# flax.serialization's msgpack extension types: an array is ext 1 and a numpy scalar ext 3, each holding the packed
# (shape, dtype name, C-order bytes). Written here, byte for byte as flax writes them, so that preparation workers
# need not import flax and with it jax (2.2 s per worker); reading goes through flax.serialization.msgpack_restore.
_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
_FLAX_MAX_CHUNK_BYTES = 2**30  # flax splits larger arrays into chunks, a layout not written here


def _keys_sorted(tree: Any) -> Any:
  """Dicts (at every depth) with their keys in sorted order, as flax writes them (its pytree copy sorts them)."""
  if isinstance(tree, Mapping):
    return {k: _keys_sorted(tree[k]) for k in sorted(tree)}
  if isinstance(tree, list):
    return [_keys_sorted(v) for v in tree]
  return tree


def _pack_array(x: Any) -> msgpack.ExtType:
  if not hasattr(x, "__array__"):  # numpy arrays and scalars, jax.Array
    raise TypeError(f"cannot write a {type(x).__name__} into a record")  # e.g. a tuple: strict msgpack refuses it
  code = _EXT_NPSCALAR if isinstance(x, np.generic) else _EXT_NDARRAY
  x = np.asarray(x)
  if x.dtype.hasobject or x.dtype.isalignedstruct:
    raise TypeError(f"cannot write an array of dtype {x.dtype} into a record")
  if x.nbytes > _FLAX_MAX_CHUNK_BYTES:
    raise RecordError(f"an array of {x.nbytes} bytes is over the {_FLAX_MAX_CHUNK_BYTES} a record holds")
  return msgpack.ExtType(code, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))


def decode(data: bytes, where: str = "") -> dict[str, Any]:
  from flax import serialization  # pylint: disable=import-outside-toplevel  # see _pack_array
  try:
    ex = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on garbage.
    raise RecordError(f"{where}: record is not a valid msgpack clip record ({type(e).__name__}: {e})") from e
  if not isinstance(ex, dict):
    raise RecordError(f"{where}: record decodes to {type(ex).__name__}, expected a dict")
  missing = [k for k in REQUIRED_KEYS if k not in ex]
  if missing:
    raise RecordError(f"{where}: record {ex.get('clip_id', '?')!r} lacks keys {missing}")
  return ex


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
  """Yields a unique temporary path beside local `path`; when the block succeeds, the file written there is
  flushed to disk and renamed over `path`, else removed. Readers see the old file or the new one, never a torn one,
  and two writers never share a temporary file."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes a small file whole or not at all (see `replacing`). Remote paths (gs://, anything with a scheme) are
  written in one object upload, which is atomic already."""
  payload = data.encode() if isinstance(data, str) else bytes(data)
  path = os.fspath(path)
  if "://" in path:
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(path).write_bytes(payload)
    return
  try:
    with replacing(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(payload)
  except OSError as e:
    if e.filename or e.errno is None:
      raise
    raise OSError(e.errno, e.strerror, path) from e  # a failed write or close (a full disk) names no file


def read_json(path: str | os.PathLike, what: str = "JSON file", object_only: bool = False) -> Any:
  """Parses a small JSON state file; a missing or malformed one raises RecordError naming the path and the line.

  With object_only, anything but a JSON object is malformed too.
  """
  path = os.fspath(path)
  try:
    if "://" in path:
      from etils import epath  # pylint: disable=g-import-not-at-top
      text = epath.Path(path).read_text()
    else:
      with open(path, encoding="utf-8") as f:
        text = f.read()
  except FileNotFoundError as e:
    raise RecordError(f"{path}: {what} not found") from e
  except UnicodeDecodeError as e:
    raise RecordError(f"{path}: {what} is not UTF-8 text ({e})") from e
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise RecordError(f"{path}:{e.lineno}: malformed {what}: {e.msg} (line {e.lineno}, column {e.colno})") from e
  if object_only and not isinstance(data, dict):
    raise RecordError(f"{path}:1: malformed {what}: expected a JSON object, got {type(data).__name__}")
  return data


def file_sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def read_jsonl(path: str | os.PathLike, what: str = "JSON-lines file") -> list[Any]:
  """Parses a JSON-lines file (blank lines skipped); a bad line raises RecordError naming the path and line."""
  path = os.fspath(path)
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise RecordError(f"{path}:{lineno}: malformed {what} line: {e.msg} (column {e.colno})") from e
  return rows


def write_shard(path: str, examples: Iterable[Mapping[str, Any]]) -> int:
  """Writes examples to an ArrayRecord shard at `path` atomically (see `replacing`). Returns the record count."""
  n = 0
  with replacing(path) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, SHARD_OPTIONS)
    try:
      for ex in examples:
        writer.write(encode(ex))
        n += 1
    finally:
      writer.close()
  return n


def _shard_error(path: str, e: BaseException) -> RecordError:
  return RecordError(f"{path}: not a readable ArrayRecord shard, truncated or corrupted? "
                     f"({type(e).__name__}: {' '.join(str(e).split())[:300]})")


@contextlib.contextmanager
def shard_reader(path: str) -> Iterator[Any]:
  """An ArrayRecord reader of `path`. The C++ reader raises bare RuntimeErrors (at open, read or close) on a
  truncated or corrupted shard; they become RecordErrors naming the file. RecordErrors pass unchanged."""
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except Exception as e:  # pylint: disable=broad-except
    raise _shard_error(path, e) from e
  failed = True
  try:
    yield reader
    failed = False
  except RecordError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _shard_error(path, e) from e
  finally:
    try:
      reader.close()  # A truncated shard can read as empty and fail only here.
    except Exception as e:  # pylint: disable=broad-except
      if not failed:
        raise _shard_error(path, e) from e


def num_records(path: str) -> int:
  with shard_reader(path) as reader:
    return reader.num_records()


def read_shard(path: str) -> list[dict[str, Any]]:
  with shard_reader(path) as reader:
    data = reader.read_all()
  return [decode(b, f"{path}[{i}]") for i, b in enumerate(data)]


def load_dataset_info(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, DATASET_INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {directory!r} a directory written by `python -m data.prepare`?")
  return read_json(path, "dataset description")


def shard_paths(directory: str, info: Mapping[str, Any] | None = None) -> list[str]:
  info = info if info is not None else load_dataset_info(directory)
  paths = [os.path.join(directory, p) for p in info.get("shards", [])]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"{directory}/{DATASET_INFO} lists shards that do not exist: {missing[:5]}")
  if not paths:
    raise RecordError(f"{directory}/{DATASET_INFO} lists no shards")
  return paths


def is_raw(info: Mapping[str, Any]) -> bool:
  return info["kind"] == "raw"
