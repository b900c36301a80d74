"""The task's own metrics on one split: one pass, exact metrics from the summed sufficient statistics.

Each batch gives the task's `eval_stats` (sums over the global batch, clu Metrics); they are merged over the split
and turned into metrics once by the task's `finish` (accuracy, UAR, macro F1; CCC per attribute; masked L1 ...).
"""

from __future__ import annotations

import jax

from avt_jax import input_pipeline, sharding
from avt_jax.evaluators import data_spec
from avt_jax.tasks.base import merge_stats


class Evaluator:

  def __init__(self, name: str, eval_config, setup):
    self.name, self.config, self.setup = name, dict(eval_config), setup
    run_config = setup.config
    self.spec = data_spec(run_config, self.config["data"])
    self.batch_size = int(self.config.get("batch_size") or run_config.get("eval_batch_size", run_config.batch_size))
    self.seed = int(run_config.seed)
    task = setup.task
    repl = sharding.replicated(setup.mesh)
    self._step = jax.jit(task.eval_stats, in_shardings=(setup.param_shardings, setup.batch_shardings, repl),
                         out_shardings=repl)

  def run(self, params, max_batches: int = 0) -> dict[str, float]:
    setup = self.setup
    ds = input_pipeline.make_dataset(self.spec, split="eval", global_batch_size=self.batch_size, seed=self.seed,
                                     max_tokens=setup.max_tokens, worker_count=0, keys=setup.task.batch_keys,
                                     normalization=setup.normalization)
    rng = jax.random.key(self.seed + 1)
    stats = None
    with setup.scope():
      for i, local in enumerate(ds):
        if max_batches and i >= max_batches:
          break
        batch = sharding.global_batch(local, setup.mesh)
        stats = merge_stats(stats, jax.device_get(self._step(params, batch, jax.random.fold_in(rng, i))))
    return {} if stats is None else setup.task.finish(stats)
