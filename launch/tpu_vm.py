r"""Cloud TPU VM launcher: create a slice, install the project on every worker, start training, follow the log,
relaunch after preemption, delete.

  python -m launch.tpu_vm create --name=avt-v4 --zone=us-central2-b --accelerator_type=v4-32 --spot [--queued]
  python -m launch.tpu_vm setup  --name=avt-v4 --zone=us-central2-b
  python -m launch.tpu_vm run    --name=avt-v4 --zone=us-central2-b --config=configs/pretrain.py:voxceleb2 \
      --workdir=gs://my-bucket/runs/pretrain_vox2 -- --config.mesh.fsdp=4
  python -m launch.tpu_vm logs   --name=avt-v4 --zone=us-central2-b [--worker=0] [--lines=100] [--follow]
  python -m launch.tpu_vm stop   --name=avt-v4 --zone=us-central2-b          # SIGTERM: checkpoint and exit
  python -m launch.tpu_vm watch  --name=avt-v4 --zone=us-central2-b --accelerator_type=v4-32 --spot \
      --config=configs/pretrain.py:voxceleb2 --workdir=gs://my-bucket/runs/pretrain_vox2
  python -m launch.tpu_vm delete --name=avt-v4 --zone=us-central2-b

Every subcommand takes --dry_run: the gcloud (and tar) commands are printed, one per line, instead of run. Flags
after `--` are passed to `python -m avt_jax.main` on every worker. With --queued the slice is a queued resource
(`gcloud compute tpus queued-resources create <name>-qr --node-id=<name>`); ssh and scp address its node by name.

Every worker runs the same command; `jax.distributed.initialize()` finds the slice's workers from the TPU VM
metadata. The workdir must be shared by all workers (a gs:// bucket; a local path is refused unless
--allow_local_workdir, and must then be absolute: it is a path on the worker). The trainer resumes from the
newest checkpoint in the workdir, so `watch` only has to bring the slice back and start the same command: it polls the slice state, and when the slice was preempted
(node: PREEMPTED / TERMINATED; queued resource: SUSPENDED / FAILED) it deletes and recreates it, installs the
project again and restarts training. It stops when <workdir>/final_metrics.json exists. The decision logic is
the pure function `decide` (tested on state sequences).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
import time
from typing import Callable, Sequence

from launch import common
from launch.common import LaunchError, home_path, q

GCLOUD = "gcloud"
PIDFILE = "avt_jax_run.pid"
ARCHIVE = "avt_jax_src.tar.gz"

# TPU software (runtime) versions for JAX, per TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = (("v6e", "v2-alpha-tpuv6e"), ("v5p", "v2-alpha-tpuv5"), ("v5litepod", "v2-alpha-tpuv5-lite"),
                    ("v5e", "v2-alpha-tpuv5-lite"), ("v4", "tpu-ubuntu2204-base"), ("v3", "tpu-ubuntu2204-base"),
                    ("v2", "tpu-ubuntu2204-base"))


def default_runtime_version(accelerator_type: str) -> str:
  for prefix, version in RUNTIME_VERSIONS:
    if accelerator_type.startswith(prefix + "-"):
      return version
  raise LaunchError(f"--accelerator_type={accelerator_type!r}: no default TPU software version known; give --version")


def jax_tpu_requirement(requirements: str = os.path.join(common.REPO, "requirements.txt")) -> str:
  """`jax[tpu]==<the pinned jax version>` from requirements.txt (unpinned if the file has no jax pin)."""
  try:
    with open(requirements) as f:
      for line in f:
        m = re.match(r"^\s*jax\s*==\s*([\w.]+)", line)
        if m:
          return f"jax[tpu]=={m.group(1)}"
  except FileNotFoundError:
    pass
  return "jax[tpu]"


# ----------------------------------------------------------------------------------------------------------------
# The slice and its commands.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU VM (node) or a queued resource holding one node named `name`."""
  name: str
  zone: str
  project: str = ""
  queued: bool = False
  queued_resource_id: str = ""  # default: <name>-qr

  @property
  def qr(self) -> str:
    return self.queued_resource_id or f"{self.name}-qr"

  def scope(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def create_command(s: Slice, accelerator_type: str, version: str = "", spot: bool = False,
                   preemptible: bool = False) -> list[str]:
  version = version or default_runtime_version(accelerator_type)
  if spot and preemptible:
    raise LaunchError("give at most one of --spot and --preemptible")
  if s.queued:
    if preemptible:
      raise LaunchError("queued resources take --spot, not --preemptible")
    cmd = [GCLOUD, "compute", "tpus", "queued-resources", "create", s.qr, *s.scope(), f"--node-id={s.name}",
           f"--accelerator-type={accelerator_type}", f"--runtime-version={version}"]
  else:
    cmd = [GCLOUD, "compute", "tpus", "tpu-vm", "create", s.name, *s.scope(),
           f"--accelerator-type={accelerator_type}", f"--version={version}"]
  if spot:
    cmd.append("--spot")
  if preemptible:
    cmd.append("--preemptible")
  return cmd


def delete_command(s: Slice) -> list[str]:
  if s.queued:  # --force deletes the node first.
    return [GCLOUD, "compute", "tpus", "queued-resources", "delete", s.qr, *s.scope(), "--force", "--quiet"]
  return [GCLOUD, "compute", "tpus", "tpu-vm", "delete", s.name, *s.scope(), "--quiet"]


def describe_command(s: Slice) -> list[str]:
  if s.queued:
    return [GCLOUD, "compute", "tpus", "queued-resources", "describe", s.qr, *s.scope(),
            "--format=value(state.state)"]
  return [GCLOUD, "compute", "tpus", "tpu-vm", "describe", s.name, *s.scope(), "--format=value(state)"]


def ssh_command(s: Slice, remote: str, worker: str = "all") -> list[str]:
  return [GCLOUD, "compute", "tpus", "tpu-vm", "ssh", s.name, *s.scope(), f"--worker={worker}",
          f"--command={remote}"]


def scp_command(s: Slice, local: str, remote: str, worker: str = "all") -> list[str]:
  return [GCLOUD, "compute", "tpus", "tpu-vm", "scp", local, f"{s.name}:{remote}", *s.scope(), f"--worker={worker}"]


@dataclasses.dataclass(frozen=True)
class Remote:
  """Where the project lives on each worker (paths relative to the remote $HOME unless absolute)."""
  dir: str = "avt_jax"
  venv: str = "avt_venv"
  python: str = "python3"  # interpreter that creates the virtualenv
  log: str = "avt_jax_run.log"  # relative to `dir` unless absolute

  @property
  def python_bin(self) -> str:
    return home_path(self.venv.rstrip("/") + "/bin/python")

  def path(self, name: str) -> str:
    return q(name) if name.startswith("/") else home_path(self.dir.rstrip("/") + "/" + name)


def setup_commands(s: Slice, remote: Remote = Remote(), git_url: str = "", branch: str = "", local_archive: str = "",
                   repo: str = common.REPO, extra_packages: Sequence[str] = ()) -> list[list[str]]:
  """Commands that put the project and its environment on every worker.

  Default: pack the local tree (without .git, runs, virtualenvs and caches), copy it to every worker and unpack it
  into `remote.dir`. With `git_url`: clone (or fast-forward) the repository on every worker instead. Then create
  the virtualenv and install requirements.txt plus jax[tpu] at the pinned jax version.
  """
  d = home_path(remote.dir)
  cmds: list[list[str]] = []
  if git_url:
    clone = ["git", "clone", "--depth=1", *([f"--branch={branch}"] if branch else []), git_url]
    fetch = f"{shlex.join(clone)} {d} || git -C {d} pull --ff-only"
  else:
    local_archive = local_archive or os.path.join("/tmp", f"{ARCHIVE[:-7]}_{s.name}.tar.gz")
    cmds.append(["tar", "-czf", local_archive, "--exclude=./.git", "--exclude=./runs", "--exclude=./venv",
                 "--exclude=./.venv", "--exclude=__pycache__", "--exclude=*.pyc", "-C", repo, "."])
    cmds.append(scp_command(s, local_archive, ARCHIVE))
    fetch = f"mkdir -p {d} && tar -xzf {home_path(ARCHIVE)} -C {d}"
  packages = " ".join(q(p) for p in (jax_tpu_requirement(), *extra_packages))
  install = (f"{q(remote.python)} -m venv {home_path(remote.venv)} && "
             f"{remote.python_bin} -m pip install --upgrade pip && "
             f"{remote.python_bin} -m pip install -r {d}/requirements.txt {packages}")
  cmds.append(ssh_command(s, f"{fetch} && {install}"))
  return cmds


def check_workdir(workdir: str, allow_local: bool) -> str:
  if not workdir:
    raise LaunchError("--workdir is required")
  if not workdir.startswith("gs://") and not allow_local:
    raise LaunchError(f"--workdir={workdir!r}: every worker of a slice must see the same checkpoints; use a "
                      f"gs:// bucket (or --allow_local_workdir for a single-host slice)")
  common.require_absolute(workdir, "--workdir", "a local workdir is a path on the worker, where a relative one "
                          "would be taken from --remote_dir")
  return workdir.rstrip("/") if workdir.startswith("gs://") else workdir


parse_env = common.parse_env


def start_script(remote: Remote, argv: Sequence[str], env: Sequence[tuple[str, str]] = ()) -> str:
  """Remote shell text that starts `argv` (argv[0] replaced by the virtualenv's python) in the background in
  `remote.dir`, appending to the log (a relaunch after preemption continues the same file)."""
  cmd = " ".join([remote.python_bin] + [q(a) for a in argv[1:]])
  return common.background_script(home_path(remote.dir), cmd, remote.log, PIDFILE, env)


def run_command(s: Slice, config: str, workdir: str, extra: Sequence[str] = (), remote: Remote = Remote(),
                env: Sequence[tuple[str, str]] = ()) -> list[str]:
  argv = common.main_argv("python", config, workdir, extra)
  return ssh_command(s, start_script(remote, argv, env))


def stop_command(s: Slice, remote: Remote = Remote(), signal_name: str = "TERM") -> list[str]:
  pid = remote.path(PIDFILE)
  return ssh_command(s, f"if [ -f {pid} ]; then kill -{signal_name} \"$(cat {pid})\" 2>/dev/null; fi; true")


def logs_command(s: Slice, remote: Remote = Remote(), worker: int = 0, lines: int = 100,
                 follow: bool = False) -> list[str]:
  return ssh_command(s, f"tail -n {int(lines)}{' -f' if follow else ''} {remote.path(remote.log)}", worker=str(worker))


def alive_command(s: Slice, remote: Remote = Remote(), worker: int = 0) -> list[str]:
  pid = remote.path(PIDFILE)
  return ssh_command(s, f"if [ -f {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; then echo alive; "
                        f"else echo dead; fi", worker=str(worker))


def finished_command(workdir: str) -> list[str]:
  return [GCLOUD, "storage", "ls", f"{workdir.rstrip('/')}/final_metrics.json"]


# ----------------------------------------------------------------------------------------------------------------
# Relaunch decisions (pure).
# ----------------------------------------------------------------------------------------------------------------

WAIT, CREATE, RECREATE, LAUNCH, RESTART, DONE = "wait", "create", "recreate", "launch", "restart", "done"

NODE_READY = ("READY",)
NODE_LOST = ("PREEMPTED", "TERMINATED", "STOPPED")
QUEUED_READY = ("ACTIVE",)
QUEUED_LOST = ("SUSPENDED", "FAILED")
NOT_FOUND = "NOT_FOUND"


def decide(state: str, *, launched: bool, finished: bool, queued: bool, alive: bool | None = None) -> str:
  """What to do about a slice in `state` (as `describe` reports it, or NOT_FOUND).

  launched: training was started on the current incarnation of the slice; finished: the workdir holds
  final_metrics.json; alive: whether the training process runs on worker 0 (None = not checked).
    finished                         -> done
    ready, not launched              -> launch (install + start training)
    ready, launched, process gone    -> restart (start training again; it resumes from the checkpoint)
    preempted / terminated / failed  -> recreate (delete, create; launched is reset)
    not found                        -> create
    anything else (creating, waiting for resources, repairing, ...) -> wait
  """
  if finished:
    return DONE
  state = (state or "").strip().upper()
  ready, lost = (QUEUED_READY, QUEUED_LOST) if queued else (NODE_READY, NODE_LOST)
  if state in ready:
    if not launched:
      return LAUNCH
    return RESTART if alive is False else WAIT
  if state in lost:
    return RECREATE
  if state == NOT_FOUND:
    return CREATE
  return WAIT


@dataclasses.dataclass
class Watcher:
  """Carries `launched` and the relaunch count across polls; `step` is pure apart from that bookkeeping."""
  queued: bool
  max_recreates: int = 20
  launched: bool = False
  recreates: int = 0

  def step(self, state: str, finished: bool, alive: bool | None = None) -> str:
    action = decide(state, launched=self.launched, finished=finished, queued=self.queued, alive=alive)
    if action in (CREATE, RECREATE):
      if action == RECREATE:
        self.recreates += 1
        if self.recreates > self.max_recreates:
          raise LaunchError(f"the slice was lost {self.recreates} times (more than --max_recreates="
                            f"{self.max_recreates}); giving up")
      self.launched = False
    elif action in (LAUNCH, RESTART):
      self.launched = True
    return action


def simulate(states: Sequence[str], finished: Sequence[bool] | None = None, queued: bool = False,
             alive: Sequence[bool | None] | None = None) -> list[str]:
  """Actions a fresh Watcher takes for a sequence of observations (for tests and for reasoning about the loop)."""
  w = Watcher(queued=queued)
  finished = finished or [False] * len(states)
  alive = alive or [None] * len(states)
  return [w.step(s, f, a) for s, f, a in zip(states, finished, alive)]


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------


def _slice(args) -> Slice:
  common.check_word(args.name, "--name")
  common.check_word(args.zone, "--zone")
  return Slice(name=args.name, zone=args.zone, project=args.project, queued=args.queued,
               queued_resource_id=args.queued_resource_id)


def _remote(args) -> Remote:
  return Remote(dir=args.remote_dir, venv=args.venv, python=args.python, log=args.log)


def action_commands(action: str, args, s: Slice, remote: Remote) -> list[list[str]]:
  """The commands of one watch action."""
  create = create_command(s, args.accelerator_type, args.version, args.spot, args.preemptible)
  setup = setup_commands(s, remote, args.git_url, args.branch)
  run = run_command(s, args.config, args.workdir, args.extra, remote, parse_env(args.env))
  return {CREATE: [create], RECREATE: [delete_command(s), create], LAUNCH: setup + [run], RESTART: [run]}.get(
      action, [])


def _observe(s: Slice, args, remote: Remote, runner: Callable, launched: bool) -> tuple[str, bool, bool | None]:
  res = runner(describe_command(s), capture=True)
  if res.returncode == 0:
    state = (res.stdout or "").strip().splitlines()[-1:] or ["UNKNOWN"]
    state = state[0].strip() or "UNKNOWN"
  else:
    err = (res.stderr or "") + (res.stdout or "")
    state = NOT_FOUND if ("NOT_FOUND" in err or "not found" in err.lower()) else "UNKNOWN"
  if args.workdir.startswith("gs://"):
    finished = runner(finished_command(args.workdir), capture=True).returncode == 0
  else:
    finished = os.path.exists(os.path.join(args.workdir, "final_metrics.json"))
  alive = None
  if args.restart_crashed and launched and not finished:
    out = runner(alive_command(s, remote), capture=True)
    text = (out.stdout or "").strip().splitlines()[-1:] if out.returncode == 0 else []
    alive = {"alive": True, "dead": False}.get(text[0].strip() if text else "", None)
  return state, finished, alive


def watch(args, runner: Callable = common.default_runner, sleep: Callable[[float], None] = time.sleep,
          log=None, max_polls: int = 0) -> str:
  """Polls and acts until the run is finished. Returns the last action (DONE, or the one at max_polls)."""
  log = log or sys.stderr
  s, remote = _slice(args), _remote(args)
  w = Watcher(queued=s.queued, max_recreates=args.max_recreates, launched=args.already_launched)
  polls = failures = 0
  while True:
    state, finished, alive = _observe(s, args, remote, runner, w.launched)
    action = w.step(state, finished, alive)
    print(f"[watch] {time.strftime('%Y-%m-%d %H:%M:%S')} state={state} finished={finished} alive={alive} "
          f"-> {action}", file=log)
    if action == DONE:
      if args.delete_when_done:
        common.run_commands([delete_command(s)], False, lambda c: runner(c))
      return action
    try:
      common.run_commands(action_commands(action, args, s, remote), False, lambda c: runner(c))
      failures = 0
    except LaunchError as e:  # e.g. no capacity for a create: the next poll decides again
      failures += 1
      print(f"[watch] {action} failed ({failures} in a row): {e}", file=log)
      if action in (LAUNCH, RESTART):
        w.launched = False
      if failures >= args.max_failures:
        raise LaunchError(f"{failures} actions in a row failed (--max_failures); last: {e}") from e
    polls += 1
    if max_polls and polls >= max_polls:
      return action
    sleep(args.poll_seconds)


def watch_plan(args) -> str:
  """The dry-run text of `watch`: the poll commands and the commands of each action."""
  s, remote = _slice(args), _remote(args)
  lost = "/".join(QUEUED_LOST if s.queued else NODE_LOST)
  ready = "/".join(QUEUED_READY if s.queued else NODE_READY)
  lines = [f"# poll every {args.poll_seconds:g} s: slice state, then whether the run has finished",
           shlex.join(describe_command(s)), shlex.join(finished_command(args.workdir))
           if args.workdir.startswith("gs://") else f"# test -f {q(args.workdir + '/final_metrics.json')}"]
  if args.restart_crashed:
    lines.append(shlex.join(alive_command(s, remote)))
  for action, when in ((CREATE, "not found"), (RECREATE, f"{lost} (preempted)"),
                       (LAUNCH, f"{ready}, training not started on this slice"),
                       (RESTART, f"{ready}, training process gone (--restart_crashed)")):
    if action == RESTART and not args.restart_crashed:
      continue
    lines.append(f"# {action}: when {when}")
    lines.extend(shlex.join(c) for c in action_commands(action, args, s, remote))
  lines.append("# done: when the workdir has final_metrics.json" +
               (f"; then {shlex.join(delete_command(s))}" if args.delete_when_done else ""))
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  def common_flags(p, training=False, creation=False):
    p.add_argument("--name", required=True, help="TPU VM (node) name.")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="", help="Google Cloud project (default: gcloud's configured project).")
    p.add_argument("--queued", action="store_true", help="The slice is (or is created as) a queued resource.")
    p.add_argument("--queued_resource_id", default="", help="Queued resource id (default <name>-qr).")
    p.add_argument("--dry_run", action="store_true", help="Print the commands instead of running them.")
    p.add_argument("--remote_dir", default="avt_jax", help="Project directory on the workers (relative: $HOME).")
    p.add_argument("--venv", default="avt_venv", help="Virtualenv on the workers (relative: $HOME).")
    p.add_argument("--python", default="python3", help="Worker interpreter that creates the virtualenv.")
    p.add_argument("--log", default="avt_jax_run.log", help="Training log on each worker (relative: remote_dir).")
    if creation:
      p.add_argument("--accelerator_type", required=True, help="e.g. v4-32, v5litepod-16.")
      p.add_argument("--version", default="", help="TPU software version (default: by TPU generation).")
      g = p.add_mutually_exclusive_group()
      g.add_argument("--spot", action="store_true")
      g.add_argument("--preemptible", action="store_true")
    if training:
      p.add_argument("--config", required=True, help="configs/<file>.py[:variant], relative to remote_dir.")
      p.add_argument("--workdir", required=True, help="Run directory shared by all workers (gs://...).")
      p.add_argument("--allow_local_workdir", action="store_true")
      p.add_argument("--env", action="append", default=[], help="NAME=VALUE set for the training process.")

  p = sub.add_parser("create", help="Create the TPU VM (or queued resource).")
  common_flags(p, creation=True)
  p = sub.add_parser("setup", help="Copy (or clone) the project to all workers and install it.")
  common_flags(p)
  p.add_argument("--git_url", default="", help="Clone this repository on the workers instead of copying the tree.")
  p.add_argument("--branch", default="")
  p = sub.add_parser("run", help="Start training on every worker (nohup, log file).")
  common_flags(p, training=True)
  p = sub.add_parser("stop", help="Send SIGTERM to the training process on every worker (checkpoint, exit).")
  common_flags(p)
  p = sub.add_parser("logs", help="Print the end of a worker's training log.")
  common_flags(p)
  p.add_argument("--worker", type=int, default=0)
  p.add_argument("--lines", type=int, default=100)
  p.add_argument("--follow", action="store_true")
  p = sub.add_parser("watch", help="Keep the run going: recreate and restart after preemption until it finishes.")
  common_flags(p, training=True, creation=True)
  p.add_argument("--git_url", default="")
  p.add_argument("--branch", default="")
  p.add_argument("--poll_seconds", type=float, default=120.0)
  p.add_argument("--max_recreates", type=int, default=20)
  p.add_argument("--max_failures", type=int, default=10, help="Give up after this many failed actions in a row.")
  p.add_argument("--restart_crashed", action="store_true",
                 help="Also restart training when its process on worker 0 is gone but the run is not finished.")
  p.add_argument("--already_launched", action="store_true",
                 help="Training already runs on the existing slice (do not install and start it again).")
  p.add_argument("--delete_when_done", action="store_true")
  p = sub.add_parser("delete", help="Delete the TPU VM (or queued resource, with its node).")
  common_flags(p)
  return parser


