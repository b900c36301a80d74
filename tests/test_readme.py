"""The README as written: every command of its ```bash blocks runs, in order, from a fresh directory with the
README's relative paths, shortened only by options appended at the end. The install and test commands are the
ones `.ci/run` runs verbatim."""

import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("PYTEST_XLA_CACHE", "/tmp"), f"avt_jax_test_xla_{os.getuid()}")
# Appended to every trainer command (the same model everywhere, so fine-tuning can restore the pretrained
# encoder): a seconds-long run instead of minutes.
SHORT_RUN = ["--config.model.size=tiny", "--config.model.audio_frontend.channels=(8, 8)",
             "--config.model.visual_frontend.channels=(4, 8)", "--config.total_steps=2",
             "--config.checkpoint_every_steps=2", "--config.eval_every_steps=0", "--config.log_every_steps=1",
             "--config.batch_size=4", "--config.eval_batch_size=4", "--config.data.max_tokens=8",
             f"--config.compilation_cache_dir={CACHE}"]
SHORTEN = {
    "avt_jax.main": SHORT_RUN,
    "avt_jax.summary": ["--config.model.size=tiny"],
    "avt_jax.predict": [],
    "data.prepare": ["--stop_after=2"],
    "launch.sweep": ["--only=fold0_frac100_seed0_scratch", "--set=total_steps=2", "--set=model.size=tiny",
                     "--set=checkpoint_every_steps=2", "--set=eval_every_steps=0", "--set=log_every_steps=1",
                     f"--set=compilation_cache_dir={CACHE}"],
}
# Run by .ci/run itself, verbatim.
CI_COMMANDS = ("pip install -r requirements.txt", "python -m pytest -q tests")
# What the sample-sized commands must leave behind (relative to the directory they run in).
OUTPUTS = {
    "avt_jax.main": lambda args: [os.path.join(args["--workdir"], p) for p in
                                  ("config.json", "metrics.jsonl", "final_metrics.json", "checkpoints/2")],
    "avt_jax.predict": lambda args: [args["--timeline"]],
    "data.prepare": lambda args: [os.path.join(args["--output"], "work")],
    "launch.sweep": lambda args: [os.path.join(args["--workdir"], "results.md")],
}


def readme_commands() -> list[str]:
  """The commands of README.md's ```bash blocks, one string each (backslash continuations joined)."""
  text = open(os.path.join(REPO, "README.md")).read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
      if cmd.strip() and not cmd.strip().startswith("#"):
        commands.append(" ".join(cmd.split()))
  return commands


def test_readme_starts_with_install_and_run_and_ci_runs_the_rest_verbatim():
  commands = readme_commands()
  assert commands[0] == "pip install -r requirements.txt"
  assert commands[1].startswith("python -m avt_jax.main --config=configs/pretrain.py")
  ci = open(os.path.join(REPO, ".ci", "run")).read().splitlines()
  for cmd in CI_COMMANDS:
    assert cmd in commands
    assert any(line.strip().startswith(cmd) for line in ci), f".ci/run does not run {cmd!r} verbatim"
  for cmd in commands:
    if cmd not in CI_COMMANDS:
      assert cmd.startswith("python -m "), cmd
      assert shlex.split(cmd)[2] in SHORTEN, f"README command {cmd!r} is not run by this test"


def _fresh_directory(root) -> str:
  """A directory like a fresh clone's root: the project's folders, no earlier runs."""
  for name in ("avt_jax", "configs", "data", "launch", "sample"):
    os.symlink(os.path.join(REPO, name), os.path.join(root, name))
  return str(root)


def test_every_readme_command_runs_as_written_from_a_fresh_directory(tmp_path):
  cwd = _fresh_directory(tmp_path)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("PYTHONPATH", None)  # The modules must be found from the directory the command runs in.
  times = []
  for cmd in readme_commands():
    if cmd in CI_COMMANDS:
      continue
    argv = shlex.split(cmd)
    module = argv[2]
    argv = [sys.executable] + argv[1:] + SHORTEN[module]
    t0 = time.time()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    times.append((time.time() - t0, cmd))
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, f"{cmd}\n{proc.stderr[-4000:]}"
    args = dict(a.split("=", 1) for a in shlex.split(cmd) if a.startswith("--") and "=" in a)
    for path in OUTPUTS.get(module, lambda _: [])(args):
      assert os.path.exists(os.path.join(cwd, path)), f"{cmd}: {path} was not written"
    if module == "avt_jax.main":
      saved = open(os.path.join(cwd, args["--workdir"], "config.json")).read()
      # config.json names the data and init_from as absolute paths: the run means the same files from anywhere.
      assert '"sample/prepared' not in saved and '"runs/' not in saved, saved[:2000]
  print("\n".join(f"{t:7.1f} s  {c}" for t, c in times))
