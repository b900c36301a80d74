"""Real multi-process training on CPU: 2 processes x 4 CPU devices, joined by jax.distributed (localhost coordinator,
gloo collectives), against one process with 8 devices.

  * Each process reads its own batches of the shuffled clip stream (process p: local batches p, p + n, ...); the
    global batch of a step is exactly the single-process batch of that step, clips in the same order.
  * The loss curve of `python -m avt_jax.main --config=configs/pretrain.py:tiny` in 2 processes equals the
    single-process one (rtol 1e-5) when the step is invariant to the order of clips in the batch: dropout off and a
    masking plan that draws nothing per clip (every valid frame scored, kept as is). With the default masking and
    dropout the random draws follow the row position, so the curves differ by the noise of the draws.
  * A checkpoint written by 2 processes restores in 1 process and the other way round, onto another mesh.
  * The data-iterator state is per process count (Grain stores process_<i>-of-<n>.json); resuming under another
    process count restores the train state and positions the iterator at the restored step.

Every subprocess has a timeout and all processes of a run are killed if one fails.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from avt_jax import checkpointing, config_lib, input_pipeline, sharding, train
from avt_jax import setup as setup_lib

REPO = config_lib.REPO
CACHE = os.path.join(os.environ.get("PYTEST_XLA_CACHE", "/tmp"), f"avt_jax_test_xla_{os.getuid()}")
STEPS = 6
# Order-invariant training step: no dropout, and a masking plan with nothing random per clip (ratio 1 and one
# span of T=8 frames select every valid frame; action probabilities (0, 0, 1) keep every frame as is).
ORDER_INVARIANT = [
    "--config.batch_size=8", "--config.eval_batch_size=8", f"--config.total_steps={STEPS}",
    "--config.checkpoint_every_steps=3", "--config.log_every_steps=1", "--config.data.eval=",
    "--config.masking.ratio=1.0", "--config.masking.span=8", "--config.masking.probs=(0.0,0.0,1.0)",
    "--config.model.embed_dropout=0.0", "--config.model.residual_dropout=0.0", "--config.model.relu_dropout=0.0",
    "--config.model.joint_attention_dropout=0.0",
]
RUN_TIMEOUT = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, process_id: int | None = None, num_processes: int = 1, port: int = 0) -> dict:
  env = dict(os.environ)
  # Backend optimisation off: CPU compiles 2-3x faster; every run here uses the same flags.
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  for k in ("AVT_COORDINATOR", "AVT_NUM_PROCESSES", "AVT_PROCESS_ID"):
    env.pop(k, None)
  if process_id is not None:
    env.update(AVT_COORDINATOR=f"127.0.0.1:{port}", AVT_NUM_PROCESSES=str(num_processes),
               AVT_PROCESS_ID=str(process_id))
  return env


class _Job:
  """`cmd` in `num_processes` processes (joined by jax.distributed when > 1), output in <logdir>/process_<i>.log."""

  def __init__(self, cmd: list[str], logdir: str, num_processes: int, devices: int, timeout: float = RUN_TIMEOUT):
    os.makedirs(logdir, exist_ok=True)
    self.cmd, self.logdir, self.deadline = cmd, logdir, time.time() + timeout
    self.paths = [os.path.join(logdir, f"process_{i}.log") for i in range(num_processes)]
    port = _free_port()
    self.procs = []
    for i, path in enumerate(self.paths):
      env = _env(devices, i, num_processes, port) if num_processes > 1 else _env(devices)
      with open(path, "w") as log:
        self.procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))

  def failure(self) -> str | None:
    """None while running or after success; otherwise why it failed."""
    codes = [p.poll() for p in self.procs]
    bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
    if bad:
      return f"process {bad[0]} exited with {codes[bad[0]]}"
    if None in codes and time.time() > self.deadline:
      return "timed out"
    return None

  def running(self) -> bool:
    return any(p.poll() is None for p in self.procs)

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def report(self, why: str) -> str:
    tails = [f"--- process {i} ---\n" + open(path).read()[-3000:] for i, path in enumerate(self.paths)]
    return f"{' '.join(self.cmd[:4])}...: {why}\n" + "\n".join(tails)

  def logs(self) -> list[str]:
    return [open(path).read() for path in self.paths]


def _wait(*jobs: _Job) -> None:
  """Waits for all jobs; if one fails or times out, kills every process of every job and fails the test."""
  try:
    while any(j.running() for j in jobs):
      for j in jobs:
        why = j.failure()
        if why:
          pytest.fail(j.report(why))
      time.sleep(0.2)
    for j in jobs:
      why = j.failure()
      if why:
        pytest.fail(j.report(why))
  finally:
    for j in jobs:
      j.kill()


def _launch(cmd: list[str], logdir: str, num_processes: int, devices: int, timeout: float = RUN_TIMEOUT):
  job = _Job(cmd, logdir, num_processes, devices, timeout)
  _wait(job)
  return job.logs()


def _train(workdir: str, num_processes: int, devices: int, *overrides):
  # No persistent compilation cache with several processes: only process 0 writes it and the cache keys differ per
  # process, so process 0 would load its step at once while the others compile for tens of seconds; gloo gives a
  # late peer only 30 s at the first cross-process collective ("Gloo context initialization failed").
  cache = CACHE if num_processes == 1 else "none"
  cmd = [sys.executable, "-m", "avt_jax.main", f"--config={REPO}/configs/pretrain.py:tiny",
         f"--config.compilation_cache_dir={cache}", f"--workdir={workdir}", *ORDER_INVARIANT, *overrides]
  return _Job(cmd, workdir + "_logs", num_processes, devices)


def _metrics(workdir: str) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in _metrics(workdir) if r["split"] == "train" and "loss" in r}


def _saved_params(workdir: str, step: int) -> dict[str, np.ndarray]:
  """The parameters of a checkpoint as numpy arrays, read without any mesh (the files as written)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return {"/".join(k.key for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}


def _abstract_state(run_dir: str, mesh_cfg: dict):
  """The trainer's abstract state (with shardings on `mesh_cfg`) for the run in `run_dir` (its config.json)."""
  config = ml_collections.ConfigDict(json.load(open(os.path.join(run_dir, "config.json"))))
  mesh = sharding.make_mesh(mesh_cfg)
  _, geometry = input_pipeline.open_sources(config_lib.data_spec(config, "train"))
  setup = setup_lib.build(config, geometry, mesh=mesh)
  return config, setup.abstract_state, setup.state_shardings


def restore_params(run_dir: str, step: int, mesh_cfg: dict) -> dict[str, np.ndarray]:
  """Restores the train state of `run_dir`'s checkpoint `step` onto `mesh_cfg` in this process layout (the
  trainer's code path: its config.json, setup.build, checkpointing.restore) and returns the full parameters.

  Also run by the 2-process helper below, so it must work in every process of a jax.distributed job.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  _, abstract, shardings = _abstract_state(run_dir, mesh_cfg)
  manager = checkpointing.make_manager(run_dir, keep=100, async_save=False, with_data_iter=False)
  state = checkpointing.restore(manager, step, abstract)
  manager.close()
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert x.sharding == s, (x.sharding, s)
  full = multihost_utils.process_allgather(state["params"], tiled=True)
  return {"/".join(k.key for k in p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(full)[0]}


HELPER = """
import json, sys
sys.path.insert(0, {tests!r})
from avt_jax import main
main.initialize_distributed()
import jax, numpy as np
from test_multiprocess import restore_params
params = restore_params(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
if jax.process_index() == 0:
  np.savez(sys.argv[4], **params)
print("restored on", jax.process_count(), "processes", flush=True)
"""


def _assert_params_close(a: dict, b: dict, rtol: float, atol: float, what: str):
  assert sorted(a) == sorted(b), what
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what}: {k} (worst |diff| {worst:.3g})")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same training run in 2 processes x 4 devices and in 1 process x 8 devices (mesh data=8 both)."""
  root = tmp_path_factory.mktemp("multiprocess")
  two, one = str(root / "two"), str(root / "one")
  job_two = _train(two, 2, 4)
  job_one = _train(one, 1, 8)  # At the same time: most of its time is start-up and checkpoint writing.
  _wait(job_two, job_one)
  return {"two": two, "one": one, "logs_two": job_two.logs(), "root": root}


def test_two_processes_join_one_mesh(runs):
  for i, log in enumerate(runs["logs_two"]):
    assert f"process {i} of 2, 4 local / 8 global devices" in log
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1} on 2 processes" in log


def test_two_processes_match_one_process_loss_curve(runs):
  two, one = _losses(runs["two"]), _losses(runs["one"])
  # Only process 0 writes metrics.jsonl: one row per step.
  rows = [r["step"] for r in _metrics(runs["two"]) if r["split"] == "train" and "loss" in r]
  assert rows == list(range(1, STEPS + 1))
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  for step in one:
    np.testing.assert_allclose(two[step], one[step], rtol=1e-5, err_msg=f"step {step}")
  assert one[STEPS] < one[1]  # It trains.
  _assert_params_close(_saved_params(runs["two"], STEPS), _saved_params(runs["one"], STEPS), rtol=1e-4, atol=2e-6,
                       what="params after 6 steps, 2 processes vs 1")


def test_two_process_checkpoint_restores_in_one_process(runs):
  # This pytest process: 1 process, 8 CPU devices (conftest); the checkpoint was written by 2 processes.
  restored = restore_params(runs["two"], 3, {"data": 2, "fsdp": 4, "tensor": 1})
  written = _saved_params(runs["two"], 3)
  _assert_params_close(restored, written, rtol=0, atol=0, what="2-process checkpoint restored in 1 process")
  # And it is the state the independent single-process run reached at that step.
  _assert_params_close(restored, _saved_params(runs["one"], 3), rtol=1e-4, atol=2e-6, what="vs 1-process run")


def test_one_process_checkpoint_restores_in_two_processes(runs):
  root = runs["root"]
  script = root / "restore_helper.py"
  script.write_text(HELPER.format(tests=os.path.dirname(os.path.abspath(__file__))))
  out = str(root / "restored_in_two.npz")
  mesh = json.dumps({"data": 1, "fsdp": 4, "tensor": 2})
  logs = _launch([sys.executable, str(script), runs["one"], "3", mesh, out], str(root / "helper_logs"), 2, 4,
                 timeout=120)
  assert all("restored on 2 processes" in log for log in logs)
  restored = dict(np.load(out))
  _assert_params_close(restored, _saved_params(runs["one"], 3), rtol=0, atol=0,
                       what="1-process checkpoint restored in 2 processes")
  _assert_params_close(restored, _saved_params(runs["two"], 3), rtol=1e-4, atol=2e-6, what="vs 2-process run")


def test_resume_under_another_process_count_positions_the_iterator(runs, tmp_path):
  # The iterator state is saved per process count (process_<i>-of-2.json); a 1-process resume restores the train
  # state alone and positions its iterator at the restored step, which is exact since global batch k is the same
  # for any process count. Resuming the 2-process run at step 3 in 1 process must end like the 1-process run.
  wd = str(tmp_path / "copy")
  shutil.copytree(runs["two"], wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints", "3", "data_iter"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  shutil.rmtree(os.path.join(wd, "checkpoints", str(STEPS)))
  # Refused unless asked for: the iterator state was written for another process count.
  refused = _train(wd, 1, 8)
  while refused.running():
    time.sleep(0.2)
  assert refused.failure() == "process 0 exited with 1"
  assert "process_count: 2 in the checkpoint's iterator state, 1 now" in refused.logs()[0]
  assert "--config.allow_resume_changes=process_count" in refused.logs()[0]
  job = _train(wd, 1, 8, "--config.allow_resume_changes=process_count")
  _wait(job)
  log = job.logs()[0]
  assert "no data-iterator state for 1 processes; positioning the iterator at batch 3" in log
  _assert_params_close(_saved_params(wd, STEPS), _saved_params(runs["one"], STEPS), rtol=1e-4, atol=2e-6,
                       what="2-process run resumed in 1 process vs the 1-process run")


def _row_keys(batch) -> list[bytes]:
  return [batch["audio"][i].tobytes() + batch["visual"][i].tobytes() for i in range(len(batch["audio"]))]


def _global_batches(process_count: int, steps: int = 4) -> list[list[bytes]]:
  """Each step's global batch as the trainer assembles it: process 0's local rows first, then process 1's."""
  its = [iter(input_pipeline.make_dataset(config_lib.SAMPLE, split="train", global_batch_size=8, seed=0,
                                          max_tokens=8, process_index=p, process_count=process_count))
         for p in range(process_count)]
  return [sum((_row_keys(next(it)) for it in its), []) for _ in range(steps)]


def test_global_batch_holds_the_same_clips_as_one_process():
  one, two = _global_batches(1), _global_batches(2)
  for a, b in zip(one, two):
    assert a == b  # The same clips, the same random crops, in the same order.


def test_global_batch_order_equals_one_process():
  assert _global_batches(1) == _global_batches(2)
