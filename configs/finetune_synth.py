"""Fine-tuning on the synthetic benchmark avt_synth (data/synth.py): 6 classes, or arousal / valence CCC.

  python -m avt_jax.main --config=configs/finetune_synth.py --workdir=/tmp/avt_synth_ft \
      [--config.init_from=<configs/pretrain_synth.py workdir>]

Default data: fold 0 of data/folds/avt_synth.json (train / validation / test speakers disjoint); the sweeps in
configs/sweeps/ replace the filters per fold and label fraction. Variants: '' (classification), 'regression'
(arousal + valence, CCC), 'tiny' and 'regression_tiny' (seconds, for tests), 'v2' (classification on avt_synth_v2,
fold 0 of data/folds/avt_synth_v2.json). The model block must match configs/pretrain_synth.py.
"""

import json
import os

from avt_jax import config_lib

SYNTH_MODEL = dict(size="custom", width=64, num_heads=4, num_layers=2)
FOLDS = os.path.join(config_lib.REPO, "data", "folds", "avt_synth.json")
FOLDS_V2 = os.path.join(config_lib.REPO, "data", "folds", "avt_synth_v2.json")


def fold_filters(fold: int = 0, folds_file: str = FOLDS) -> dict:
  """config.data.<split>_filter of a fold of data/folds/avt_synth.json (tuples inside)."""
  with open(folds_file) as f:
    spec = json.load(f)
  one = spec["folds"][fold]
  return {f"{key}_filter": {"where": {spec["field"]: tuple(one[split])}}
          for key, split in (("train", "train"), ("eval", "validation"), ("test", "test"))}


def get_config(arg: str = ""):
  variants = ("", "tiny", "regression", "regression_tiny", "v2")
  if arg not in variants:
    raise ValueError(f"unknown variant {arg!r} of configs/finetune_synth.py; expected one of {variants}")
  c = config_lib.base_config("finetune")
  c.model.update(SYNTH_MODEL)
  c.model.readout = "last"
  if arg.startswith("regression"):
    c.task = "regression"
    c.model.num_targets = 2
    c.loss.regression = "ccc"
    c.loss.target_indices = (0, 1)
    c.loss.target_names = ("arousal", "valence")
    c.select_metric = "ccc_mean"
  else:
    c.task = "classification"
    c.model.num_classes = 6
    c.select_metric = "accuracy"
  c.data.train = c.data.eval = c.data.test = config_lib.SYNTH_V2 if arg == "v2" else config_lib.SYNTH
  if arg == "v2":
    c.model.causal = False  # as configs/pretrain_synth.py:v2 (the protocol since attempt 2, docs/protocols.md)
  for key, value in fold_filters(0, FOLDS_V2 if arg == "v2" else FOLDS).items():
    c.data[key] = value
  c.data.max_tokens = 16
  c.batch_size = 16
  c.eval_batch_size = 64
  c.total_steps = 300
  c.log_every_steps = 25
  c.eval_every_steps = 25
  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 1
  c.optimizer.lr = 1e-3
  if arg.endswith("tiny"):
    c.model.update(dict(width=32, num_heads=2, num_layers=1))
    c.total_steps = 4
    c.batch_size = 8
    c.eval_batch_size = 32
    c.log_every_steps = 2
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 2
  return c
