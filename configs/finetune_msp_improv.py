"""Fine-tuning for continuous arousal / valence (MSP-IMPROV style), restoring a pretrained encoder. Reports CCC.

  python -m avt_jax.main --config=configs/finetune_msp_improv.py --config.init_from=<pretraining workdir> ...

Default data: the CREMA-D clips of the bundled sample with STAND-IN ratings (sample/crema_d_standin_ratings.csv:
arousal / valence placed by the acted category's quadrant of the arousal-valence plane, not human ratings), so the
default pretraining run's checkpoint can be fine-tuned here. A smoke run, not a benchmark. For the real task give a
prepared MSP-IMPROV directory (python -m data.prepare --dataset=msp_improv) as data.train / eval / test with
leave-one-session-out filters (configs/sweeps/msp_improv.py); for the synthetic benchmark see
configs/finetune_synth.py. Variant `:tiny` for tests.
"""

from avt_jax import config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config("finetune")
  c.task = "regression"
  c.model.num_targets = 2
  c.model.readout = "last"
  c.loss.regression = "mse"              # or 'ccc' (1 - CCC of the batch)
  c.loss.target_indices = (0, 1)         # arousal, valence (dominance = 2)
  c.loss.target_names = ("arousal", "valence")
  rated = {"where": {"dataset": ("crema_d",)}}
  # Validation (data.eval) selects the checkpoint; data.test is evaluated once, at the selected checkpoint.
  config_lib.use_data(c, config_lib.SAMPLE, rated)
  c.batch_size = 4
  c.eval_batch_size = 4
  c.total_steps = 60
  c.eval_every_steps = 20
  c.checkpoint_every_steps = 20
  c.optimizer.lr = 5e-5
  c.select_metric = "ccc_mean"
  if arg == "tiny":
    config_lib.tiny(c)
    c.eval_every_steps = 3
    return c
  if arg:
    raise ValueError(f"unknown variant {arg!r} of configs/finetune_msp_improv.py; expected '' or 'tiny'")
  return c
