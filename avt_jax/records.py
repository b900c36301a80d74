"""Reading and writing clip records (see docs/data_format.md).

A record is a dict of numpy arrays / scalars / strings serialised with msgpack (flax.serialization), stored one
per ArrayRecord entry. This module is the single place that knows the byte format.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import numpy as np
from array_record.python import array_record_module
from flax import serialization

REQUIRED_KEYS = ("clip_id", "dataset", "speaker", "session", "label", "targets", "num_tokens", "audio", "visual")
DATASET_INFO = "dataset_info.json"


class RecordError(ValueError):
  """A record or shard does not have the expected content."""


def encode(example: Mapping[str, Any]) -> bytes:
  missing = [k for k in REQUIRED_KEYS if k not in example]
  if missing:
    raise RecordError(f"record {example.get('clip_id', '?')!r} lacks keys {missing}")
  return serialization.msgpack_serialize(dict(example))


def decode(data: bytes, where: str = "") -> dict[str, Any]:
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


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes a small file whole or not at all (temporary file, then rename)."""
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  os.replace(tmp, path)


def write_shard(path: str, examples: Iterable[Mapping[str, Any]]) -> int:
  """Writes examples to `path` atomically (temporary file, then rename). Returns the record count."""
  tmp = path + ".tmp"
  n = 0
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  try:
    for ex in examples:
      writer.write(encode(ex))
      n += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return n


def read_shard(path: str) -> list[dict[str, Any]]:
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return [decode(b, f"{path}[{i}]") for i, b in enumerate(reader.read_all())]
  finally:
    reader.close()


def load_dataset_info(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, DATASET_INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {directory!r} a directory written by `python -m data.prepare`?")
  with open(path) as f:
    return json.load(f)


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
