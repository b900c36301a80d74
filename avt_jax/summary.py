"""Parameter table and FLOPs of a config's training step.

  python -m avt_jax.summary --config=configs/pretrain_features.py [--config.model.size=large ...]

prints the parameters per module (and the total) and the FLOPs per clip of one training step (forward, backward and
optimizer update, from XLA's cost analysis of the compiled step on this machine).
"""

from __future__ import annotations

import jax

from avt_jax import config_lib, costs, input_pipeline, train
from avt_jax import setup as setup_lib


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  config = flags.FLAGS.config
  train.validate_config(config)
  config = config.copy_and_resolve_references()
  geometry = setup_lib.geometry_from_model(config) or input_pipeline.open_sources(
      config_lib.data_spec(config, "train"))[1]
  with config.unlocked():
    setup = setup_lib.build(config, geometry, devices=jax.devices()[:1], batch_size=config.batch_size)
  params = setup.abstract_params
  table, total = costs.param_table(params)
  print(table)
  enc = costs.count(params["encoder"])
  print(f"\nencoder path: {enc:,} parameters ({enc / 1e6:.2f}M); total {total / 1e6:.2f}M")
  with setup.scope():
    compiled = train.jit_train_step(setup).lower(setup.abstract_state, setup.abstract_stored_batch,
                                                 jax.random.key(0)).compile()
  flops = costs.compiled_flops(compiled)
  print(f"training step: batch {config.batch_size} x {config.data.max_tokens} tokens, "
        f"{flops:.4g} FLOP/step, {flops / config.batch_size:.4g} FLOP per clip (XLA cost analysis)")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.mark_flags_as_required(["config"])
  app.run(main)
