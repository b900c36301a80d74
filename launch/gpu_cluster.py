r"""Multi-host GPU launcher: a SLURM batch script, or one process per host over plain ssh.

SLURM (one task per node; each task drives all GPUs of its node):

  python -m launch.gpu_cluster slurm --nodes=4 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
      --config=configs/pretrain.py:voxceleb2 --workdir=/shared/runs/pretrain_vox2 \
      --setup='source /shared/venvs/avt/bin/activate' [--requeue] [--dry_run] -- --config.mesh.fsdp=8

  writes <log_dir>/<job_name>.sbatch and submits it with `sbatch` (--dry_run prints the script and the commands).
  Inside the job, `srun` starts `python -m avt_jax.main` once per node; `jax.distributed.initialize()` reads
  SLURM's variables (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID) for the coordinator, the
  process count and the process id. JAX's SLURM detection would also restrict each process to the GPU numbered
  SLURM_LOCALID (its one-process-per-GPU model); the script exports JAX_LOCAL_DEVICE_IDS=0,...,G-1 so that the
  single process of a node sees all G GPUs. `--signal=TERM@<s>` makes SLURM send SIGTERM to the tasks <s>
  seconds before the time limit: the trainer checkpoints and exits 0. With --requeue the job may be requeued after
  preemption, and with --requeue_until_done the script requeues itself while <workdir>/final_metrics.json is
  missing; every restart resumes from the newest checkpoint in the workdir. A relative --workdir is made absolute
  against the current directory (sbatch runs here; the job starts in --repo_dir).

Plain ssh (one process per host; host i gets AVT_PROCESS_ID=i, host 0 is the coordinator):

  python -m launch.gpu_cluster ssh --hosts=gpu1,gpu2,gpu3,gpu4 --port=8476 --repo_dir=/shared/avt_jax \
      --python=/shared/venvs/avt/bin/python --config=configs/pretrain.py:voxceleb2 \
      --workdir=/shared/runs/pretrain_vox2 [--dry_run] -- --config.mesh.fsdp=8
  python -m launch.gpu_cluster ssh_logs --hosts=... --repo_dir=... [--process=0] [--lines=100]
  python -m launch.gpu_cluster ssh_stop --hosts=... --repo_dir=...      # SIGTERM: checkpoint and exit

  For host i: ssh <host> 'cd <repo_dir>; AVT_COORDINATOR=<host0>:<port> AVT_NUM_PROCESSES=<N> AVT_PROCESS_ID=<i>
  nohup <python> -m avt_jax.main ... >> avt_jax_run_<i>.log 2>&1 &' (avt_jax.main initialises jax.distributed from
  these variables; each process sees all GPUs of its host). The workdir must be on storage all hosts share, given as
  an absolute path (each host starts in --repo_dir) or gs://.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Callable, Sequence

from launch import common
from launch.common import LaunchError, q

SUBMIT_MARKER = "# submit with:"


# ----------------------------------------------------------------------------------------------------------------
# SLURM.
# ----------------------------------------------------------------------------------------------------------------


def sbatch_script(*, config: str, workdir: str, nodes: int, gpus_per_node: int, extra: Sequence[str] = (),
                  job_name: str = "avt_jax", partition: str = "", account: str = "", time_limit: str = "",
                  cpus_per_task: int = 0, log_dir: str = "logs", repo_dir: str = common.REPO, python: str = "python3",
                  setup: Sequence[str] = (), env: Sequence[tuple[str, str]] = (), signal_seconds: int = 120,
                  requeue: bool = False, requeue_until_done: bool = False) -> str:
  """The text of the batch script (bash)."""
  if nodes < 1 or gpus_per_node < 0:
    raise LaunchError(f"--nodes={nodes} must be >= 1 and --gpus_per_node={gpus_per_node} >= 0")
  for value, what in ((job_name, "--job_name"), (log_dir, "--log_dir")):
    common.check_word(value, what)
  for value, what in ((partition, "--partition"), (account, "--account"), (time_limit, "--time")):
    if value:
      common.check_word(value, what)
  directives = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
  if gpus_per_node:
    directives.append(f"--gpus-per-node={gpus_per_node}")
  if cpus_per_task:
    directives.append(f"--cpus-per-task={cpus_per_task}")
  if time_limit:
    directives.append(f"--time={time_limit}")
  if partition:
    directives.append(f"--partition={partition}")
  if account:
    directives.append(f"--account={account}")
  directives += [f"--output={log_dir.rstrip('/')}/%x-%j.out", "--open-mode=append"]
  if signal_seconds:
    directives.append(f"--signal=TERM@{int(signal_seconds)}")
  if requeue or requeue_until_done:
    directives.append("--requeue")

  argv = common.main_argv(python, config, workdir, extra)
  srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *argv]
  lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + [
      "",
      "# avt_jax training job (launch/gpu_cluster.py). One task per node; jax.distributed.initialize() reads the",
      "# coordinator, process count and process id from SLURM. The trainer resumes from <workdir>/checkpoints.",
      "set -uo pipefail",
      f"cd {q(repo_dir)} || exit 1",
  ]
  lines += list(setup)
  for k, v in env:
    lines.append(f"export {k}={q(v)}")
  if gpus_per_node > 1:
    ids = ",".join(str(i) for i in range(gpus_per_node))
    lines += ["# One process per node uses all of its GPUs (JAX's SLURM detection alone would give each process only",
              "# the GPU numbered SLURM_LOCALID).",
              f"export JAX_LOCAL_DEVICE_IDS={ids}"]
  lines += [shlex.join(srun), "status=$?"]
  if requeue_until_done:
    check = ("import sys; from etils import epath; "
             "sys.exit(0 if (epath.Path(sys.argv[1]) / 'final_metrics.json').exists() else 1)")
    lines += ["# Stopped early (time limit / preemption) but not finished: requeue; the next start resumes.",
              f"if [ \"$status\" -eq 0 ] && ! {q(python)} -c {q(check)} {q(workdir)}; then",
              '  scontrol requeue "$SLURM_JOB_ID"',
              "fi"]
  lines.append('exit "$status"')
  return "\n".join(lines) + "\n"


def slurm_commands(script_path: str, log_dir: str) -> list[list[str]]:
  return [["mkdir", "-p", log_dir], ["sbatch", script_path]]


# ----------------------------------------------------------------------------------------------------------------
# Plain ssh.
# ----------------------------------------------------------------------------------------------------------------


def _host_name(host: str) -> str:
  return host.rpartition("@")[2]


def _ssh(host: str, remote: str, ssh_options: Sequence[str] = ()) -> list[str]:
  opts = [x for o in ssh_options for x in ("-o", o)]
  return ["ssh", *opts, host, remote]


def log_name(i: int) -> str:
  return f"avt_jax_run_{i}.log"


def pid_name(i: int) -> str:
  return f"avt_jax_run_{i}.pid"


def ssh_start_commands(hosts: Sequence[str], *, config: str, workdir: str, repo_dir: str, port: int,
                       extra: Sequence[str] = (), python: str = "python3", coordinator_host: str = "",
                       setup: str = "", env: Sequence[tuple[str, str]] = (),
                       ssh_options: Sequence[str] = ()) -> list[list[str]]:
  """One `ssh` command per host starting process i of N in the background."""
  if not hosts:
    raise LaunchError("--hosts is empty")
  if len(set(hosts)) != len(hosts):
    raise LaunchError(f"--hosts has duplicates: {list(hosts)}")
  if not 0 < port < 65536:
    raise LaunchError(f"--port={port} is not a TCP port")
  coordinator = f"{coordinator_host or _host_name(hosts[0])}:{port}"
  argv = common.main_argv(python, config, workdir, extra)
  command = " ".join(q(a) for a in argv)
  cmds = []
  for i, host in enumerate(hosts):
    dist = [("AVT_COORDINATOR", coordinator), ("AVT_NUM_PROCESSES", str(len(hosts))), ("AVT_PROCESS_ID", str(i))]
    remote = common.background_script(q(repo_dir), command, log_name(i), pid_name(i), dist + list(env), setup)
    cmds.append(_ssh(host, remote, ssh_options))
  return cmds


def ssh_stop_commands(hosts: Sequence[str], repo_dir: str, ssh_options: Sequence[str] = (),
                      signal_name: str = "TERM") -> list[list[str]]:
  cmds = []
  for i, host in enumerate(hosts):
    pid = q(os.path.join(repo_dir, pid_name(i)))
    cmds.append(_ssh(host, f"if [ -f {pid} ]; then kill -{signal_name} \"$(cat {pid})\" 2>/dev/null; fi; true",
                     ssh_options))
  return cmds


def ssh_logs_command(hosts: Sequence[str], repo_dir: str, process: int = 0, lines: int = 100, follow: bool = False,
                     ssh_options: Sequence[str] = ()) -> list[str]:
  if not 0 <= process < len(hosts):
    raise LaunchError(f"--process={process} not in [0, {len(hosts)})")
  log = q(os.path.join(repo_dir, log_name(process)))
  return _ssh(hosts[process], f"tail -n {int(lines)}{' -f' if follow else ''} {log}", ssh_options)


def _hosts(args) -> list[str]:
  hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts else []
  if args.hostfile:
    with open(args.hostfile) as f:
      hosts += [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
  for h in hosts:
    common.check_word(h, "host")
  if not hosts:
    raise LaunchError("give --hosts=h0,h1,... or --hostfile")
  return hosts


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch.gpu_cluster", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  def training(p):
    p.add_argument("--config", required=True, help="configs/<file>.py[:variant] (relative to repo_dir).")
    p.add_argument("--workdir", required=True, help="Run directory on storage every host sees (or gs://...).")
    p.add_argument("--python", default="python3", help="Interpreter on the hosts (e.g. a virtualenv's python).")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the training processes.")
    p.add_argument("--dry_run", action="store_true", help="Print instead of running.")

  p = sub.add_parser("slurm", help="Write and submit an sbatch script (one task per node).")
  training(p)
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--cpus_per_task", type=int, default=0, help="0 = cluster default.")
  p.add_argument("--partition", default="")
  p.add_argument("--account", default="")
  p.add_argument("--time", default="", help="Time limit, e.g. 24:00:00 or 2-00:00:00.")
  p.add_argument("--job_name", default="avt_jax")
  p.add_argument("--log_dir", default="logs", help="Directory of the job logs (%%x-%%j.out) and the script.")
  p.add_argument("--script", default="", help="Where to write the script (default <log_dir>/<job_name>.sbatch).")
  p.add_argument("--repo_dir", default=common.REPO, help="Project directory on the nodes.")
  p.add_argument("--setup", action="append", default=[],
                 help="Shell line run before srun (e.g. 'source venv/bin/activate'); repeatable.")
  p.add_argument("--signal_seconds", type=int, default=120,
                 help="SIGTERM the tasks this many seconds before the time limit (0 = off).")
  p.add_argument("--requeue", action="store_true", help="Allow SLURM to requeue the job after preemption.")
  p.add_argument("--requeue_until_done", action="store_true",
                 help="Requeue the job at its end while the run is not finished (implies --requeue).")

  def ssh_common(p):
    p.add_argument("--hosts", default="", help="Comma-separated ssh hosts; the first is the coordinator.")
    p.add_argument("--hostfile", default="", help="File with one host per line (after --hosts, if both).")
    p.add_argument("--repo_dir", default=common.REPO, help="Project directory on the hosts (same path on all).")
    p.add_argument("--ssh_option", action="append", default=[], help="ssh -o option, e.g. Port=2222; repeatable.")

  p = sub.add_parser("ssh", help="Start one training process per host over ssh.")
  training(p)
  ssh_common(p)
  p.add_argument("--port", type=int, default=8476, help="Coordinator port on the first host.")
  p.add_argument("--coordinator_host", default="",
                 help="Address the other hosts use for the first host (default: its ssh host name).")
  p.add_argument("--setup", default="", help="Shell text run on each host before starting (e.g. module load ...).")

  p = sub.add_parser("ssh_stop", help="SIGTERM the training processes (they checkpoint and exit).")
  ssh_common(p)
  p.add_argument("--dry_run", action="store_true")

  p = sub.add_parser("ssh_logs", help="Print the end of one process's log.")
  ssh_common(p)
  p.add_argument("--process", type=int, default=0)
  p.add_argument("--lines", type=int, default=100)
  p.add_argument("--follow", action="store_true")
  p.add_argument("--dry_run", action="store_true")
  return parser


def main(argv: Sequence[str] | None = None, runner: Callable = common.default_runner, out=None) -> int:
  argv, extra = common.split_extra(sys.argv[1:] if argv is None else argv)
  out = out or sys.stdout
  try:
    args = build_parser().parse_args(argv)
    extra = common.check_extra_args(extra)
    if extra and args.command not in ("slurm", "ssh"):
      raise LaunchError(f"arguments after '--' are only used by slurm and ssh, not {args.command}")
    if args.command == "slurm":
      # sbatch runs here and the nodes share this filesystem: a relative workdir is taken from this directory (in
      # the job it would be taken from --repo_dir, and Orbax refuses relative checkpoint paths).
      workdir = common.absolute_local(args.workdir)
      text = sbatch_script(
          config=args.config, workdir=workdir, nodes=args.nodes, gpus_per_node=args.gpus_per_node, extra=extra,
          job_name=args.job_name, partition=args.partition, account=args.account, time_limit=args.time,
          cpus_per_task=args.cpus_per_task, log_dir=args.log_dir, repo_dir=args.repo_dir, python=args.python,
          setup=args.setup, env=common.parse_env(args.env), signal_seconds=args.signal_seconds,
          requeue=args.requeue, requeue_until_done=args.requeue_until_done)
      script = args.script or os.path.join(args.log_dir, f"{args.job_name}.sbatch")
      cmds = slurm_commands(script, args.log_dir)
      if args.dry_run:
        print(text + SUBMIT_MARKER, file=out)
      else:
        # Imported here: a dry run (and the ssh subcommands) work on a machine without the training packages.
        from avt_jax import records  # pylint: disable=g-import-not-at-top
        os.makedirs(os.path.dirname(os.path.abspath(script)), exist_ok=True)
        records.write_atomic(script, text)
        print(f"wrote {script}", file=sys.stderr)
      common.run_commands(cmds, args.dry_run, runner, out)
      return 0
    hosts = _hosts(args)
    if args.command == "ssh":
      common.require_absolute(args.workdir, "--workdir", "each host starts the trainer in --repo_dir, so a relative "
                              "path would be taken from there, not from this directory")
      cmds = ssh_start_commands(hosts, config=args.config, workdir=args.workdir, repo_dir=args.repo_dir,
                                port=args.port, extra=extra, python=args.python,
                                coordinator_host=args.coordinator_host, setup=args.setup,
                                env=common.parse_env(args.env), ssh_options=args.ssh_option)
    elif args.command == "ssh_stop":
      cmds = ssh_stop_commands(hosts, args.repo_dir, args.ssh_option)
    else:
      cmds = [ssh_logs_command(hosts, args.repo_dir, args.process, args.lines, args.follow, args.ssh_option)]
    common.run_commands(cmds, args.dry_run, runner, out)
  except (LaunchError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
