"""Prefetch worker processes that assemble batches straight into reused shared memory.

Grain's `mp_prefetch` copies every batch a worker made into a new shared-memory segment; filling new pages costs
more than making the batch (a raw batch of 64 clips, 212 MB: 230-320 ms on the 2-core development machine, against
about 30 ms to write memory used before), so one worker was slower than none. Here each worker owns a few *slots*,
shared memory the size of one batch, and `BatchAssembler` writes the batch into a free slot; the consuming process
reads it in place. A slot goes back to its worker once nothing refers to the batch any more (the arrays handed
out, and what was made from them without a copy: on a CPU device, `jax.device_put` of an aligned array uses its
memory in place), so a batch is never overwritten while it is in use. A consumer that keeps many batches gets
more slots instead of waiting for itself.

Batch k of this process is `ds[k]` of the batched MapDataset that `input_pipeline.make_dataset` builds without
workers (clips `items[(k * stride + offset) * batch_size:][:batch_size]`), worker w makes the batches k = first + w,
first + w + W, ..., and they are handed out in order of k: the batches do not depend on the number of workers, and
the iterator's state is the next k (`{"next_index": k}`, as for Grain's in-process iterator), so a run resumes
exactly, with any number of workers.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import mmap
import multiprocessing
from multiprocessing import reduction
import os
import signal
import tempfile
import traceback
import weakref
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

# XLA's CPU client uses a host array in place when it is 64-byte aligned and copies it otherwise; numpy aligns
# large allocations to 16 bytes. For a raw batch (64 clips of T=50, 212 MB) jax.device_put took 150 ms copied
# against about 1 ms in place (2-core development machine): most of the time the loader spent per batch.
_ALIGN = 64
_POLL_S = 0.1                    # how often a waiting process checks that its peer is still alive


@dataclasses.dataclass(frozen=True)
class SlotLayout:
  """Where each array of a batch lies in a slot: (key, shape, dtype, byte offset), 64-byte aligned."""
  fields: tuple[tuple[str, tuple[int, ...], str, int], ...]
  nbytes: int

  @classmethod
  def of(cls, shapes: Mapping[str, tuple[tuple[int, ...], Any]]) -> "SlotLayout":
    fields, offset = [], 0
    for key, (shape, dtype) in shapes.items():
      dtype = np.dtype(dtype)
      fields.append((key, tuple(int(d) for d in shape), dtype.str, offset))
      size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      offset += -(-size // _ALIGN) * _ALIGN
    return cls(tuple(fields), max(offset, _ALIGN))

  def arrays(self, buffer: np.ndarray, rows: int | None = None) -> dict[str, np.ndarray]:
    """The batch arrays over a uint8 array of the slot's bytes (the first `rows` clips of each)."""
    out = {}
    for key, shape, dtype, offset in self.fields:
      dtype = np.dtype(dtype)
      size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      a = buffer[offset:offset + size].view(dtype).reshape(shape)
      out[key] = a if rows is None else a[:rows]
    return out


def _shared_memory(nbytes: int) -> int:
  """A file descriptor of `nbytes` of memory that other processes can map, with no name left behind."""
  if hasattr(os, "memfd_create"):
    fd = os.memfd_create("avt_jax-batch")
  else:  # macOS: a file unlinked at once
    fd, path = tempfile.mkstemp(prefix="avt_jax-batch-")
    os.unlink(path)
  os.ftruncate(fd, nbytes)
  return fd


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """What a worker needs to make batch k: the clips and the assembler (picklable: it travels to the workers)."""
  items: grain.MapDataset          # (record, crop start) items, before batching
  assemble: Callable[..., dict]    # input_pipeline.BatchAssembler
  batch_size: int
  stride: int = 1                  # the processes' interleaving of batches (process_count)
  offset: int = 0                  # this process's place in it (process_index)
  num_batches: int | None = None   # None: endless

  def clips(self, k: int) -> range:
    lo = (k * self.stride + self.offset) * self.batch_size
    return range(lo, min(lo + self.batch_size, len(self.items)))


