"""Parameter table and FLOPs of a config's training step.

  python -m avt_jax.summary --config=configs/pretrain_features.py [--config.model.size=large ...]

prints the parameters per module (and the total) and the FLOPs per clip of one training step (forward, backward and
optimizer update, from XLA's cost analysis of the compiled step on this machine).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip by `device_kind` prefix (vendor data sheets). Override with config.peak_flops.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


def peak_flops(override: float = 0.0) -> float:
  """Peak FLOP/s of one local device (0 when unknown, e.g. on CPU)."""
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind
  for prefix, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return value
  return 0.0


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_table(params: Mapping[str, Any], depth: int = 2) -> tuple[str, int]:
  """A text table of parameter counts per module (down to `depth` levels) and the total."""
  rows = []

  def walk(tree, prefix, level):
    for name in tree:
      sub = tree[name]
      path = f"{prefix}/{name}" if prefix else name
      if isinstance(sub, Mapping) and level < depth:
        rows.append((path, _count(sub)))
        walk(sub, path, level + 1)
      else:
        rows.append((path, _count(sub)))

  walk(params, "", 1)
  total = _count(params)
  width = max([len(r[0]) for r in rows] + [5])
  lines = [f"{'module':<{width}}  {'parameters':>12}", "-" * (width + 14)]
  lines += [f"{p:<{width}}  {n:>12,}" for p, n in rows]
  lines += ["-" * (width + 14), f"{'total':<{width}}  {total:>12,}"]
  return "\n".join(lines), total


def compiled_flops(compiled) -> float:
  """FLOPs of a compiled computation from XLA's cost analysis (0 if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return 0.0
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from flax import linen as nn
  import jax.numpy as jnp
  from avt_jax import input_pipeline, optim, train

  config = flags.FLAGS.config
  train.validate_config(config)
  config = config.copy_and_resolve_references()
  geometry = train.geometry_from_model(config) or input_pipeline.open_sources(train.data_spec(config, "train"))[1]
  with config.unlocked():
    train.fill_model_config(config, geometry)
  model = train.build_model(config)
  batch = {k: jnp.asarray(v) for k, v in input_pipeline.dummy_batch(geometry, config.batch_size,
                                                                      config.data.max_tokens).items()}
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))
  params = nn.meta.unbox(variables["params"])
  table, total = param_table(params)
  print(table)
  enc = _count(params["encoder"])
  print(f"\nencoder path: {enc:,} parameters ({enc / 1e6:.2f}M); total {total / 1e6:.2f}M")
  tx, schedule = optim.make_optimizer(config.optimizer, params)
  step = train.make_train_step(config, model, tx, schedule)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params)}
  compiled = jax.jit(step).lower(state, batch, jax.random.key(0)).compile()
  flops = compiled_flops(compiled)
  print(f"training step: batch {config.batch_size} x {config.data.max_tokens} tokens, "
        f"{flops:.4g} FLOP/step, {flops / config.batch_size:.4g} FLOP per clip (XLA cost analysis)")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.mark_flags_as_required(["config"])
  app.run(main)
