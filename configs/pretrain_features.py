"""Masked-frame pretraining on precomputed per-frame features: the paper's inputs (512-d TRILL audio embeddings and
17 OpenFace AU intensities at 5 frames/s, 100-frame clips), `base` model, as released (causal attention, last-frame
readout, BERT-Adam, batch 64).

  python -m data.prepare --input=<dir with <stem>.npy + <stem>.csv> --output=/data/avt/vox2_features
  python -m avt_jax.main --config=configs/pretrain_features.py --config.data.train=/data/avt/vox2_features ...
  python -m avt_jax.summary --config=configs/pretrain_features.py [--config.model.size=large]

The summary works without the data: the input widths come from model.audio_frontend.dim / visual_frontend.dim.
"""

from avt_jax import config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config("pretrain")
  c.data.train = "/data/avt/vox2_features"
  c.data.eval = ""
  c.data.max_tokens = 100
  c.batch_size = 64
  c.num_epochs = 40                    # the paper: 40 epochs (total_steps follows from the data size)
  c.log_every_steps = 100
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 2000
  c.model.audio_frontend = dict(type="features", dim=512)
  c.model.visual_frontend = dict(type="features", dim=17)
  if arg:
    raise ValueError(f"unknown variant {arg!r} of configs/pretrain_features.py")
  return c