def _worker(index: int, first: int, num_workers: int, plan: BatchPlan, layout: SlotLayout, conn) -> None:
  """A worker's loop: receives slots (new ones with their memory, or freed ones), makes its batches into them in
  order and sends (k, slot, rows, error)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
  parent = os.getppid()
  slots: dict[int, dict[str, np.ndarray]] = {}
  free: list[int] = []
  k = first + index
  while plan.num_batches is None or k < plan.num_batches:
    while not free:
      if not conn.poll(_POLL_S):
        if os.getppid() != parent:
          return
        continue
      msg = conn.recv()
      if msg is None:
        return
      kind, slot, fd = msg
      if kind == "new":
        memory = mmap.mmap(fd.detach(), layout.nbytes)
        slots[slot] = layout.arrays(np.frombuffer(memory, np.uint8))
      free.append(slot)
    slot = free.pop()
    try:
      clips = plan.clips(k)
      plan.assemble([plan.items[i] for i in clips], out=slots[slot])
    except Exception:  # pylint: disable=broad-except  (reported by the parent with the batch index)
      conn.send((k, slot, 0, traceback.format_exc()))
      return
    conn.send((k, slot, len(clips), None))
    k += num_workers


class _Lease(np.ndarray):
  """The bytes of a buffer handed out with one batch: every array of the batch is a view of it, so it lives as long
  as any of them (and whatever uses their memory in place); its finalizer gives the buffer back. (Its own base must
  not be an ndarray: numpy would then point the views past it, at that array.)"""


def _lease(memory: mmap.mmap, layout: SlotLayout, rows: int | None, give_back: Callable[[], Any]):
  lease = np.ndarray.__new__(_Lease, (layout.nbytes,), np.uint8, buffer=memory)
  weakref.finalize(lease, give_back)
  return layout.arrays(lease.view(np.ndarray), rows)


class BufferPool:
  """Batch memory reused within one process: `take(layout)` gives the arrays of a batch over a buffer that returns
  to the pool when nothing refers to the batch any more (the same lease as the workers' slots). Allocating a new
  batch each time costs page faults on every byte (a 212 MB raw batch: 60-120 ms to fill new memory, 20-45 ms to
  fill memory used before, on the development machine); at most `keep` free buffers per layout are kept."""

  def __init__(self, keep: int = 4):
    self.keep = int(keep)
    self.free: dict[SlotLayout, collections.deque] = collections.defaultdict(collections.deque)

  def take(self, layout: SlotLayout) -> dict[str, np.ndarray]:
    free = self.free[layout]
    try:
      memory = free.popleft()
    except IndexError:
      memory = mmap.mmap(-1, layout.nbytes)  # page-aligned
    return _lease(memory, layout, None, functools.partial(self._give_back, free, memory))

  def _give_back(self, free: collections.deque, memory: mmap.mmap) -> None:
    if len(free) < self.keep:
      free.append(memory)

  def __getstate__(self):  # a copy in another process starts empty
    return {"keep": self.keep}

  def __setstate__(self, state):
    self.__init__(state["keep"])


class _Pool:
  """The worker processes of one iterator position, with their slots. Only the consuming thread (the one calling
  `receive`, then `close`) talks to the workers; a lease's finalizer, which may run in any thread, only queues its
  slot for return."""

  def __init__(self, plan: BatchPlan, layout: SlotLayout, first: int, num_workers: int, slots_per_worker: int):
    self.plan, self.layout, self.first, self.num_workers = plan, layout, first, num_workers
    self.memory: dict[tuple[int, int], mmap.mmap] = {}
    self.owned = [0] * num_workers
    self.leased = [0] * num_workers
    self.returned: collections.deque[tuple[int, int]] = collections.deque()  # appended by finalizers
    ctx = multiprocessing.get_context("spawn")
    self.conns, self.procs = [], []
    for w in range(num_workers):
      parent_end, child_end = ctx.Pipe()
      proc = ctx.Process(target=_worker, args=(w, first, num_workers, plan, layout, child_end), daemon=True,
                         name=f"avt_jax-batch-worker-{w}")
      proc.start()
      child_end.close()
      self.conns.append(parent_end)
      self.procs.append(proc)
      for _ in range(slots_per_worker):
        self._add_slot(w)

  def _add_slot(self, w: int) -> None:
    slot = self.owned[w]
    fd = _shared_memory(self.layout.nbytes)
    try:
      self.memory[w, slot] = mmap.mmap(fd, self.layout.nbytes)
      self.conns[w].send(("new", slot, reduction.DupFd(fd)))
    finally:
      os.close(fd)
    self.owned[w] += 1

  def _give_back(self) -> None:
    while self.returned:
      w, slot = self.returned.popleft()
      self.leased[w] -= 1
      try:
        self.conns[w].send(("free", slot, None))
      except OSError:
        pass  # the worker is gone: receive() reports it

  def receive(self, k: int) -> dict[str, np.ndarray]:
    w = (k - self.first) % self.num_workers
    conn, proc = self.conns[w], self.procs[w]
    while True:
      self._give_back()
      if self.leased[w] >= self.owned[w]:  # the consumer holds every slot of this worker: give it another one
        self._add_slot(w)
      if conn.poll(_POLL_S):
        try:
          got, slot, rows, error = conn.recv()
        except (EOFError, OSError):  # the worker died while sending
          got, slot, rows, error = k, None, 0, None
        break
      if not proc.is_alive():
        got, slot, rows, error = k, None, 0, None
        break
    if error is not None:
      clips = self.plan.clips(k)
      raise RuntimeError(f"batch prefetch worker {w} failed on batch {k} (clips {clips.start}..{clips.stop - 1} "
                         f"of this process's stream):\n{error}")
    if slot is None:
      proc.join(1.0)
      raise RuntimeError(f"batch prefetch worker {w} (pid {proc.pid}) ended with exit code {proc.exitcode} before "
                         f"batch {k} (killed, or out of memory?)")
    assert got == k, (got, k)
    self.leased[w] += 1
    return _lease(self.memory[w, slot], self.layout, rows, functools.partial(self.returned.append, (w, slot)))

  def close(self) -> None:
    for conn in self.conns:
      try:
        conn.send(None)
      except (OSError, ValueError):
        pass  # already gone
    for proc in self.procs:
      proc.join(2.0)
      if proc.is_alive():
        proc.terminate()
        proc.join(2.0)
    for conn in self.conns:
      conn.close()
    # A slot's memory is unmapped when the last batch made in it is gone (its lease refers to the mapping).
    self.memory.clear()


class WorkerPrefetch(grain.IterDataset):
  """Batches of a `BatchPlan` made ahead by `num_workers` processes (module docstring)."""

  def __init__(self, plan: BatchPlan, num_workers: int, slots_per_worker: int = 2):
    super().__init__()
    if num_workers < 1 or slots_per_worker < 1:
      raise ValueError(f"num_workers ({num_workers}) and slots_per_worker ({slots_per_worker}) must be >= 1")
    self.plan, self.num_workers, self.slots_per_worker = plan, int(num_workers), int(slots_per_worker)
    self.layout = plan.assemble.layout(plan.batch_size)

  def __iter__(self) -> "WorkerPrefetchIterator":
    return WorkerPrefetchIterator(self)

  def __str__(self) -> str:
    return f"WorkerPrefetch(num_workers={self.num_workers})"


class WorkerPrefetchIterator(grain.DatasetIterator):
  """Hands out batch k = 0, 1, ... in order; state {"next_index": k}. `close()` stops the workers."""

  def __init__(self, ds: WorkerPrefetch):
    super().__init__()
    self._ds = ds
    self._next = 0
    self._pool: _Pool | None = None

  def __next__(self) -> dict[str, np.ndarray]:
    plan = self._ds.plan
    if plan.num_batches is not None and self._next >= plan.num_batches:
      raise StopIteration
    if self._pool is None:
      self._pool = _Pool(plan, self._ds.layout, self._next, self._ds.num_workers, self._ds.slots_per_worker)
    try:
      batch = self._pool.receive(self._next)
    except BaseException:
      self.close()
      raise
    self._next += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "next_index" not in state:  # e.g. Grain's mp_prefetch state, from runs before this module
      raise ValueError(f"data iterator state {dict(state)!r} is not a batch position ({{'next_index': k}}): it was "
                       "written by another prefetch implementation; resume with data.worker_count=0 and the "
                       "process count the checkpoint was written with")
    self.close()
    self._next = int(state["next_index"])

  def close(self) -> None:
    if self._pool is not None:
      self._pool.close()
      self._pool = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  (interpreter shutdown)
      pass


def worker_batches(items: grain.MapDataset, assemble: Callable[..., dict], *, batch_size: int, num_workers: int,
                   stride: int = 1, offset: int = 0, num_batches: int | None = None,
                   slots_per_worker: int = 2) -> WorkerPrefetch:
  """`WorkerPrefetch` of the batches `items[(k * stride + offset) * batch_size:][:batch_size]`, k < num_batches."""
  return WorkerPrefetch(BatchPlan(items, assemble, int(batch_size), int(stride), int(offset), num_batches),
                        num_workers, slots_per_worker)


__all__: Sequence[str] = ("BatchPlan", "SlotLayout", "WorkerPrefetch", "WorkerPrefetchIterator", "worker_batches")
