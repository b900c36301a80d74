"""Launcher tests (launch/tpu_vm.py, launch/gpu_cluster.py), without network access.

Dry-run output is parsed back with shlex and compared flag by flag. The remote shell text (what `ssh` or
`gcloud ... ssh --command=` runs on a worker) and the sbatch script are executed here with bash, with stand-ins
for python / srun / scontrol on PATH, to check that configs and overrides with spaces, quotes, `$` and `;` reach
the training process unchanged, that the distributed environment variables are right, and that the pid-file
guard and stop commands act on real processes. The relaunch loop's decisions are checked on state sequences.
"""

import io
import inspect
import os
import re
import shlex
import signal
import subprocess
import time

import pytest

from launch import common, gpu_cluster, tpu_vm

REPO = common.REPO
TRICKY_CONFIG = "configs/my runs/finetune $x;'q'.py:tiny"
TRICKY_EXTRA = ["--config.data.train=/data/a b;c", "--config.note=it's \"quoted\" $HOME `x`"]


def _no_runner(argv, capture=False):
  raise AssertionError(f"a dry run must not execute anything: {argv}")


def _dry(module, argv):
  out = io.StringIO()
  argv = list(argv)
  i = argv.index("--") if "--" in argv else len(argv)  # flags after "--" belong to avt_jax.main
  rc = module.main(argv[:i] + ["--dry_run"] + argv[i:], runner=_no_runner, out=out)
  assert rc == 0
  return [line for line in out.getvalue().splitlines()]


def _commands(lines):
  return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def _flags(argv):
  """{--name: value} of `--name=value` words, {--name: True} for bare flags."""
  out = {}
  for a in argv:
    if a.startswith("--"):
      k, sep, v = a.partition("=")
      out[k] = v if sep else True
  return out


def _pinned_jax():
  with open(os.path.join(REPO, "requirements.txt")) as f:
    return re.search(r"^jax==(\S+)$", f.read(), re.M).group(1)


# ----------------------------------------------------------------------------------------------------------------
# A stand-in python that records its arguments (NUL-separated) and selected environment variables.

FAKE_PYTHON = """#!/bin/bash
out="${FAKE_OUT:?}"
printf 'AVT_COORDINATOR=%s\\nAVT_NUM_PROCESSES=%s\\nAVT_PROCESS_ID=%s\\n' \\
  "${AVT_COORDINATOR-}" "${AVT_NUM_PROCESSES-}" "${AVT_PROCESS_ID-}" > "$out.env.$$"
printf 'XLA_FLAGS=%s\\nJAX_LOCAL_DEVICE_IDS=%s\\nPWD=%s\\n' "${XLA_FLAGS-}" "${JAX_LOCAL_DEVICE_IDS-}" "$PWD" \\
  >> "$out.env.$$"
printf '%s\\0' "$@" > "$out.tmp.$$" && mv "$out.tmp.$$" "$out.argv.$$"  # last, complete: marks the record done
if [ "$1" = "-c" ]; then exit "${FAKE_C_EXIT:-1}"; fi
sleep "${FAKE_SLEEP:-0}"
"""


def _make_exe(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)


def _recorded(out_prefix):
  """[(argv, env dict)] of every fake-python invocation, in pid order."""
  d, base = os.path.split(out_prefix)
  runs = []
  for name in sorted(os.listdir(d)):
    if name.startswith(base + ".argv."):
      pid = name.rsplit(".", 1)[1]
      with open(os.path.join(d, name), "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0")[:-1]]
      with open(os.path.join(d, f"{base}.env.{pid}")) as f:
        env = dict(line.rstrip("\n").split("=", 1) for line in f)
      runs.append((argv, env))
  return runs


def _wait_for(predicate, timeout=10.0):
  t0 = time.time()
  while not predicate():
    assert time.time() - t0 < timeout, "timed out"
    time.sleep(0.02)


def _bash(script, env, cwd=None, timeout=30):
  return subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fake_home(tmp_path):
  """A $HOME with the project dir and a virtualenv whose python is the stand-in."""
  home = tmp_path / "home"
  (home / "avt_jax").mkdir(parents=True)
  _make_exe(str(home / "avt_venv" / "bin" / "python"), FAKE_PYTHON)
  env = {"HOME": str(home), "PATH": os.environ["PATH"], "FAKE_OUT": str(tmp_path / "rec")}
  return home, env, str(tmp_path / "rec")