def main(argv: Sequence[str] | None = None, runner: Callable = common.default_runner, out=None) -> int:
  argv, extra = common.split_extra(sys.argv[1:] if argv is None else argv)
  out = out or sys.stdout
  try:
    args = build_parser().parse_args(argv)
    args.extra = common.check_extra_args(extra)
    if extra and args.command not in ("run", "watch"):
      raise LaunchError(f"arguments after '--' are only used by run and watch, not {args.command}")
    if hasattr(args, "workdir"):
      args.workdir = check_workdir(args.workdir, args.allow_local_workdir)
    s, remote = _slice(args), _remote(args)
    if args.command == "create":
      cmds = [create_command(s, args.accelerator_type, args.version, args.spot, args.preemptible)]
    elif args.command == "setup":
      cmds = setup_commands(s, remote, args.git_url, args.branch)
    elif args.command == "run":
      cmds = [run_command(s, args.config, args.workdir, args.extra, remote, parse_env(args.env))]
    elif args.command == "stop":
      cmds = [stop_command(s, remote)]
    elif args.command == "logs":
      cmds = [logs_command(s, remote, args.worker, args.lines, args.follow)]
    elif args.command == "delete":
      cmds = [delete_command(s)]
    else:  # watch
      if args.dry_run:
        print(watch_plan(args), file=out)
        return 0
      watch(args, runner)
      return 0
    common.run_commands(cmds, args.dry_run, runner, out)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
