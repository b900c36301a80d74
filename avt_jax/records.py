"""Reading and writing clip records (see docs/data_format.md).

A record is a dict of numpy arrays / scalars / strings serialised with msgpack in flax.serialization's layout, stored
one per ArrayRecord entry. This module is the single place that knows the byte format.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import struct
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import msgpack
import numpy as np
from array_record.python import array_record_module

REQUIRED_KEYS = ("clip_id", "dataset", "speaker", "session", "label", "targets", "num_tokens", "audio", "visual")
DATASET_INFO = "dataset_info.json"
# One record per chunk, uncompressed: a clip is one read of its bytes. Compression saves little on these arrays
# (15% on real uint8 face crops, nothing on float features) and made reading a record about 10x slower (2.3 ms
# against 0.23 ms per raw sample clip); shards written with compression stay readable.
SHARD_OPTIONS = "group_size:1,uncompressed"
# The media arrays of a record live in a flat file beside its shard (`<shard>.<hash>.media`, each array aligned
# to MEDIA_ALIGN bytes), the record holding their shape, dtype and offset: reading a clip's window is then a copy
# out of the page cache into the batch, where ArrayRecord would first copy the whole record into new memory
# (4.2-4.7 ms per 3 MB raw clip, against 0.7 ms for a plain read). Shards with the arrays inside stay readable.
MEDIA_KEYS = ("audio", "visual")
MEDIA_SUFFIX = ".media"
MEDIA_ALIGN = 64
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
# need not import flax and with it jax (2.2 s per worker); read back by decode() below.
_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
_EXT_MEDIA = 16  # (shape, dtype name, media file name, offset): an array in the shard's media file
_FLAX_MAX_CHUNK_BYTES = 2**30  # flax splits larger arrays into chunks, a layout not written here


def _keys_sorted(tree: Any) -> Any:
  """Dicts (at every depth) with their keys in sorted order, as flax writes them (its pytree copy sorts them)."""
  if isinstance(tree, Mapping):
    return {k: _keys_sorted(tree[k]) for k in sorted(tree)}
  if isinstance(tree, list):
    return [_keys_sorted(v) for v in tree]
  return tree


def _check_writable_dtype(x: np.ndarray) -> None:
  if x.dtype.hasobject or x.dtype.isalignedstruct:
    raise TypeError(f"cannot write an array of dtype {x.dtype} into a record")


def _pack_array(x: Any) -> msgpack.ExtType:
  if not hasattr(x, "__array__"):  # numpy arrays and scalars, jax.Array
    raise TypeError(f"cannot write a {type(x).__name__} into a record")  # e.g. a tuple: strict msgpack refuses it
  code = _EXT_NPSCALAR if isinstance(x, np.generic) else _EXT_NDARRAY
  x = np.asarray(x)
  _check_writable_dtype(x)
  if x.nbytes > _FLAX_MAX_CHUNK_BYTES:
    raise RecordError(f"an array of {x.nbytes} bytes is over the {_FLAX_MAX_CHUNK_BYTES} a record holds")
  return msgpack.ExtType(code, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))


def decode(data: bytes, where: str = "", media: Callable[[str], np.ndarray] | None = None) -> dict[str, Any]:
  """The record dict of `data`; its arrays are read-only views into `data` or, for arrays stored in a media file,
  into that file's bytes as `media(name)` gives them (`MediaFiles.beside(shard)`), with no copy."""
  data = bytes(data)  # no copy for bytes
  try:
    ex, end = _unpack(data, 0)
    if end != len(data):
      raise ValueError("trailing bytes")
  except Exception:  # pylint: disable=broad-except  # not the layout written here: flax reads it or names the error
    ex = _decode_with_flax(data, where)
  if isinstance(ex, dict):
    for k, v in ex.items():
      if isinstance(v, msgpack.ExtType) and v.code == _EXT_MEDIA:  # read by flax, which leaves it as it is
        v = _MediaRef(*msgpack.unpackb(v.data))
      if isinstance(v, _MediaRef):
        ex[k] = _read_media(v, media, f"{where}.{k}")
  if not isinstance(ex, dict):
    raise RecordError(f"{where}: record decodes to {type(ex).__name__}, expected a dict")
  missing = [k for k in REQUIRED_KEYS if k not in ex]
  if missing:
    raise RecordError(f"{where}: record {ex.get('clip_id', '?')!r} lacks keys {missing}")
  return ex


def _decode_with_flax(data: bytes, where: str) -> Any:
  from flax import serialization  # pylint: disable=import-outside-toplevel  # see _pack_array
  try:
    return serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on garbage.
    raise RecordError(f"{where}: record is not a valid msgpack clip record ({type(e).__name__}: {e})") from e


