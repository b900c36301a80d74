"""Fine-tuning for continuous arousal / valence (MSP-IMPROV style), restoring a pretrained encoder. Reports CCC.

  python -m avt_jax.main --config=configs/finetune_msp_improv.py --config.init_from=<pretraining workdir> ...

Default data: the bundled sample with the stand-in ratings written by `python -m data.prepare` for clips without
ratings? No: the sample has no ratings, so the default is the synthetic benchmark `avt_synth` when it has been
generated (see README); set --config.data.train/eval/test to a prepared MSP-IMPROV directory for the real task.
Variant `:tiny` for tests.
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
  c.data.train = config_lib.SYNTH
  c.data.eval = config_lib.SYNTH
  c.data.test = config_lib.SYNTH
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
