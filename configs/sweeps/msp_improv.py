"""MSP-IMPROV arousal / valence table: pretrained vs scratch, 10% / 100% labels, leave-one-session-out x 3 seeds.

  export AVT_MSP_IMPROV=/data/avt/msp_improv      # prepared MSP-IMPROV with ratings (python -m data.prepare
                                                  # --dataset=msp_improv ...; targets = arousal, valence, dominance)
  export AVT_PRETRAINED=/data/avt/runs/pretrain   # as for configs/sweeps/cremad.py
  python -m launch.sweep --sweep=configs/sweeps/msp_improv.py --workdir=/data/avt/sweeps/msp_improv [--dry_run]

Folds: data/folds/msp_improv.json (test session k, validation the next session). Subsets are written to
<workdir>/subsets.json, stratified by arousal x valence tertile bins of each fold's training clips. The CCC loss
is used and the checkpoint is selected on the validation mean CCC of arousal and valence; CCC is computed over
all test clips of a fold. 2 fractions x 6 folds x 3 seeds x 2 inits x 2 learning rates = 144 runs.
"""

import os

DATA = os.environ.get("AVT_MSP_IMPROV", "/data/avt/msp_improv")
PRETRAINED = os.environ.get("AVT_PRETRAINED", "/data/avt/runs/pretrain")


def get_sweep():
  return dict(
      name="MSP-IMPROV: pretrained vs scratch (arousal / valence CCC, leave-one-session-out)",
      config="configs/finetune_msp_improv.py",
      pretrain=dict(init_from=PRETRAINED),
      folds="data/folds/msp_improv.json",
      subsets=None,
      fractions=(0.1, 1.0),
      seeds=(0, 1, 2),
      inits=("pretrained", "scratch"),
      lrs=(5e-5, 1e-4),
      overrides={"data.train": DATA, "data.eval": DATA, "data.test": DATA, "data.max_tokens": 50,
                 "batch_size": 32, "eval_batch_size": 64, "total_steps": 3000, "eval_every_steps": 250,
                 "checkpoint_every_steps": 500, "keep_checkpoints": 1, "log_every_steps": 50,
                 "loss.regression": "ccc", "select_metric": "ccc_mean"},
  )