# ----------------------------------------------------------------------------------------------------------------
# launch/tpu_vm.py
# ----------------------------------------------------------------------------------------------------------------


def test_create_node_spot():
  (cmd,) = _commands(_dry(tpu_vm, ["create", "--name=avt-v4", "--zone=us-central2-b", "--accelerator_type=v4-32",
                                   "--spot", "--project=my-proj"]))
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "avt-v4"]
  assert _flags(cmd[6:]) == {"--zone": "us-central2-b", "--project": "my-proj", "--accelerator-type": "v4-32",
                             "--version": "tpu-ubuntu2204-base", "--spot": True}


def test_create_queued_resource():
  (cmd,) = _commands(_dry(tpu_vm, ["create", "--name=avt-v5e", "--zone=us-west4-a", "--accelerator_type=v5litepod-16",
                                   "--queued", "--spot"]))
  assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "avt-v5e-qr"]
  # Queued resources take --runtime-version (the node API takes --version) and name the node with --node-id.
  assert _flags(cmd[6:]) == {"--zone": "us-west4-a", "--node-id": "avt-v5e", "--accelerator-type": "v5litepod-16",
                             "--runtime-version": "v2-alpha-tpuv5-lite", "--spot": True}


def test_create_preemptible_and_errors(capsys):
  (cmd,) = _commands(_dry(tpu_vm, ["create", "--name=a", "--zone=z", "--accelerator_type=v5p-8", "--preemptible",
                                   "--version=custom-v"]))
  assert _flags(cmd[6:]) == {"--zone": "z", "--accelerator-type": "v5p-8", "--version": "custom-v",
                             "--preemptible": True}
  assert tpu_vm.main(["create", "--name=a", "--zone=z", "--accelerator_type=v5p-8", "--preemptible", "--queued",
                      "--dry_run"], runner=_no_runner) == 1
  assert "--spot, not --preemptible" in capsys.readouterr().err
  assert tpu_vm.main(["create", "--name=a", "--zone=z", "--accelerator_type=x9-8", "--dry_run"], runner=_no_runner) == 1
  assert "give --version" in capsys.readouterr().err
  assert tpu_vm.main(["create", "--name=a b", "--zone=z", "--accelerator_type=v4-8", "--dry_run"],
                     runner=_no_runner) == 1


