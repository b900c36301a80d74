"""Batch memory reuse (avt_jax/batch_workers.py); the worker processes are tested through make_dataset in
test_input_pipeline.py and the trainer in test_train.py."""

import gc

import jax
import numpy as np

from avt_jax import batch_workers

LAYOUT = batch_workers.SlotLayout.of({"audio": ((4, 6, 5), np.float32), "mask": ((4, 6), np.bool_),
                                      "label": ((4,), np.int32)})


def test_layout_aligns_every_array_and_gives_row_views():
  buffer = np.zeros(LAYOUT.nbytes, np.uint8)
  arrays = LAYOUT.arrays(buffer)
  assert {k: (v.shape, v.dtype) for k, v in arrays.items()} == {
      "audio": ((4, 6, 5), np.float32), "mask": ((4, 6), np.bool_), "label": ((4,), np.int32)}
  offsets = [v.ctypes.data - buffer.ctypes.data for v in arrays.values()]
  assert offsets == [0, 512, 576] and all(o % 64 == 0 for o in offsets)  # 480 bytes of audio round up to 512
  arrays["label"][:] = [1, 2, 3, 4]
  np.testing.assert_array_equal(LAYOUT.arrays(buffer, rows=2)["label"], [1, 2])


def _addresses(pool, n):
  """Addresses of n batches taken at once (then given back)."""
  held = [pool.take(LAYOUT) for _ in range(n)]
  return {b["audio"].ctypes.data for b in held}


def test_memory_returns_to_the_pool_only_when_nothing_refers_to_the_batch():
  pool = batch_workers.BufferPool(keep=4)
  first = pool.take(LAYOUT)
  address = first["audio"].ctypes.data
  assert address not in _addresses(pool, 3)                 # in use: never handed out twice
  view = first["audio"][1:3]
  del first
  gc.collect()
  assert address not in _addresses(pool, 3)                 # a view of the batch still refers to it
  del view
  gc.collect()
  assert address in _addresses(pool, 4)                     # reused once nothing refers to it
  batches = [pool.take(LAYOUT) for _ in range(4)]
  mine = next(b for b in batches if b["audio"].ctypes.data == address)
  mine["audio"][:] = 7.0
  on_device = jax.device_put(mine["audio"], jax.devices("cpu")[0])
  assert on_device.unsafe_buffer_pointer() == address       # aligned: used in place by the CPU device ...
  del batches, mine
  gc.collect()
  held = [pool.take(LAYOUT) for _ in range(4)]              # ... which keeps it out of the pool
  assert address not in {b["audio"].ctypes.data for b in held}
  for b in held:
    b["audio"][:] = -1.0
  np.testing.assert_array_equal(np.asarray(on_device), 7.0)
  del on_device, held
  gc.collect()
  assert address in _addresses(pool, 4)