# Reading the layout above without msgpack's copies: msgpack hands an extension's payload to its hook as a new
# bytes object and flax unpacks the array bytes from it into another, two copies of every clip's media (about
# 2.6 ms of a raw clip's 3 MB). Here an array is np.frombuffer over the record's own bytes. Anything this parser
# does not know (flax's chunked arrays, bfloat16, complex, garbage) raises, and decode() hands it to flax.
_BE = {n: struct.Struct(">" + c).unpack_from for n, c in
       (("u8", "B"), ("u16", "H"), ("u32", "I"), ("u64", "Q"), ("i8", "b"), ("i16", "h"), ("i32", "i"),
        ("i64", "q"), ("f32", "f"), ("f64", "d"))}
_FIXED = {0xcc: ("u8", 1), 0xcd: ("u16", 2), 0xce: ("u32", 4), 0xcf: ("u64", 8), 0xd0: ("i8", 1),
          0xd1: ("i16", 2), 0xd2: ("i32", 4), 0xd3: ("i64", 8), 0xca: ("f32", 4), 0xcb: ("f64", 8)}
_SIZED = {0xd9: ("str", "u8", 1), 0xda: ("str", "u16", 2), 0xdb: ("str", "u32", 4), 0xc4: ("bin", "u8", 1),
          0xc5: ("bin", "u16", 2), 0xc6: ("bin", "u32", 4), 0xdc: ("array", "u16", 2), 0xdd: ("array", "u32", 4),
          0xde: ("map", "u16", 2), 0xdf: ("map", "u32", 4), 0xc7: ("ext", "u8", 1), 0xc8: ("ext", "u16", 2),
          0xc9: ("ext", "u32", 4)}
_FIXEXT = {0xd4: 1, 0xd5: 2, 0xd6: 4, 0xd7: 8, 0xd8: 16}
_CONSTANTS = {0xc0: None, 0xc2: False, 0xc3: True}


def _dtype(name: str) -> np.dtype:
  try:
    return np.dtype(name)
  except TypeError:
    import ml_dtypes  # pylint: disable=import-outside-toplevel  # bfloat16 and friends, which numpy names not
    return np.dtype(getattr(ml_dtypes, name))


class _MediaRef(NamedTuple):
  shape: list[int]
  dtype: str
  file: str
  offset: int


def _read_media(ref: _MediaRef, media: Callable[[str], np.ndarray] | None, where: str) -> np.ndarray:
  if media is None:
    raise RecordError(f"{where}: the array is stored in the media file {ref.file!r}; read the record with its "
                      f"shard's path (records.read_shard, input_pipeline.ClipSource)")
  flat = media(ref.file)
  dtype = _dtype(ref.dtype)
  nbytes = int(np.prod(ref.shape, dtype=np.int64)) * dtype.itemsize
  if not 0 <= ref.offset <= ref.offset + nbytes <= flat.size:
    raise RecordError(f"{where}: bytes [{ref.offset}, {ref.offset + nbytes}) of the media file {ref.file} "
                      f"requested, it has {flat.size}: truncated?")
  return flat[ref.offset:ref.offset + nbytes].view(dtype).reshape(ref.shape)


def _span(data: bytes, pos: int, n: int) -> int:
  if pos + n > len(data):
    raise ValueError("truncated")
  return pos + n


def _unpack(data: bytes, pos: int) -> tuple[Any, int]:
  """(value, position after it) of the msgpack value at `pos`."""
  b = data[pos]
  pos += 1
  if b <= 0x7f:
    return b, pos
  if b >= 0xe0:
    return b - 0x100, pos
  if b <= 0x8f:
    return _unpack_map(data, pos, b & 0x0f)
  if b <= 0x9f:
    return _unpack_array(data, pos, b & 0x0f)
  if b <= 0xbf:
    end = _span(data, pos, b & 0x1f)
    return data[pos:end].decode(), end
  if b in _CONSTANTS:
    return _CONSTANTS[b], pos
  if b in _FIXED:
    fmt, n = _FIXED[b]
    return _BE[fmt](data, pos)[0], pos + n
  if b in _FIXEXT:
    return _unpack_ext(data, pos + 1, _BE["i8"](data, pos)[0], _FIXEXT[b])
  kind, fmt, width = _SIZED[b]  # KeyError on the unused byte 0xc1
  n = _BE[fmt](data, pos)[0]
  pos += width
  if kind == "str":
    end = _span(data, pos, n)
    return data[pos:end].decode(), end
  if kind == "bin":
    end = _span(data, pos, n)
    return data[pos:end], end
  if kind == "array":
    return _unpack_array(data, pos, n)
  if kind == "map":
    return _unpack_map(data, pos, n)
  return _unpack_ext(data, pos + 1, _BE["i8"](data, pos)[0], n)


def _unpack_map(data: bytes, pos: int, n: int) -> tuple[dict[str, Any], int]:
  out = {}
  for _ in range(n):
    key, pos = _unpack(data, pos)
    out[key], pos = _unpack(data, pos)
  if "__msgpack_chunked_array__" in out:
    raise ValueError("flax chunked array")
  return out, pos