@pytest.mark.parametrize("accel,version", [("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v5p-128", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_default_runtime_versions(accel, version):
  assert tpu_vm.default_runtime_version(accel) == version


def _remote_of(cmd):
  (remote,) = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
  return remote


def test_setup_copies_tree_and_installs_on_all_workers(tmp_path):
  tar, scp, ssh = _commands(_dry(tpu_vm, ["setup", "--name=avt", "--zone=z"]))
  assert tar[0] == "tar" and tar[1] == "-czf" and tar[-3:] == ["-C", REPO, "."]
  assert "--exclude=./.git" in tar and "--exclude=./runs" in tar
  archive = tar[2]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [archive, "avt:avt_jax_src.tar.gz"]
  assert _flags(scp[7:]) == {"--zone": "z", "--worker": "all"}
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "avt"]
  assert _flags(ssh[6:])["--worker"] == "all"
  words = shlex.split(_remote_of(ssh))
  assert words[:3] == ["mkdir", "-p", "$HOME/avt_jax"]
  i = words.index("install", words.index("install") + 1)  # the second pip install: the project
  assert words[i:i + 4] == ["install", "-r", "$HOME/avt_jax/requirements.txt", f"jax[tpu]=={_pinned_jax()}"]

  # The tar command, run for real on this repository into tmp, packs the project without .git.
  tar[2] = str(tmp_path / "src.tgz")
  subprocess.run(tar, check=True, timeout=60)
  names = subprocess.run(["tar", "-tzf", tar[2]], check=True, capture_output=True, text=True).stdout.split()
  assert "./requirements.txt" in names and "./avt_jax/main.py" in names
  assert not any(n.startswith("./.git/") for n in names)


def test_setup_from_git():
  (ssh,) = _commands(_dry(tpu_vm, ["setup", "--name=avt", "--zone=z", "--git_url=https://example.org/avt.git",
                                   "--branch=main"]))
  words = shlex.split(_remote_of(ssh))
  assert words[:5] == ["git", "clone", "--depth=1", "--branch=main", "https://example.org/avt.git"]


def test_run_quoting_reaches_the_process_unchanged(fake_home):
  home, env, rec = fake_home
  (cmd,) = _commands(_dry(tpu_vm, ["run", "--name=avt", "--zone=us-central2-b", f"--config={TRICKY_CONFIG}",
                                   "--workdir=gs://bucket/runs/pre train/", "--env=XLA_FLAGS=--a=1 --b='2'",
                                   "--", *TRICKY_EXTRA]))
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "avt"]
  assert _flags(cmd[6:8]) == {"--zone": "us-central2-b", "--worker": "all"}
  result = _bash(_remote_of(cmd), env)
  assert result.returncode == 0, result.stderr
  _wait_for(lambda: len(_recorded(rec)) == 1)
  argv, penv = _recorded(rec)[0]
  assert argv == ["-m", "avt_jax.main", f"--config={TRICKY_CONFIG}", "--workdir=gs://bucket/runs/pre train",
                  *TRICKY_EXTRA]
  assert penv["XLA_FLAGS"] == "--a=1 --b='2'"
  assert penv["PWD"] == str(home / "avt_jax")
  assert (home / "avt_jax" / "avt_jax_run.pid").exists() and (home / "avt_jax" / "avt_jax_run.log").exists()


def test_run_refuses_local_workdir_and_bad_extra_args(capsys):
  base = ["run", "--name=avt", "--zone=z", "--config=configs/pretrain.py", "--dry_run"]
  assert tpu_vm.main(base + ["--workdir=/tmp/run"], runner=_no_runner) == 1
  assert "gs://" in capsys.readouterr().err
  assert tpu_vm.main(base + ["--workdir=/tmp/run", "--allow_local_workdir"], runner=_no_runner, out=io.StringIO()) == 0
  assert tpu_vm.main(base + ["--workdir=gs://b/r", "--", "positional"], runner=_no_runner) == 1
  assert "must be flags" in capsys.readouterr().err
  assert tpu_vm.main(base + ["--workdir=gs://b/r", "--", "--workdir=gs://other"], runner=_no_runner) == 1


def test_run_twice_starts_one_process_and_stop_sends_sigterm(fake_home):
  home, env, rec = fake_home
  env = dict(env, FAKE_SLEEP="30")
  (run,) = _commands(_dry(tpu_vm, ["run", "--name=avt", "--zone=z", "--config=c.py", "--workdir=gs://b/r"]))
  (stop,) = _commands(_dry(tpu_vm, ["stop", "--name=avt", "--zone=z"]))
  assert _flags(stop[6:]) == {"--zone": "z", "--worker": "all", "--command": _remote_of(stop)}
  pidfile = home / "avt_jax" / "avt_jax_run.pid"
  assert _bash(_remote_of(run), env).returncode == 0
  _wait_for(lambda: len(_recorded(rec)) == 1)
  pid = int(pidfile.read_text())
  second = _bash(_remote_of(run), env)
  assert second.returncode == 0 and "already running" in second.stderr
  time.sleep(0.2)
  assert len(_recorded(rec)) == 1 and int(pidfile.read_text()) == pid
  try:
    assert _bash(_remote_of(stop), env).returncode == 0
    _wait_for(lambda: subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0)
  finally:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def test_logs_and_delete():
  (logs,) = _commands(_dry(tpu_vm, ["logs", "--name=avt", "--zone=z", "--worker=3", "--lines=50", "--follow",
                                    "--remote_dir=/opt/avt jax"]))
  assert _flags(logs[6:])["--worker"] == "3"
  assert shlex.split(_remote_of(logs)) == ["tail", "-n", "50", "-f", "/opt/avt jax/avt_jax_run.log"]
  (node,) = _commands(_dry(tpu_vm, ["delete", "--name=avt", "--zone=z"]))
  assert node == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "avt", "--zone=z", "--quiet"]
  (qr,) = _commands(_dry(tpu_vm, ["delete", "--name=avt", "--zone=z", "--queued", "--project=p"]))
  assert qr == ["gcloud", "compute", "tpus", "queued-resources", "delete", "avt-qr", "--zone=z", "--project=p",
                "--force", "--quiet"]


