"""Trainer tests on the bundled sample: resume after SIGKILL / SIGTERM equals an uninterrupted run, 1 vs 8 devices,
restoring onto another mesh, init_from errors, fine-tuning from a pretraining run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from avt_jax import checkpointing, config_lib, input_pipeline, sharding, train

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


def test_sigkill_then_resume_equals_uninterrupted_run(uninterrupted, tmp_path):
  wd = str(tmp_path / "killed")
  proc = subprocess.Popen(_cmd(wd, *LONG), env=_env(1), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(os.path.join(wd, "checkpoints", "10"), proc)
  proc.send_signal(signal.SIGSTOP)  # Freeze it at once, then kill it without any chance to clean up.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(wd, "checkpoints", "40")), "the run finished before it was killed"
  _run(wd, *LONG)
  _assert_same_params(_params(uninterrupted, 40), _params(wd, 40))
  # Same data order and updates after the resume: every logged training loss equals the uninterrupted run's.
  full, resumed = _train_losses(uninterrupted), _train_losses(wd)
  assert set(range(11, 41)) <= set(resumed)
  for step in range(11, 41):
    assert resumed[step] == full[step], step


def test_sigterm_saves_and_relaunch_finishes_identically(uninterrupted, tmp_path):
  wd = str(tmp_path / "preempted")
  proc = subprocess.Popen(_cmd(wd, *LONG), env=_env(1), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
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


def test_one_device_and_eight_device_mesh_give_the_same_losses(tmp_path):
  common = ["--config.batch_size=8", "--config.eval_batch_size=8", "--config.total_steps=4", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=0"]
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  _run(one, *common, "--config.mesh.data=1", devices=1)
  _run(eight, *common, "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8)
  a, b = _train_losses(one), _train_losses(eight)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    np.testing.assert_allclose(a[step], b[step], rtol=2e-5)


def _tiny_config(**data):
  cfg = config_lib.tiny(config_lib.base_config("pretrain"))
  cfg.batch_size = cfg.eval_batch_size = 8
  cfg.compilation_cache_dir = "none"
  for k, v in data.items():
    cfg.data[k] = v
  return cfg


def _abstract_state(cfg, mesh):
  _, geometry = input_pipeline.open_sources(train.data_spec(cfg, "train"))
  train.fill_model_config(cfg, geometry)
  dummy = input_pipeline.dummy_batch(geometry, cfg.batch_size, cfg.data.max_tokens)
  rules = sharding.rules_from_config(cfg.mesh.get("rules"))
  model = train.build_model(cfg)
  with jax.set_mesh(mesh):
    import flax.linen as nn
    with nn.logical_axis_rules(rules):
      return train.create_state(cfg, model, dummy, mesh, rules)


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  cfg = _tiny_config()
  mesh_a = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  abstract_a, _, init_a, _, _ = _abstract_state(cfg, mesh_a)
  state = init_a()
  manager = checkpointing.make_manager(str(tmp_path), keep=1, async_save=False, with_data_iter=False)
  checkpointing.save(manager, 0, state, force=True)
  manager.wait_until_finished()
  mesh_b = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, devices=jax.devices()[:8])
  abstract_b, shardings_b, _, _, _ = _abstract_state(cfg, mesh_b)
  restored = checkpointing.restore(manager, 0, abstract_b)
  _assert_same_params(jax.device_get(state["params"]), jax.device_get(restored["params"]))
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings_b)):
    assert x.sharding == s
  # Something is really sharded differently on the two meshes.
  kernel_a = state["params"]["encoder"]["joint"]["layer_0"]["fc1"]["kernel"]
  kernel_b = restored["params"]["encoder"]["joint"]["layer_0"]["fc1"]["kernel"]
  assert kernel_a.sharding.shard_shape(kernel_a.shape) != kernel_b.sharding.shard_shape(kernel_b.shape)


def test_wrong_init_from_names_the_parameters(tmp_path):
  cfg = _tiny_config()
  mesh = sharding.make_mesh({"data": -1})
  abstract, _, init, _, _ = _abstract_state(cfg, mesh)
  checkpointing.save_pretrained(str(tmp_path / "small"), jax.device_get(init()["params"]), cfg.to_dict())
  ft = config_lib.tiny(config_lib.base_config("finetune"))
  ft.batch_size = ft.eval_batch_size = 8
  ft.compilation_cache_dir = "none"
  ft.model.size = "custom"
  ft.model.width = 48           # does not fit the width-32 checkpoint
  ft.init_from = str(tmp_path / "small")
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    train.run(ft, str(tmp_path / "ft"))
  msg = str(err.value)
  assert "shape mismatch (" in msg
  assert "cross_audio_visual/layer_0/fc1/kernel: checkpoint (32, 128) vs model (48, 192)" in msg
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    checkpointing.restore_encoder(str(tmp_path), abstract["params"]["encoder"])


def test_finetune_from_pretraining_run_logs_classification_metrics(uninterrupted, tmp_path):
  wd = str(tmp_path / "ft")
  proc = subprocess.run(
      [sys.executable, "-m", "avt_jax.main", f"--config={REPO}/configs/finetune_cremad.py:tiny",
       f"--config.compilation_cache_dir={CACHE}", f"--config.init_from={uninterrupted}", f"--workdir={wd}"],
      env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"initialising the encoder from {uninterrupted}" in proc.stderr
  final = json.load(open(os.path.join(wd, "final_metrics.json")))
  for key in ("test/accuracy", "test/uar", "test/macro_f1", "best/step"):
    assert key in final
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert any(r["split"] == "eval" and "accuracy" in r for r in rows)


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


def test_parameter_free_switches_that_differ_from_init_from_are_reported(tmp_path):
  from avt_jax.models import avt
  (tmp_path / "config.json").write_text(json.dumps({"padding_mask": False, "release_positions": True,
                                                    "causal": True}))
  diffs = train.warn_model_differences(str(tmp_path), avt.model_config("base"))
  assert diffs == ["padding_mask: False there, True here", "release_positions: True there, False here"]
  same = avt.model_config("base", padding_mask=False, release_positions=True)
  assert train.warn_model_differences(str(tmp_path), same) == []
