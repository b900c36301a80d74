"""Tasks: a task defined here, outside the package, trains, evaluates, selects and tests through the unchanged
trainer; the registry refuses what it cannot run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avt_jax import config_lib, input_pipeline, tasks, train
from avt_jax import setup as setup_lib
from avt_jax.models import avt

CACHE = os.path.join(os.environ.get("PYTEST_XLA_CACHE", "/tmp"), f"avt_jax_test_xla_{os.getuid()}")


@tasks.register("toy_fill")
class FillFraction(tasks.Task):
  """Predicts which fraction of the T token slots a clip fills (its length / T): a fourth task, squared error."""

  batch_keys = ("audio", "visual", "mask", "weight")
  default_selection = "mse"
  minimize = frozenset({"mse", "loss"})

  def build_model(self, model_config):
    return avt.FinetuneModel(model_config, num_outputs=1)

  @staticmethod
  def target(batch):
    return batch["mask"].astype(jnp.float32).mean(axis=1)

  def loss(self, params, batch, rng, train):
    _, dropout_rng = self.split_rng(rng)
    out = self.apply(params, batch, dropout_rng, train)["output"][:, 0]
    w = batch["weight"].astype(jnp.float32)
    return ((out - self.target(batch)) ** 2 * w).sum() / jnp.maximum(w.sum(), 1.0), {}

  def eval_stats(self, params, batch, rng):
    err = (self.predict(params, batch)[:, 0] - self.target(batch)) ** 2
    w = batch["weight"].astype(jnp.float32)
    return {"sse": (err * w).sum(), "clips": w.sum()}

  def finish(self, stats):
    return {"mse": float(stats["sse"]) / max(float(stats["clips"]), 1.0), "clips": float(stats["clips"])}


def _toy_config():
  cfg = config_lib.tiny(config_lib.base_config("finetune"))
  cfg.task = "toy_fill"
  cfg.batch_size = cfg.eval_batch_size = 8
  cfg.data.test = config_lib.SAMPLE
  cfg.data.max_tokens = 16           # the sample's clips have 9 to 14 tokens: targets 0.56 to 0.88
  cfg.total_steps = 4
  cfg.eval_every_steps = cfg.checkpoint_every_steps = 2
  cfg.log_every_steps = 1
  cfg.compilation_cache_dir = CACHE
  return cfg


def test_a_new_task_runs_through_the_unchanged_trainer(tmp_path):
  wd = str(tmp_path / "toy")
  result = train.run(_toy_config(), wd)
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  evals = {r["step"]: r["mse"] for r in rows if r["split"] == "eval"}
  assert sorted(evals) == [2, 4]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
  # Selected by the task's own metric, lower is better; the test split is evaluated at the selected step.
  best = min(evals, key=evals.get)
  assert result["best/step"] == best and result["best/mse"] == pytest.approx(evals[best])
  assert result["test/clips"] == result["eval/clips"] == 12.0
  assert result["test/mse"] == pytest.approx(evals[best], rel=1e-6)  # test = eval = the sample here

  # The last validation MSE by hand: numpy over the step-4 checkpoint's predictions and the clips' lengths.
  config = config_lib.from_json(json.load(open(os.path.join(wd, "config.json"))))
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config)
  sources, geometry = input_pipeline.open_sources(config_lib.data_spec(config, "eval"))
  s = setup_lib.build(config, geometry, optimizer=False)
  params = s.restore_params(os.path.join(wd, "checkpoints", "4"))
  predict = jax.jit(s.task.predict)
  errors = []
  with s.scope():
    for batch in input_pipeline.make_dataset(config_lib.data_spec(config, "eval"), split="eval",
                                             global_batch_size=8, seed=0, max_tokens=16, keys=s.task.batch_keys):
      out = np.asarray(predict(params, batch))[:, 0].astype(np.float64)
      keep = batch["weight"] > 0
      errors += list((out[keep] - batch["mask"][keep].sum(axis=1) / 16.0) ** 2)
  lengths = sorted(int(sources[0][i]["num_tokens"]) for i in range(len(sources[0])))
  assert len(errors) == len(lengths) == 12
  assert evals[4] == pytest.approx(float(np.mean(errors)), rel=1e-5)


def test_registry_names_what_it_knows():
  assert {"pretrain", "classification", "regression", "toy_fill"} <= set(tasks.names())
  cfg = _toy_config()
  cfg.task = "segmentation"
  with pytest.raises(ValueError, match=r"config.task='segmentation'; expected one of \("):
    train.validate_config(cfg)
  cfg.task = "pretrain"  # a pretraining task in a fine-tuning run
  with pytest.raises(ValueError, match="config.task='pretrain' trains with config.mode='pretrain', not 'finetune'"):
    train.validate_config(cfg)
  with pytest.raises(ValueError, match="registered twice"):
    tasks.register("classification")(FillFraction)


def test_each_task_reads_only_its_batch_keys():
  # Fine-tuning batches carry no reconstruction targets; pretraining batches no labels.
  keys = {name: tasks.get(name).batch_keys for name in ("pretrain", "classification", "regression")}
  assert "audio_target" not in keys["classification"] and "visual_target" not in keys["regression"]
  assert "label" not in keys["pretrain"] and "targets" not in keys["pretrain"]
  info = input_pipeline.open_sources(config_lib.SAMPLE)[0][0].info
  record = input_pipeline.open_sources(config_lib.SAMPLE)[0][0][0]
  for name, k in keys.items():
    example = input_pipeline.ClipTransform(info, 8, train=False, keys=k)(record)
    assert tuple(example) == k, name
