"""Device mesh and logical-axis sharding rules, both from the config.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and optimizer
state sharded), `tensor` (tensor parallelism over heads / MLP). Model parameters carry logical axis names; the
config's `mesh.rules` maps each logical name to mesh axes. A dimension that the mapped axes do not divide stays
replicated on that axis (reported by `describe`), so every preset runs on every mesh.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("feature", None),
    ("conv", None),
    ("classes", None),
    ("layers", None),
)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh of shape (data, fsdp, tensor); one axis may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(mesh_cfg)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(mesh_cfg)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, {len(devices)} available")
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  if not rules:
    return DEFAULT_RULES
  out = []
  for name, axes in rules:
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    size = 1
    for a in names:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    fitted.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*fitted)


def strip_boxes(tree: Any) -> Any:
  """Replaces nn.Partitioned boxes by their values (no sharding constraint applied, unlike nn.meta.unbox)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (abstract) nn.Partitioned boxes / plain arrays (plain -> replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = strip_boxes(boxed_tree)

  def one(spec, x):
    spec = spec if isinstance(spec, P) else P()
    return NamedSharding(mesh, _fit_spec(spec, tuple(x.shape), mesh))

  return jax.tree.map(one, mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from every process's local batch (leading axis split over data x fsdp)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def describe(tree: Any) -> list[tuple[str, tuple[int, ...], str]]:
  """(path, shape, partition spec) rows for a tree of arrays / ShapeDtypeStructs carrying shardings."""
  rows = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    rows.append((name, tuple(x.shape), str(spec)))
  return rows


class DevicePrefetch:
  """Iterates global device batches (`global_batch` of each local batch of `iterator`), `size` ahead of use,
  transferred by a background thread, so the step does not wait for a host-to-device copy.

  Checkpointable with `grain.checkpoint.CheckpointSave/Restore` (Grain's protocol for iterators that are not its
  own: the state is JSON bytes): `get_state()` is the wrapped iterator's state right after the last batch handed
  out (not after the ones prefetched beyond it), so a run resumed from a checkpoint reads exactly the batches an
  uninterrupted run would. `set_state` drops what was prefetched.
  """

  _END = object()

  def __init__(self, iterator, mesh: Mesh, size: int = 2):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._it, self._mesh, self._size = iterator, mesh, int(size)
    self._queue = None
    self._thread = None
    self._stop = None
    self._state = None  # None: nothing handed out since the last set_state; the wrapped iterator's state is current

  def __iter__(self):
    return self

  def _fill(self, batches: queue.Queue, stop: threading.Event) -> None:

    def put(item) -> bool:
      while not stop.is_set():
        try:
          batches.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    try:
      while not stop.is_set():
        try:
          local = next(self._it)
        except StopIteration:
          put(self._END)
          return
        if not put((global_batch(local, self._mesh), self._it.get_state())):
          return
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consuming thread)
      put(e)

  def _start(self) -> None:
    self._queue, self._stop = queue.Queue(maxsize=self._size), threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(self._queue, self._stop), daemon=True,
                                    name="avt_jax-device-prefetch")
    self._thread.start()

  def __next__(self) -> dict[str, jax.Array]:
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if item is self._END:
      self._queue.put(item)  # Every later call ends too.
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    batch, self._state = item
    return batch

  def close(self) -> None:
    """Stops the transfer thread (what it prefetched is dropped)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def get_state(self) -> bytes:
    return json.dumps(self._it.get_state() if self._state is None else self._state).encode()

  def set_state(self, state: bytes | str) -> None:
    self.close()
    self._it.set_state(json.loads(state))
    self._state = None

  def start_prefetch(self) -> None:
    """Called by Grain's checkpoint restore; the transfer thread starts at the first `next` instead."""
