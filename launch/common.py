"""Shared helpers of the launchers (launch/tpu_vm.py, launch/gpu_cluster.py): quoting, printing and running commands.

A launcher builds every external command as an argv list. `--dry_run` prints each one as a single shell line
(`shlex.join`, so the line can be pasted into a POSIX shell and parses back to the same argv); otherwise the
commands run one after another and the first failure stops the sequence with a message naming the command.
Remote shell commands (the text given to `ssh` or to `gcloud ... ssh --command=`) are built from shell-quoted
words, so config paths and overrides with spaces, quotes, `$` or `;` reach the remote program unchanged.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(RuntimeError):
  """A launcher cannot proceed: bad arguments, or an external command failed."""


def q(word: str) -> str:
  """Shell-quotes one word for a POSIX shell."""
  return shlex.quote(str(word))


def home_path(path: str) -> str:
  """Shell text for a remote path: absolute paths are quoted as they are, relative ones are taken from $HOME.

  `"$HOME"/avt_jax` is expanded by the remote shell; the user-given part is always quoted.
  """
  if path.startswith("/"):
    return q(path)
  if path.startswith("~/"):
    path = path[2:]
  return '"$HOME"/' + q(path)


def is_remote(path: str) -> bool:
  """gs://... and other URLs: the same for every machine, never made absolute."""
  return "://" in path


def absolute_local(path: str) -> str:
  """A local path made absolute against the current directory (the one a relative command-line path is typed in);
  '' and remote paths are returned as they are."""
  if not path or is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def require_absolute(path: str, flag: str, why: str) -> str:
  """Refuses a relative local path that another machine would resolve against another directory."""
  if path and not is_remote(path) and not os.path.isabs(path):
    raise LaunchError(f"{flag}={path!r}: expected an absolute path or a gs:// URL ({why})")
  return path


def main_argv(python: str, config: str, workdir: str, extra: Sequence[str] = ()) -> list[str]:
  """The argv of one training process (the same on every host)."""
  return [python, "-m", "avt_jax.main", f"--config={config}", f"--workdir={workdir}", *extra]


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(launcher flags, flags after `--` for avt_jax.main)."""
  argv = list(argv)
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []


def check_extra_args(extra: Sequence[str]) -> list[str]:
  """Arguments passed through to avt_jax.main (after `--`): each must be a flag (`--name=value` or `--flag`)."""
  extra = [a for a in extra if a != "--"]
  bad = [a for a in extra if not a.startswith("--")]
  if bad:
    raise LaunchError(f"arguments after '--' are passed to avt_jax.main and must be flags like "
                      f"--config.batch_size=64; got {bad}")
  for a in extra:
    if a.startswith(("--config=", "--workdir=")):
      raise LaunchError(f"{a.split('=')[0]} is set by the launcher's own flag; do not repeat it after '--'")
  return extra


def check_word(value: str, what: str, pattern: str = r"^[^\s'\"\\]+$") -> str:
  """Rejects values that cannot appear in an #SBATCH line or a resource name (spaces, quotes)."""
  if not value or not re.match(pattern, value):
    raise LaunchError(f"{what}={value!r}: expected a non-empty value without spaces or quotes")
  return value


def parse_env(pairs: Sequence[str]) -> list[tuple[str, str]]:
  """NAME=VALUE strings (repeated --env flags) -> [(name, value)]."""
  out = []
  for p in pairs:
    key, sep, value = p.partition("=")
    if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
      raise LaunchError(f"--env={p!r}: expected NAME=VALUE")
    out.append((key, value))
  return out


def background_script(directory: str, command: str, log: str, pidfile: str, env: Sequence[tuple[str, str]] = (),
                      setup: str = "") -> str:
  """Remote shell text: cd to `directory`, start `command` under nohup in the background, append its output to
  `log` and write its pid to `pidfile` (paths relative to `directory`).

  `directory` and `command` are shell text (already quoted); `log` and `pidfile` are quoted here, env values too.
  `setup` (shell text, e.g. `source venv/bin/activate`) runs first. A second start while the pid in `pidfile` is
  alive does nothing (the message goes to stderr), so a repeated launch never runs two copies.
  """
  pid, assigns = q(pidfile), "".join(f"{k}={q(v)} " for k, v in env)
  pre = f"{setup} || exit 1; " if setup else ""
  return (f"cd {directory} || exit 1; {pre}"
          f"if [ -f {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; then "
          f"echo \"avt_jax.main is already running (pid $(cat {pid}))\" >&2; exit 0; fi; "
          f"{assigns}nohup {command} >> {q(log)} 2>&1 < /dev/null & echo $! > {pid}")


def format_commands(commands: Sequence[Sequence[str]]) -> str:
  return "\n".join(shlex.join([str(a) for a in c]) for c in commands)


def default_runner(argv: Sequence[str], capture: bool = False) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(list(argv), check=False, text=True, capture_output=capture)
  except FileNotFoundError as e:
    raise LaunchError(f"{argv[0]!r} not found on PATH (needed for: {shlex.join(argv)})") from e


def run_commands(commands: Sequence[Sequence[str]], dry_run: bool, runner: Callable = default_runner,
                 out=None) -> None:
  """Prints (dry run) or runs the commands in order; raises LaunchError naming the first one that fails."""
  out = out or sys.stdout
  if dry_run:
    if commands:
      print(format_commands(commands), file=out)
    return
  for c in commands:
    print("+ " + shlex.join(c), file=sys.stderr)
    result = runner(c)
    if result.returncode != 0:
      raise LaunchError(f"command failed with exit status {result.returncode}: {shlex.join(c)}")