WATCH = ["watch", "--name=avt", "--zone=z", "--accelerator_type=v4-32", "--spot", "--config=configs/pretrain.py",
         "--workdir=gs://b/run"]


def test_watch_dry_run_lists_poll_and_relaunch_commands():
  lines = _dry(tpu_vm, WATCH)
  cmds = _commands(lines)
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "avt", "--zone=z", "--format=value(state)"]
  assert cmds[1] == ["gcloud", "storage", "ls", "gs://b/run/final_metrics.json"]
  i = lines.index(next(line for line in lines if line.startswith("# recreate")))
  delete, create = shlex.split(lines[i + 1]), shlex.split(lines[i + 2])
  assert delete[4] == "delete" and create[4] == "create" and "--spot" in create
  queued = _commands(_dry(tpu_vm, WATCH + ["--queued"]))
  assert queued[0] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "avt-qr", "--zone=z",
                       "--format=value(state.state)"]


def test_decide_on_state_sequences():
  S = tpu_vm
  node = ["NOT_FOUND", "CREATING", "READY", "READY", "PREEMPTED", "DELETING", "CREATING", "READY", "READY"]
  assert S.simulate(node, finished=[False] * 8 + [True]) == [
      "create", "wait", "launch", "wait", "recreate", "wait", "wait", "launch", "done"]
  assert S.simulate(["READY", "TERMINATED", "REPAIRING", "READY"]) == ["launch", "recreate", "wait", "launch"]
  qr = ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "ACTIVE", "SUSPENDING", "SUSPENDED", "ACCEPTED", "ACTIVE",
        "FAILED", "NOT_FOUND"]
  assert S.simulate(qr, queued=True) == ["wait", "wait", "launch", "wait", "wait", "recreate", "wait", "launch",
                                         "recreate", "create"]
  # Node states mean nothing for a queued resource and vice versa.
  assert S.simulate(["READY", "PREEMPTED"], queued=True) == ["wait", "wait"]
  assert S.simulate(["ACTIVE", "SUSPENDED"]) == ["wait", "wait"]
  # A finished run is done whatever the slice does; a gone process is restarted only when it was checked.
  assert S.simulate(["PREEMPTED"], finished=[True]) == ["done"]
  assert S.simulate(["READY", "READY", "READY", "READY"], alive=[None, None, False, True]) == [
      "launch", "wait", "restart", "wait"]
  assert S.decide(" ready\n", launched=False, finished=False, queued=False) == "launch"
  w = S.Watcher(queued=False, max_recreates=2)
  for _ in range(2):
    assert w.step("PREEMPTED", False) == "recreate"
  with pytest.raises(common.LaunchError, match="max_recreates"):
    w.step("PREEMPTED", False)


class _FakeCloud:
  """Answers describe / storage ls from scripted states; records everything else."""

  def __init__(self, states, finished_after, failing_creates=0):
    self.states, self.finished_after, self.calls, self.polls = list(states), finished_after, [], 0
    self.failing_creates = failing_creates

  def __call__(self, argv, capture=False):
    argv = list(argv)
    self.calls.append(argv)
    if argv[4:5] == ["describe"]:
      state = self.states[min(self.polls, len(self.states) - 1)]
      self.polls += 1
      if state == "NOT_FOUND":
        return subprocess.CompletedProcess(argv, 1, "", "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: x")
      return subprocess.CompletedProcess(argv, 0, state + "\n", "")
    if argv[1:3] == ["storage", "ls"]:
      return subprocess.CompletedProcess(argv, 0 if self.polls > self.finished_after else 1, "", "")
    if argv[4:5] == ["create"] and self.failing_creates:
      self.failing_creates -= 1
      return subprocess.CompletedProcess(argv, 1, "", "no capacity")
    return subprocess.CompletedProcess(argv, 0, "", "")


