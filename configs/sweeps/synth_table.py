"""The pretrained-vs-scratch table on the synthetic benchmark avt_synth, sized for a 2-core CPU (< 20 min).

  python -m data.synth --output=sample/avt_synth       # only if sample/avt_synth is missing (it is committed)
  python -m launch.sweep --sweep=configs/sweeps/synth_table.py --workdir=/tmp/avt_synth_table

Stage 1: masked-frame pretraining on the unlabelled pool sample/avt_synth/pretrain (1000 clips of 40 speakers
that are not among the labelled speakers). Stage 2: 6-class fine-tuning on folds 0-2 of data/folds/avt_synth.json
(13 training, 3 validation, 4 test speakers each), 10% and 100% of the training labels (shipped, stratified
subsets data/folds/avt_synth_subsets.json), pretrained and from scratch, one seed and one learning rate.
"""


def get_sweep():
  return dict(
      name="avt_synth: pretrained vs scratch (6 classes, speaker-independent folds)",
      config="configs/finetune_synth.py",
      pretrain=dict(config="configs/pretrain_synth.py", overrides={"total_steps": 1000}),
      folds="data/folds/avt_synth.json",
      fold_names=("fold0", "fold1", "fold2"),
      subsets="data/folds/avt_synth_subsets.json",
      fractions=(0.1, 1.0),
      seeds=(0,),
      inits=("pretrained", "scratch"),
      lrs=(1e-3,),
      overrides={"total_steps": 300, "eval_every_steps": 25, "checkpoint_every_steps": 100},
  )
