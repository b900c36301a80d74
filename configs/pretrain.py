"""Masked-frame pretraining of the paper's `base` model.

Default: the bundled sample clips (sample/prepared: CREMA-D + GRID, log-mel + face crops), a short CPU run.
Variants: `configs/pretrain.py:tiny` (seconds, for tests), `configs/pretrain.py:voxceleb2` (the paper's
setting on a prepared VoxCeleb2: batch 64, 40 epochs of ~500k clips, 100-token clips; set --config.data.train).
"""

from avt_jax import config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config("pretrain")
  if arg == "tiny":
    return config_lib.tiny(c)
  if arg == "voxceleb2":
    c.data.train = "/data/avt/voxceleb2"
    c.data.eval = ""
    c.data.max_tokens = 100
    c.data.worker_count = 8
    c.batch_size = 64
    c.num_epochs = 40                   # the paper: 40 epochs (total_steps follows from the data size)
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.eval_max_batches = 50
    c.checkpoint_every_steps = 2000
    c.model.dtype = "bfloat16"
    return c
  if arg:
    raise ValueError(f"unknown variant {arg!r} of configs/pretrain.py; expected '', 'tiny' or 'voxceleb2'")
  return c
