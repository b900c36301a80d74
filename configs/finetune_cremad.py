"""Fine-tuning for CREMA-D 6-class emotion recognition (ANG DIS FEA HAP NEU SAD), restoring a pretrained encoder.

  python -m avt_jax.main --config=configs/finetune_cremad.py --config.init_from=<pretraining workdir> --workdir=...

Default data: the CREMA-D clips of the bundled sample (actor 1001; a smoke run, not a benchmark: train, validation
and test are the same four clips). For the real protocol (speaker-independent folds, validation from the training
actors, test once at the selected checkpoint) see README "Reproduce the paper's table".
Variant `:tiny` for tests.
"""

from avt_jax import config_lib, records


def get_config(arg: str = ""):
  c = config_lib.base_config("finetune")
  c.task = "classification"
  c.model.num_classes = len(records.CLASS_NAMES["crema_d"])
  c.model.readout = "last"
  crema = {"where": {"dataset": ("crema_d",)}}
  # Validation (data.eval) selects the checkpoint; data.test is evaluated once, at the selected checkpoint.
  config_lib.use_data(c, config_lib.SAMPLE, crema)
  c.total_steps = 60
  c.eval_every_steps = 20
  c.checkpoint_every_steps = 20
  c.batch_size = 4
  c.eval_batch_size = 4
  c.optimizer.lr = 5e-5
  c.select_metric = "accuracy"
  if arg == "tiny":
    config_lib.tiny(c)
    c.eval_every_steps = 3
    return c
  if arg:
    raise ValueError(f"unknown variant {arg!r} of configs/finetune_cremad.py; expected '' or 'tiny'")
  return c