def test_watch_loop_recreates_after_preemption_and_stops_when_finished():
  args = tpu_vm.build_parser().parse_args(WATCH + ["--poll_seconds=0"])
  args.extra = []
  cloud = _FakeCloud(["NOT_FOUND", "CREATING", "READY", "READY", "PREEMPTED", "READY", "READY"], finished_after=6)
  log = io.StringIO()
  assert tpu_vm.watch(args, runner=cloud, sleep=lambda s: None, log=log) == "done"
  acted = [c for c in cloud.calls if c[4:5] != ["describe"] and c[1:3] != ["storage", "ls"]]
  kinds = [(c[0], c[4] if c[0] == "gcloud" else "") for c in acted]
  launch = [("tar", ""), ("gcloud", "scp"), ("gcloud", "ssh"), ("gcloud", "ssh")]
  assert kinds == [("gcloud", "create")] + launch + [("gcloud", "delete"), ("gcloud", "create")] + launch
  assert "state=PREEMPTED finished=False alive=None -> recreate" in log.getvalue()
  # The training command is the same after the relaunch: the trainer resumes from the workdir.
  runs = [c for c in acted if c[0] == "gcloud" and c[4] == "ssh" and "avt_jax.main" in _remote_of(c)]
  assert len(runs) == 2 and runs[0] == runs[1]


# ----------------------------------------------------------------------------------------------------------------
# launch/gpu_cluster.py
# ----------------------------------------------------------------------------------------------------------------

SLURM = ["slurm", "--nodes=2", "--gpus_per_node=4", "--partition=gpu", "--time=24:00:00", "--cpus_per_task=16",
         f"--config={TRICKY_CONFIG}", "--workdir=gs://bucket/runs/vox2", "--python=python3"]


def _split_slurm(lines):
  i = lines.index(gpu_cluster.SUBMIT_MARKER)
  return "\n".join(lines[:i]) + "\n", _commands(lines[i + 1:])


def test_slurm_script_and_submit_command(tmp_path):
  script, cmds = _split_slurm(_dry(gpu_cluster, SLURM + ["--requeue", "--", *TRICKY_EXTRA]))
  assert cmds == [["mkdir", "-p", "logs"], ["sbatch", "logs/avt_jax.sbatch"]]
  lines = script.splitlines()
  assert lines[0] == "#!/bin/bash"
  directives = _flags([line[len("#SBATCH "):] for line in lines if line.startswith("#SBATCH ")])
  assert directives == {"--job-name": "avt_jax", "--nodes": "2", "--ntasks-per-node": "1", "--gpus-per-node": "4",
                        "--cpus-per-task": "16", "--time": "24:00:00", "--partition": "gpu",
                        "--output": "logs/%x-%j.out", "--open-mode": "append", "--signal": "TERM@120",
                        "--requeue": True}
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
  (srun,) = [shlex.split(line) for line in lines if line.startswith("srun ")]
  assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert srun[4:] == ["python3", "-m", "avt_jax.main", f"--config={TRICKY_CONFIG}", "--workdir=gs://bucket/runs/vox2",
                      *TRICKY_EXTRA]
  path = tmp_path / "job.sbatch"
  path.write_text(script)
  assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_slurm_script_runs_with_stand_in_srun(tmp_path):
  """The script, executed by bash with fake srun / python3 / scontrol: argv, env, exit status and the requeue."""
  bin_dir = tmp_path / "bin"
  _make_exe(str(bin_dir / "python3"), FAKE_PYTHON)
  # srun: drop its own options, run the program (as SLURM would on each node).
  _make_exe(str(bin_dir / "srun"), '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
  _make_exe(str(bin_dir / "scontrol"), f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.calls\n')
  repo = tmp_path / "repo dir"
  repo.mkdir()
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(tmp_path / "rec"), "SLURM_JOB_ID": "4242",
         "HOME": str(tmp_path)}
  script, _ = _split_slurm(_dry(gpu_cluster, SLURM + [f"--repo_dir={repo}", "--requeue_until_done",
                                                       "--setup=export XLA_FLAGS=--x=1", "--", *TRICKY_EXTRA]))
  path = tmp_path / "job.sbatch"
  path.write_text(script)
  result = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  runs = _recorded(str(tmp_path / "rec"))
  (train,) = [r for r in runs if r[0][:2] == ["-m", "avt_jax.main"]]
  assert train[0][2:] == [f"--config={TRICKY_CONFIG}", "--workdir=gs://bucket/runs/vox2", *TRICKY_EXTRA]
  assert train[1]["PWD"] == str(repo) and train[1]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  assert train[1]["XLA_FLAGS"] == "--x=1"
  (check,) = [r for r in runs if r[0][0] == "-c"]
  assert check[0][2] == "gs://bucket/runs/vox2"
  # The run is not finished (the check exits 1): the job requeues itself.
  assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]


