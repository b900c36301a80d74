"""The control for configs/sweeps/synth_v2.py: the same protocol on avt_synth v1 (sample/avt_synth).

  python -m launch.sweep --sweep=configs/sweeps/synth_v1_control.py --workdir=/tmp/avt_synth_v1_control --parallel=2

v1's label is close to linear in the clip means of its inputs (a logistic regression on them reaches ~71% with 10%
of the labels), so no pretrained - scratch gap is expected here. The same axes, budget, learning rate and
validation subsampling as synth_v2.py; pretraining as configs/pretrain_synth.py (1000 pool clips, 1200 steps as
in v2). v1 has no held-out pool speakers, so this sweep has no gate. The argument "pretrain_steps=<n>" changes the
pretraining's length, as for synth_v2.py.
"""


def get_sweep(arg: str = ""):
  key, sep, value = arg.partition("=")
  if arg and (key != "pretrain_steps" or not sep):
    raise ValueError(f"configs/sweeps/synth_v1_control.py:{arg}: expected 'pretrain_steps=<n>'")
  return dict(
      name="avt_synth v1 (control): pretrained vs scratch, 6 classes, speaker-independent folds",
      config="configs/finetune_synth.py",
      pretrain=dict(config="configs/pretrain_synth.py", overrides={"total_steps": int(value) if arg else 1200}),
      folds="data/folds/avt_synth.json",
      subsets=None,
      subsample_validation=True,
      fractions=(0.1, 1.0),
      seeds=(0, 1),
      inits=("pretrained", "scratch"),
      lrs=(1e-3,),
  )
