"""Host memory policy of a training process: freed memory stays in the process for the next step.

XLA's CPU runtime allocates the temporaries of every execution of the step anew and frees them after it (base,
T=100: 0.4 GB at batch 8, 1.7 GB at batch 32). glibc serves blocks above its mmap threshold (at most 32 MB) with
fresh mappings and unmaps them on free, so each step's first touch of every page is a page fault that the kernel
fills with zeros: about 100,000 faults and 0.2 s of system CPU time per step at batch 8, 0.6 s at batch 32 on the
2-core development machine (docs/scaling.md). `keep_freed_memory()` makes glibc serve large blocks from its heap
(no mmap), never return the heap's top to the kernel, and use one arena for all threads (a thread's own arena
cannot grow past 64 MB and would fall back to mmap), so the next step reuses the pages of the last.

The cost: the process keeps its peak heap size for its lifetime. It must run before JAX starts its runtime threads
(a thread picks its arena at its first allocation), i.e. first thing in an entry point. Linux with glibc only;
elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters of glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
  """Sets glibc's allocator to keep and reuse freed memory (see the module docstring). True if it was applied."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1))
  return all(mallopt(param, value) == 1 for param, value in settings)