def test_slurm_single_gpu_errors_and_submission(tmp_path, capsys):
  script, _ = _split_slurm(_dry(gpu_cluster, ["slurm", "--nodes=1", "--gpus_per_node=1", "--config=c.py",
                                              "--workdir=/w", "--signal_seconds=0"]))
  assert "JAX_LOCAL_DEVICE_IDS" not in script and "--signal" not in script and "--requeue" not in script
  assert gpu_cluster.main(["slurm", "--nodes=1", "--config=c.py", "--workdir=/w", "--partition=a b", "--dry_run"],
                          runner=_no_runner) == 1
  assert "--partition" in capsys.readouterr().err
  calls = []
  script_path = tmp_path / "sub" / "job.sbatch"
  rc = gpu_cluster.main(SLURM + [f"--script={script_path}", f"--log_dir={tmp_path}/logs"],
                        runner=lambda c, capture=False: calls.append(list(c)) or subprocess.CompletedProcess(c, 0))
  assert rc == 0
  assert calls == [["mkdir", "-p", f"{tmp_path}/logs"], ["sbatch", str(script_path)]]
  assert script_path.read_text().startswith("#!/bin/bash\n#SBATCH --job-name=avt_jax")
  # A second submission replaces the script whole (records.write_atomic): no temporary file is left beside it.
  script_path.write_text("old script")
  rc = gpu_cluster.main(SLURM + [f"--script={script_path}", f"--log_dir={tmp_path}/logs", "--job_name=second"],
                        runner=lambda c, capture=False: subprocess.CompletedProcess(c, 0))
  assert rc == 0 and "#SBATCH --job-name=second" in script_path.read_text()
  assert os.listdir(script_path.parent) == ["job.sbatch"]


