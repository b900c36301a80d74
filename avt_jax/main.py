"""Entry point: python -m avt_jax.main --config=configs/pretrain.py [--workdir=...] [--config.<field>=<value>]

config.mode selects pretraining, fine-tuning or evaluation-only. On a multi-process run (Cloud TPU pod, several GPU
hosts) every process runs the same command; `jax.distributed.initialize()` is called when the environment says so
(TPU VM metadata, SLURM, or AVT_COORDINATOR / AVT_NUM_PROCESSES / AVT_PROCESS_ID).
"""

from __future__ import annotations

import json
import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from avt_jax import host_memory

config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py[:variant]).",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, TensorBoard). Default: config.workdir.")
flags.DEFINE_bool("distributed", None, "Force (True) or skip (False) jax.distributed.initialize(); default: auto.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _should_initialize_distributed() -> bool:
  if FLAGS.distributed is not None:
    return FLAGS.distributed
  env = os.environ
  return any(k in env for k in ("AVT_COORDINATOR", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")) and (
      int(env.get("AVT_NUM_PROCESSES", env.get("SLURM_NTASKS", "2"))) > 1)


def initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  env = os.environ
  # Processes on CPU need a collectives backend for cross-process computations (gloo ships with jaxlib). The
  # option only concerns the CPU client, so GPU and TPU runs are unaffected.
  if not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if "AVT_COORDINATOR" in env:
    jax.distributed.initialize(coordinator_address=env["AVT_COORDINATOR"],
                               num_processes=int(env["AVT_NUM_PROCESSES"]),
                               process_id=int(env["AVT_PROCESS_ID"]))
  else:
    jax.distributed.initialize()  # Cloud TPU and SLURM are detected by JAX itself.
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


class _QuietLibraries(logging_std.Filter):
  """Keeps INFO chatter of the checkpointing library out of the run log (warnings and errors still pass)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def _exit_with_last_line(line: str) -> None:
  """Prints `line` last on stderr and exits with status 1.

  Everything the run keeps is closed by now, but the checkpointing library's background threads (a save failing
  on a full disk, say) can still print tracebacks, from Python or C++, at any moment. Other writers are sent to
  /dev/null first, so nothing comes after the cause; skipping interpreter shutdown keeps them from running on.
  """
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  stderr = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os.write(stderr, (line + "\n").encode())
  os._exit(1)  # pylint: disable=protected-access


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if FLAGS.config.get("reuse_host_memory", True):
    host_memory.keep_freed_memory()  # before JAX starts its runtime threads
  if _should_initialize_distributed():
    initialize_distributed()
  from avt_jax import checkpointing, records, train, writers  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  workdir = FLAGS.workdir or config.get("workdir")
  if not workdir:
    raise app.UsageError("give --workdir (or set config.workdir)")
  try:  # train.run resolves relative paths against the current directory before anything is written.
    result = train.run(config, workdir)
  except (train.TrainingError, checkpointing.CheckpointError, checkpointing.CheckpointMismatchError,
          writers.MetricsError, records.RecordError, ValueError, OSError, KeyError) as e:
    # The traceback goes to the log; the cause is the last line a user sees.
    logging.error("the run stopped", exc_info=True)
    _exit_with_last_line(f"avt_jax.main: error: {e}")
  logging.info("finished: %s", json.dumps(result, default=float))
  print(json.dumps(result, default=float))


if __name__ == "__main__":
  app.run(main)
