"""CREMA-D 6-class table: pretrained vs scratch, 10% / 100% labels, 5 speaker-independent folds x 3 seeds.

  export AVT_CREMA_D=/data/avt/crema_d            # prepared CREMA-D (python -m data.prepare --dataset=crema_d)
  export AVT_PRETRAINED=/data/avt/runs/pretrain   # a pretraining workdir (configs/pretrain.py:voxceleb2) or a
                                                  # checkpoint written by avt_jax.convert_release
  python -m launch.sweep --sweep=configs/sweeps/cremad.py --workdir=/data/avt/sweeps/cremad [--dry_run]

Folds: data/folds/crema_d.json (actor blocks, validation = 9 actors of the next block). Label-fraction subsets are
written to <workdir>/subsets.json from $AVT_CREMA_D/manifest.jsonl (stratified by emotion, deterministic). The
pretrained checkpoint must have the model of configs/finetune_cremad.py (base, same input kind as the prepared
data). 2 fractions x 5 folds x 3 seeds x 2 inits x 2 learning rates = 120 runs; on one accelerator print them
with --dry_run and distribute the commands.
"""

import os

DATA = os.environ.get("AVT_CREMA_D", "/data/avt/crema_d")
PRETRAINED = os.environ.get("AVT_PRETRAINED", "/data/avt/runs/pretrain")


def get_sweep():
  return dict(
      name="CREMA-D: pretrained vs scratch (6 classes, 5 actor folds)",
      config="configs/finetune_cremad.py",
      pretrain=dict(init_from=PRETRAINED),
      folds="data/folds/crema_d.json",
      subsets=None,
      fractions=(0.1, 1.0),
      seeds=(0, 1, 2),
      inits=("pretrained", "scratch"),
      lrs=(5e-5, 1e-4),
      overrides={"data.train": DATA, "data.eval": DATA, "data.test": DATA, "data.max_tokens": 50,
                 "batch_size": 32, "eval_batch_size": 64, "total_steps": 3000, "eval_every_steps": 250,
                 "checkpoint_every_steps": 500, "keep_checkpoints": 1, "log_every_steps": 50,
                 "select_metric": "accuracy"},
  )