def _unpack_array(data: bytes, pos: int, n: int) -> tuple[list[Any], int]:
  out = []
  for _ in range(n):
    value, pos = _unpack(data, pos)
    out.append(value)
  return out, pos


def _unpack_ext(data: bytes, pos: int, code: int, n: int) -> tuple[Any, int]:
  end = _span(data, pos, n)
  if code == _EXT_MEDIA:
    ref, p = _unpack(data, pos)
    if p != end:
      raise ValueError("media extension length")
    return _MediaRef(*ref), end
  if code not in (_EXT_NDARRAY, _EXT_NPSCALAR) or data[pos] != 0x93:  # (shape, dtype name, bytes)
    raise ValueError(f"extension type {code}")
  shape, p = _unpack(data, pos + 1)
  name, p = _unpack(data, p)
  b = data[p]
  if not 0xc4 <= b <= 0xc6:
    raise ValueError("array bytes are not a bin")
  width = 1 << (b - 0xc4)
  nbytes = _BE[("u8", "u16", "u32")[b - 0xc4]](data, p + 1)[0]
  start = p + 1 + width
  if start + nbytes != end:
    raise ValueError("array extension length")
  dtype = np.dtype(name)  # bfloat16 and other ml_dtypes by name: flax's reader
  array = np.frombuffer(data, dtype, count=nbytes // dtype.itemsize if dtype.itemsize else 0,
                        offset=start).reshape(shape)
  return (array[()] if code == _EXT_NPSCALAR else array), end


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
  """Writes examples to an ArrayRecord shard at `path` and their media arrays to a file beside it named by its
  content (`<shard>.<sha256 prefix>.media`), so that the same clips give the same bytes. The media file lands
  first and whole, then the shard (atomically, see `replacing`): a shard on disk always names a complete media
  file. Returns the record count."""
  directory, base = os.path.split(os.path.abspath(path))
  fd, media_tmp = tempfile.mkstemp(prefix=base + ".", suffix=".tmp", dir=directory)
  rows = []  # the records with their media arrays replaced by (shape, dtype name, offset) in the media file
  try:
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as media:
      for ex in examples:
        rows.append({k: _write_media(media, digest, v) if k in MEDIA_KEYS else v for k, v in ex.items()})
      media.flush()
      os.fsync(media.fileno())
    media_name = f"{base}.{digest.hexdigest()[:16]}{MEDIA_SUFFIX}"
    os.chmod(media_tmp, 0o644)
    os.replace(media_tmp, os.path.join(directory, media_name))
  except BaseException:
    if os.path.exists(media_tmp):
      os.remove(media_tmp)
    raise
  with replacing(path) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, SHARD_OPTIONS)
    try:
      for row in rows:
        writer.write(encode({k: _media_ext(media_name, *v) if k in MEDIA_KEYS else v for k, v in row.items()}))
    finally:
      writer.close()
  for stale in glob.glob(glob.escape(os.path.join(directory, base)) + ".*" + MEDIA_SUFFIX):
    if os.path.basename(stale) != media_name:  # the media of a shard this write replaced
      os.remove(stale)
  return len(rows)


def _write_media(media: Any, digest: Any, x: Any) -> tuple[tuple[int, ...], str, int]:
  x = np.ascontiguousarray(x)
  _check_writable_dtype(x)
  pad = b"\0" * (-media.tell() % MEDIA_ALIGN)
  for chunk in (pad, x.reshape(-1).view(np.uint8)):
    media.write(chunk)
    digest.update(chunk)
  return x.shape, x.dtype.name, media.tell() - x.nbytes


def _media_ext(media_name: str, shape: tuple[int, ...], dtype: str, offset: int) -> msgpack.ExtType:
  return msgpack.ExtType(_EXT_MEDIA, msgpack.packb((shape, dtype, media_name, offset), use_bin_type=True))


class MediaFiles:
  """Media files of shards, each mapped read-only on first use (one map per file, kept)."""

  def __init__(self):
    self._maps: dict[str, np.ndarray] = {}

  def beside(self, shard: str) -> Callable[[str], np.ndarray]:
    """name -> bytes of the media file `name` in the directory of `shard` (the resolver `decode` takes)."""
    return functools.partial(self._map, os.path.dirname(os.path.abspath(shard)))

  def _map(self, directory: str, name: str) -> np.ndarray:
    path = os.path.join(directory, name)
    if path not in self._maps:
      if os.path.basename(name) != name or not os.path.exists(path):
        raise RecordError(f"{path}: media file not found (a shard and its .media file travel together)")
      size = os.path.getsize(path)
      self._maps[path] = np.asarray(np.memmap(path, np.uint8, "r")) if size else np.zeros(0, np.uint8)
    return self._maps[path]

  def __getstate__(self):  # maps are not pickled: prefetch workers map the files themselves
    return {"_maps": {}}


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
  media = MediaFiles().beside(path)
  return [decode(b, f"{path}[{i}]", media) for i, b in enumerate(data)]


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