def test_relative_workdirs(tmp_path, monkeypatch, capsys):
  """slurm: a relative --workdir is taken from the directory sbatch runs in (the job starts in --repo_dir); ssh and
  the TPU VM start the trainer on other machines, where it would mean another directory: refused, nothing run."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  for given, expected in (("runs/x", tmp_path / "runs" / "x"), ("~/runs/y", tmp_path / "home" / "runs" / "y")):
    script, _ = _split_slurm(_dry(gpu_cluster, ["slurm", "--nodes=1", "--gpus_per_node=1", "--config=c.py",
                                                f"--workdir={given}", "--requeue_until_done"]))
    (srun,) = [shlex.split(line) for line in script.splitlines() if line.startswith("srun ")]
    assert srun[-1] == f"--workdir={expected}"
    (check,) = [line for line in script.splitlines() if line.startswith("if [")]
    assert check.endswith(f" {shlex.quote(str(expected))}; then")  # the requeue check looks at the same place
  script, _ = _split_slurm(_dry(gpu_cluster, ["slurm", "--nodes=1", "--config=c.py", "--workdir=gs://b/r"]))
  assert "--workdir=gs://b/r" in script
  assert gpu_cluster.main(["ssh", "--hosts=h0,h1", "--config=c.py", "--workdir=runs/x", "--dry_run"],
                          runner=_no_runner, out=io.StringIO()) == 1
  assert capsys.readouterr().err == ("error: --workdir='runs/x': expected an absolute path or a gs:// URL (each host "
                                     "starts the trainer in --repo_dir, so a relative path would be taken from "
                                     "there, not from this directory)\n")
  out = io.StringIO()
  assert tpu_vm.main(["run", "--name=avt", "--zone=z", "--config=c.py", "--workdir=runs/x", "--allow_local_workdir",
                      "--dry_run"], runner=_no_runner, out=out) == 1
  assert capsys.readouterr().err == ("error: --workdir='runs/x': expected an absolute path or a gs:// URL (a local "
                                     "workdir is a path on the worker, where a relative one would be taken from "
                                     "--remote_dir)\n")
  assert out.getvalue() == "" and os.listdir(tmp_path) == []  # dry runs and refusals write nothing


def test_ssh_launch_one_process_per_host(tmp_path):
  hosts = ["alice@gpu-a", "gpu-b", "gpu-c"]
  repo = tmp_path / "shared repo"
  repo.mkdir()
  python = tmp_path / "venv" / "bin" / "python"
  _make_exe(str(python), FAKE_PYTHON)
  cmds = _commands(_dry(gpu_cluster, ["ssh", f"--hosts={','.join(hosts)}", "--port=9999", f"--repo_dir={repo}",
                                      f"--python={python}", f"--config={TRICKY_CONFIG}", "--workdir=/shared/w",
                                      "--ssh_option=Port=2222", "--", *TRICKY_EXTRA]))
  assert len(cmds) == 3
  env = {"PATH": os.environ["PATH"], "FAKE_OUT": str(tmp_path / "rec"), "HOME": str(tmp_path)}
  for i, (cmd, host) in enumerate(zip(cmds, hosts)):
    assert cmd[:4] == ["ssh", "-o", "Port=2222", host] and len(cmd) == 5
    assert _bash(cmd[4], env).returncode == 0  # what the remote shell runs
  _wait_for(lambda: len(_recorded(str(tmp_path / "rec"))) == 3)
  runs = sorted(_recorded(str(tmp_path / "rec")), key=lambda r: int(r[1]["AVT_PROCESS_ID"]))
  for i, (argv, penv) in enumerate(runs):
    assert argv == ["-m", "avt_jax.main", f"--config={TRICKY_CONFIG}", "--workdir=/shared/w", *TRICKY_EXTRA]
    assert (penv["AVT_COORDINATOR"], penv["AVT_NUM_PROCESSES"], penv["AVT_PROCESS_ID"]) == ("gpu-a:9999", "3", str(i))
    assert penv["PWD"] == str(repo)
    assert (repo / f"avt_jax_run_{i}.log").exists() and (repo / f"avt_jax_run_{i}.pid").exists()


def test_ssh_stop_logs_and_errors(capsys):
  stop = _commands(_dry(gpu_cluster, ["ssh_stop", "--hosts=h0,h1", "--repo_dir=/r x"]))
  assert [c[:2] for c in stop] == [["ssh", "h0"], ["ssh", "h1"]]
  assert "kill -TERM" in stop[1][2] and "'/r x/avt_jax_run_1.pid'" in stop[1][2]
  (logs,) = _commands(_dry(gpu_cluster, ["ssh_logs", "--hosts=h0,h1", "--repo_dir=/r", "--process=1", "--lines=7"]))
  assert logs[:2] == ["ssh", "h1"] and shlex.split(logs[2]) == ["tail", "-n", "7", "/r/avt_jax_run_1.log"]
  assert gpu_cluster.main(["ssh", "--hosts=h0,h0", "--config=c", "--workdir=/w", "--dry_run"], runner=_no_runner) == 1
  assert "duplicates" in capsys.readouterr().err
  assert gpu_cluster.main(["ssh", "--config=c", "--workdir=/w", "--dry_run"], runner=_no_runner) == 1


def test_jax_reads_local_device_ids_from_the_environment():
  """The sbatch script relies on JAX_LOCAL_DEVICE_IDS taking precedence over SLURM_LOCALID in this jax version."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  assert "JAX_LOCAL_DEVICE_IDS" in inspect.getsource(distributed)


def test_watch_loop_retries_a_failed_create_and_gives_up_after_max_failures():
  args = tpu_vm.build_parser().parse_args(WATCH + ["--poll_seconds=0", "--max_failures=3"])
  args.extra = []
  cloud = _FakeCloud(["NOT_FOUND", "NOT_FOUND", "READY"], finished_after=3, failing_creates=1)
  log = io.StringIO()
  assert tpu_vm.watch(args, runner=cloud, sleep=lambda s: None, log=log) == "done"
  assert sum(c[4:5] == ["create"] for c in cloud.calls) == 2
  assert "create failed (1 in a row)" in log.getvalue()
  cloud = _FakeCloud(["NOT_FOUND"], finished_after=99, failing_creates=99)
  with pytest.raises(common.LaunchError, match="3 actions in a row failed"):
    tpu_vm.watch(args, runner=cloud, sleep=lambda s: None, log=io.StringIO())
