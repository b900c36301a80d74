"""Trainer tests on the bundled sample: resume after SIGKILL / SIGTERM equals an uninterrupted run, fine-tuning from
a pretraining run, evaluation-only runs, damaged checkpoints, full disks, changed configs (meshes and init_from:
test_setup.py)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from avt_jax import checkpointing, config_lib, input_pipeline, records, train, writers

REPO = config_lib.REPO
# One persistent XLA cache for every run of this module: identical programs compile once.
CACHE = os.path.join(os.environ.get("PYTEST_XLA_CACHE", "/tmp"), f"avt_jax_test_xla_{os.getuid()}")
TINY = [f"--config={REPO}/configs/pretrain.py:tiny", f"--config.compilation_cache_dir={CACHE}"]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _cmd(workdir, *overrides):
  return [sys.executable, "-m", "avt_jax.main", *TINY, f"--workdir={workdir}", *overrides]


def _run(workdir, *overrides, devices=1, timeout=300):
  proc = subprocess.run(_cmd(workdir, *overrides), env=_env(devices), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _params(workdir, step):
  state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return state["params"]


def _train_losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train" and "loss" in r}


def _assert_same_params(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert len(flat_a) == len(flat_b)
  for path, x in flat_a:
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_b[path]), err_msg=str(path))


LONG = ["--config.total_steps=40", "--config.checkpoint_every_steps=10", "--config.log_every_steps=1",
        "--config.eval_every_steps=0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("uninterrupted"))
  _run(wd, *LONG)
  return wd


def _wait_for(path, proc, timeout=240):
  t0 = time.time()
  while not os.path.exists(path):
    assert proc.poll() is None, f"run ended before {path} appeared: {proc.stderr.read()[-3000:]}"
    assert time.time() - t0 < timeout, f"{path} did not appear"
    time.sleep(0.01)


def _kill_after_first_checkpoint(wd, *overrides):
  """Starts the LONG run and SIGKILLs it once checkpoint 10 exists (before it finishes)."""
  proc = subprocess.Popen(_cmd(wd, *LONG, *overrides), env=_env(1), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(os.path.join(wd, "checkpoints", "10"), proc)
  proc.send_signal(signal.SIGSTOP)  # Freeze it at once, then kill it without any chance to clean up.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(wd, "checkpoints", "40")), "the run finished before it was killed"


def test_sigkill_then_resume_equals_uninterrupted_run(uninterrupted, tmp_path):
  wd = str(tmp_path / "killed")
  _kill_after_first_checkpoint(wd)
  _run(wd, *LONG)
  _assert_same_params(_params(uninterrupted, 40), _params(wd, 40))
  # Same data order and updates after the resume: every logged training loss equals the uninterrupted run's.
  full, resumed = _train_losses(uninterrupted), _train_losses(wd)
  assert set(range(11, 41)) <= set(resumed)
  for step in range(11, 41):
    assert resumed[step] == full[step], step
  # The killed run had logged steps after checkpoint 10: they were dropped and written once again.
  _assert_unique_rows(wd)


def test_runs_with_prefetch_workers_equal_the_run_without_and_resume_with_another_count(uninterrupted, tmp_path):
  wd = str(tmp_path / "workers")
  _kill_after_first_checkpoint(wd, "--config.data.worker_count=1")
  with open(os.path.join(wd, "checkpoints", "10", checkpointing.DATA_ITER, "process_0-of-1.json")) as f:
    assert json.load(f) == {"next_index": 10}  # the batch position, whatever the number of workers
  _run(wd, *LONG, "--config.data.worker_count=2")
  _assert_same_params(_params(uninterrupted, 40), _params(wd, 40))
  full, got = _train_losses(uninterrupted), _train_losses(wd)
  assert set(range(1, 41)) <= set(got)
  for step in range(1, 41):
    assert got[step] == full[step], step


@pytest.mark.parametrize("every", [10, 1], ids=["between_checkpoints", "on_a_checkpointed_step"])
def test_sigterm_saves_and_relaunch_finishes_identically(uninterrupted, tmp_path, every):
  # Checkpointing every step, the signal always arrives at a step that was just saved: the stop saves nothing new.
  wd = str(tmp_path / "preempted")
  proc = subprocess.Popen(_cmd(wd, *LONG, f"--config.checkpoint_every_steps={every}"), env=_env(1), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(os.path.join(wd, "checkpoints", "10"), proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert steps[-1] >= 10
  assert "stopping at step" in err
  if steps[-1] < 40:
    _run(wd, *LONG)
  _assert_same_params(_params(uninterrupted, 40), _params(wd, 40))


def test_finetune_from_pretraining_run_logs_classification_metrics(uninterrupted, tmp_path):
  wd = str(tmp_path / "ft")
  proc = subprocess.run(
      [sys.executable, "-m", "avt_jax.main", f"--config={REPO}/configs/finetune_cremad.py:tiny",
       f"--config.compilation_cache_dir={CACHE}", f"--config.init_from={uninterrupted}", f"--workdir={wd}"],
      env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"initialising the encoder from {uninterrupted}" in proc.stderr
  # The input scale travels with the encoder: the pretraining run's statistics, recorded in both runs.
  assert f"inputs normalised as the encoder of {uninterrupted} was trained" in proc.stderr
  pre_norm = json.load(open(os.path.join(uninterrupted, "normalization.json")))
  assert pre_norm == json.load(open(os.path.join(wd, "normalization.json")))
  assert pre_norm["source"] == f"{config_lib.SAMPLE}/dataset_info.json"
  final = json.load(open(os.path.join(wd, "final_metrics.json")))
  for key in ("test/accuracy", "test/uar", "test/macro_f1", "best/step"):
    assert key in final
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert any(r["split"] == "eval" and "accuracy" in r for r in rows)

  # Evaluation only: init_from's selected checkpoint on the same splits gives the same numbers, in
  # final_metrics.json of the evaluation workdir. No training data is given (nor needed), and no optimizer state.
  wd_eval = str(tmp_path / "eval")
  proc = subprocess.run(
      [sys.executable, "-m", "avt_jax.main", f"--config={REPO}/configs/finetune_cremad.py:tiny",
       f"--config.compilation_cache_dir={CACHE}", "--config.mode=eval", f"--config.init_from={wd}",
       "--config.data.train=", f"--workdir={wd_eval}"], env=_env(1), cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  evaluated = json.load(open(os.path.join(wd_eval, "final_metrics.json")))
  assert evaluated["eval/accuracy"] == pytest.approx(final["best/validation/accuracy"], abs=1e-6)
  assert evaluated["test/accuracy"] == pytest.approx(final["test/accuracy"], abs=1e-6)
  assert not os.path.exists(os.path.join(wd_eval, "checkpoints"))


def test_finetune_regression_from_pretraining_run_logs_ccc(uninterrupted, tmp_path):
  wd = str(tmp_path / "ft_msp")
  proc = subprocess.run(
      [sys.executable, "-m", "avt_jax.main", f"--config={REPO}/configs/finetune_msp_improv.py:tiny",
       f"--config.compilation_cache_dir={CACHE}", f"--config.init_from={uninterrupted}", f"--workdir={wd}"],
      env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  final = json.load(open(os.path.join(wd, "final_metrics.json")))
  for key in ("test/ccc_arousal", "test/ccc_valence", "test/ccc_mean", "eval/ccc_arousal"):
    assert key in final and np.isfinite(final[key]) and -1.0 <= final[key] <= 1.0
  # Clips, not target values (2 attributes per clip): the sample's four rated CREMA-D clips.
  assert final["eval/clips"] == final["test/clips"] == 4.0


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  wd = str(tmp_path / "nan")
  # An absurd learning rate drives the parameters to inf within a few steps.
  proc = subprocess.run(_cmd(wd, "--config.optimizer.lr=1e35", "--config.optimizer.schedule=constant",
                             "--config.total_steps=30", "--config.log_every_steps=1",
                             "--config.checkpoint_every_steps=1", "--config.eval_every_steps=0"),
                        env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "TrainingError" in proc.stderr and "The last good checkpoint (step" in proc.stderr
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert steps and steps[-1] < 30
  for x in jax.tree.leaves(_params(wd, steps[-1])):
    assert np.isfinite(np.asarray(x)).all()


# ----------------------------------------------------------------------------------------------------------------
# Runs that survive a bad day: damaged checkpoints, changed configs, failed saves, logs without duplicates.


def _files(root) -> dict[str, bytes]:
  """Every file below `root` with its bytes (to show that nothing already written changed)."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def _largest_file(root) -> str:
  paths = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]
  return max(paths, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _metric_rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _assert_unique_rows(workdir):
  keys = [(r["step"], r["split"]) for r in _metric_rows(workdir)]
  dupes = sorted({k for k in keys if keys.count(k) > 1})
  assert not dupes, f"duplicate (step, split) rows in metrics.jsonl: {dupes}"


def test_metrics_rows_carry_their_split_once_per_step(uninterrupted):
  rows = _metric_rows(uninterrupted)
  _assert_unique_rows(uninterrupted)
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == list(range(1, 41))
  for r in train_rows:  # Throughput sits in the train row of its step, not in rows of its own.
    assert r["clips_per_second"] > 0 and r["steps_per_second"] > 0, r
  assert not any("uptime" in r or "steps_per_sec" in r for r in rows)


def test_first_eta_waits_for_a_timed_step():
  progress = train.Progress(total_steps=10, start=0)
  progress.step_done(1, 50.0)  # Step 1 carries the warm-up: it must not set the rate.
  assert progress.eta(1) == "ETA after the next steps"
  progress.step_done(2, 0.5)
  progress.step_done(3, 0.5)
  assert progress.eta(3) == "2.00 steps/s, ETA 0h00m03s"  # 7 steps left at 2 steps/s -> 3.5 s


def test_damaged_latest_checkpoint_and_best_are_moved_aside_and_the_run_resumes(uninterrupted, tmp_path):
  wd = str(tmp_path / "damaged")
  shutil.copytree(uninterrupted, wd)
  ckpt = os.path.join(wd, "checkpoints")
  assert sorted(os.listdir(ckpt)) == ["20", "30", "40"]
  # The interrupted run had logged up to step 40; checkpoint 40 and best/ (step 40) are then damaged on disk.
  victim = _largest_file(os.path.join(ckpt, "40", "state"))
  _truncate(victim)
  _truncate(_largest_file(os.path.join(wd, "best", "checkpoints", "40", "state")))
  damaged40, damaged_best = _files(os.path.join(ckpt, "40")), _files(os.path.join(wd, "best"))
  intact30 = _files(os.path.join(ckpt, "30"))
  proc = _run(wd, *LONG)
  assert f"checkpoint step 40 in {ckpt} is damaged" in proc.stderr
  assert f"moved it to {ckpt}/40.damaged" in proc.stderr
  assert f"{wd}/best is damaged" in proc.stderr
  # Nothing is deleted: the damaged directories are kept byte for byte under their new names.
  assert _files(os.path.join(ckpt, "40.damaged")) == damaged40
  assert _files(os.path.join(wd, "best.damaged")) == damaged_best
  assert _files(os.path.join(ckpt, "30")) == intact30
  # Resumed from step 30, the run reaches the uninterrupted run's step-40 parameters exactly.
  _assert_same_params(_params(uninterrupted, 40), _params(wd, 40))
  assert json.load(open(os.path.join(wd, "best", "best.json")))["step"] == 40
  # Rows after step 30 were dropped and written again: one row per (step, split), same losses.
  _assert_unique_rows(wd)
  assert _train_losses(wd) == _train_losses(uninterrupted)


def test_no_intact_checkpoint_stops_with_what_was_tried(uninterrupted, tmp_path):
  wd = str(tmp_path / "all_damaged")
  shutil.copytree(uninterrupted, wd)
  ckpt = os.path.join(wd, "checkpoints")
  before = {}
  for step in ("20", "30", "40"):
    os.remove(_largest_file(os.path.join(ckpt, step, "state")))
    before[step] = _files(os.path.join(ckpt, step))
  proc = subprocess.run(_cmd(wd, *LONG), env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()
  message = "\n".join(last[-4:])
  assert f"no intact checkpoint in {ckpt}; tried (and moved aside):" in message
  for step in ("40", "30", "20"):
    assert f"step {step}: " in message and f"{ckpt}/{step}.damaged" in message
    assert _files(os.path.join(ckpt, f"{step}.damaged")) == before[step]
  assert not [n for n in os.listdir(ckpt) if n.isdigit()]


def test_resume_with_a_changed_config_is_refused_before_anything_is_written(uninterrupted, tmp_path):
  wd = str(tmp_path / "changed")
  shutil.copytree(uninterrupted, wd)
  before = _files(wd)
  proc = subprocess.run(_cmd(wd, *LONG, "--config.batch_size=8", "--config.masking.ratio=0.1",
                             "--config.total_steps=50"),
                        env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  err = proc.stderr
  cfg = os.path.join(wd, "config.json")
  assert f"batch_size: 4 in {cfg}, 8 now" in err
  assert f"masking.ratio: 0.05 in {cfg}, 0.1 now" in err
  assert "total_steps" not in err.split("cannot resume")[-1].split("Use a new")[0]  # a safe change is not refused
  assert "--config.allow_resume_changes=batch_size,masking.ratio" in err
  assert _files(wd) == before  # config.json, checkpoints and logs untouched

  # A model change cannot be allowed: the checkpoint's parameters would not fit.
  proc = subprocess.run(_cmd(wd, *LONG, "--config.model.size=small", "--config.allow_resume_changes=model"),
                        env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "does not fit the model's params" in proc.stderr
  assert _files(wd) == before


@contextlib.contextmanager
def _small_disk(tmp_path, size):
  """A tmpfs of `size` mounted at tmp_path/small_disk for the block (the test is skipped where mounting needs root)."""
  mnt = str(tmp_path / "small_disk")
  os.makedirs(mnt, exist_ok=True)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", "-l", mnt], capture_output=True)


def _fill_disk(mnt, keep=0):
  """Appends zeros to mnt/filler until `keep` bytes are left free."""
  with open(os.path.join(mnt, "filler"), "ab") as f:
    f.write(b"\0" * max(os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize - keep, 0))


def test_failed_save_on_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
  with _small_disk(tmp_path, "12m") as mnt:
    wd = os.path.join(mnt, "run")
    short = ["--config.checkpoint_every_steps=3", "--config.data.eval=", "--config.log_every_steps=1"]
    _run(wd, *short, "--config.total_steps=3")
    before = _files(os.path.join(wd, "checkpoints", "3"))
    _fill_disk(mnt, keep=96 * 1024)  # room for log lines but not for another checkpoint
    proc = subprocess.run(_cmd(wd, *short, "--config.total_steps=6"), env=_env(1), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # The cause is the last line, even with the library's background threads still printing failures.
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("avt_jax.main: error: saving checkpoint step 6 to "), proc.stderr[-3000:]
    # The cause as the storage layer words it (tensorstore: RESOURCE_EXHAUSTED, the OS: errno 28).
    assert any(c in last for c in ("RESOURCE_EXHAUSTED", "No space left on device", "Errno 28")), last
    assert "the last committed checkpoint (step 3) is intact" in last
    # A disk with no room at all fails before the first step, on whichever file comes first, named.
    _fill_disk(mnt)
    proc = subprocess.run(_cmd(wd, *short, "--config.total_steps=6"), env=_env(1), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("avt_jax.main: error: ") and "No space left on device" in last and wd in last, \
        proc.stderr[-3000:]
    os.remove(os.path.join(mnt, "filler"))
    assert _files(os.path.join(wd, "checkpoints", "3")) == before
    assert sorted(n for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit()) == ["3"]
    # With space again, the run resumes from step 3 and finishes.
    _run(wd, *short, "--config.total_steps=6")
    assert "6" in os.listdir(os.path.join(wd, "checkpoints"))


def test_metrics_on_a_full_disk_fail_with_an_error_naming_the_workdir(tmp_path):
  with _small_disk(tmp_path, "1m") as mnt:
    wd = os.path.join(mnt, "run")
    os.makedirs(wd)
    writer = writers.make_writer(wd)  # TensorBoard's event file and metrics.jsonl
    writer.write_scalars(0, {"train/loss": 1.0})
    writer.flush()
    _fill_disk(mnt)
    with pytest.raises(writers.MetricsError) as e:
      for step in range(1, 200):
        writer.write_scalars(step, {"train/loss": 1.0, "train/a_long_metric_name_to_fill_the_buffers": 2.0})
      writer.flush()
    assert str(e.value).startswith(f"writing the metrics of {wd} (")


def test_eval_and_test_data_are_checked_before_the_first_step(tmp_path):
  config = config_lib.base_config("pretrain")
  config.data.eval = config_lib.SYNTH + "/pretrain"  # precomputed features: does not fit the raw sample
  train_sources, geometry = input_pipeline.open_sources(config.data.train)
  with pytest.raises(ValueError) as e:
    train.open_eval_sources(config, train_sources, geometry)
  assert str(e.value).startswith(f"data.eval ({config_lib.SYNTH}/pretrain) does not fit data.train "
                                 f"({config_lib.SAMPLE}): kind: raw (data.train) vs features")
  # A test split whose shard is truncated is named now, not after training.
  broken = str(tmp_path / "broken")
  shutil.copytree(config_lib.SAMPLE, broken)
  shard = _largest_file(os.path.join(broken, "shards"))
  _truncate(shard)
  config.data.eval, config.data.test = config_lib.SAMPLE, broken
  with pytest.raises(records.RecordError, match=f"^{shard}: not a readable ArrayRecord shard"):
    train.open_eval_sources(config, train_sources, geometry)


def test_malformed_best_record_names_the_file(tmp_path):
  best = tmp_path / "best"
  best.mkdir()
  (best / "best.json").write_text('{"step": 20, "metric": "accuracy", "value": 0.5, "metr')
  with pytest.raises(records.RecordError, match=rf"^{best}/best.json:1: malformed best-checkpoint record"):
    checkpointing.BestCheckpoint(str(tmp_path), "accuracy", "max")
  (best / "best.json").write_text('{"step": 20}')
  with pytest.raises(records.RecordError, match=rf"^{best}/best.json: expected"):
    checkpointing.BestCheckpoint(str(tmp_path), "accuracy", "max")


def test_num_epochs_sets_the_steps_from_the_training_data():
  config = config_lib.base_config("finetune")
  config.batch_size = 8
  config.num_epochs = 2.5
  config.optimizer.total_steps = config.total_steps  # the schedule follows total_steps unless set apart
  sources, _ = input_pipeline.open_sources(config_lib.SAMPLE)  # 12 clips
  cfg = config.copy_and_resolve_references()
  train.steps_from_epochs(cfg, sources)
  assert cfg.total_steps == cfg.optimizer.total_steps == 4  # ceil(2.5 * 12 / 8)
  cfg = config.copy_and_resolve_references()
  cfg.num_epochs = 0.0
  train.steps_from_epochs(cfg, sources)
  assert cfg.total_steps == 200  # 0 = use total_steps as given
  config.num_epochs = -1.0
  with pytest.raises(ValueError, match=r"config.num_epochs=-1.0; expected a number >= 0"):
    train.validate_config(config)


def test_resume_is_bitwise_equal_with_another_prng_impl_which_changes_the_dropout_draws(uninterrupted, tmp_path):
  short = ["--config.total_steps=6", "--config.checkpoint_every_steps=3", "--config.log_every_steps=1",
           "--config.eval_every_steps=0", "--config.prng_impl=unsafe_rbg"]
  full = str(tmp_path / "full")
  _run(full, *short)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))  # as if stopped after the checkpoint of step 3
  _run(resumed, *short)
  _assert_same_params(_params(full, 6), _params(resumed, 6))
  assert _train_losses(resumed) == _train_losses(full)
  # The implementation matters: the same run with the default threefry keys draws other masks and dropout.
  assert _train_losses(full)[1] != _train_losses(uninterrupted)[1]
  with pytest.raises(ValueError, match="prng_impl='philox'.*threefry2x32"):
    train.step_key(ml_collections.ConfigDict({"seed": 0, "prng_impl": "philox"}))


def test_a_config_from_before_a_field_was_added_resumes_only_at_the_value_that_does_what_it_did():
  config = config_lib.tiny(config_lib.base_config("pretrain"))
  saved = json.loads(json.dumps(config.to_dict(), default=str))
  del saved["prng_impl"]
  del saved["model"]["fused_qkv"]
  del saved["model"]["dropout_masks"]
  # Today's default dropout masks are not what the old run drew: resuming it with them is a change to ask for.
  with pytest.raises(ValueError, match=r"model.dropout_masks: '<absent>' in /runs/old/config.json, 'counter' now"):
    train.check_resume(config, saved, "/runs/old/config.json", None)
  config.model.dropout_masks = "jax"
  assert train.check_resume(config, saved, "/runs/old/config.json", None) == []
  config.prng_impl = "unsafe_rbg"  # other random draws than the old run's: a change to ask for
  with pytest.raises(ValueError, match=r"prng_impl: '<absent>' in /runs/old/config.json, 'unsafe_rbg' now"):
    train.check_resume(config, saved, "/runs/old/config.json", None)
