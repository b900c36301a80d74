"""The host memory policy: with it, XLA's CPU runtime reuses the pages of one execution's temporaries in the next
(no page faults); without it every execution faults its temporaries in anew. Run in fresh processes, because the
policy must be set before JAX starts its threads and stays for the process's lifetime."""

import os
import subprocess
import sys

import pytest

from avt_jax import config_lib

_PROGRAM = """
import resource, sys, time
from avt_jax import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)           # 64 MB: above glibc's largest mmap threshold (32 MB)
step = jax.jit(lambda x: jnp.cumsum(jnp.tanh(x), axis=0).sum())  # a 64 MB temporary
faults = []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  time.sleep(0.2)  # the runtime frees an execution's temporaries just after its result is ready
print(applied, min(faults[1:]))  # an execution racing a late free may still grow the heap once
"""


def _faults_of_one_execution(policy: str) -> tuple[str, int]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=config_lib.REPO)
  proc = subprocess.run([sys.executable, "-c", _PROGRAM, policy], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  applied, faults = proc.stdout.split()
  return applied, int(faults)


@pytest.mark.skipif(sys.platform != "linux", reason="the policy is glibc's")
def test_the_next_execution_reuses_the_temporaries_pages():
  applied, faults = _faults_of_one_execution("keep")
  assert applied == "True"
  # The 64 MB temporary is 16,384 pages: with the policy, executions after the first touch no new page.
  assert faults < 1000, faults
  applied, faults = _faults_of_one_execution("release")
  assert applied == "False"
  assert faults > 16000, faults  # the default: fresh pages for every execution
