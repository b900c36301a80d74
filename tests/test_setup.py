"""Setup on meshes: the same losses on 1 and 8 devices, a checkpoint restored onto another mesh, init_from that
does not fit named parameter by parameter, and parameter-free model switches that differ from init_from's run."""

import json

import jax
import numpy as np
import pytest

from avt_jax import checkpointing, config_lib, input_pipeline, sharding, train
from avt_jax import setup as setup_lib
from test_train import _assert_same_params, _run, _train_losses  # pylint: disable=g-bad-import-order


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
  _, geometry = input_pipeline.open_sources(config_lib.data_spec(cfg, "train"))
  s = setup_lib.build(cfg, geometry, mesh=mesh)
  return s.abstract_state, s.state_shardings, s.init, s.tx, s.schedule


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


def test_parameter_free_switches_that_differ_from_init_from_are_reported(tmp_path):
  from avt_jax.models import avt
  (tmp_path / "config.json").write_text(json.dumps({"padding_mask": False, "release_positions": True,
                                                    "causal": True}))
  diffs = setup_lib.warn_model_differences(str(tmp_path), avt.model_config("base"))
  assert diffs == ["padding_mask: False there, True here", "release_positions: True there, False here"]
  same = avt.model_config("base", padding_mask=False, release_positions=True)
  assert setup_lib.warn_model_differences(str(tmp_path), same) == []
