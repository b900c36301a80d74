"""avt_synth_v2's protocol on the held-out pool speakers: a development sweep for choosing settings.

  python -m launch.sweep --sweep=configs/sweeps/synth_v2_pool.py --workdir=/tmp/avt_synth_v2_pool --parallel=2 \
      [--set=model.causal=false ...]

Settings of a new attempt (pretraining or fine-tuning) are compared here, never on the benchmark's fine-tuning
folds (docs/protocols.md). Everything is configs/sweeps/synth_v2.py (same argument: "seed=<n>", "data=<dir>",
"pretrain_steps=<n>"; same
pretraining, gate and fine-tuning) except the fine-tuning data: the 10 labelled speakers of <benchmark>/pretrain_val
(no pretraining step trains on them, and none is a speaker of the benchmark's folds) in 5 folds of 6 training, 2
validation and 2 test speakers (data/folds/avt_synth_v2_pool.json), at 40% of the labels: 48 training clips and 16
validation clips per run, about what a 10% run of the benchmark trains and selects on (47-49 / 9-11).
"""

from launch import sweep as sweep_lib


def get_sweep(arg: str = ""):
  benchmark = sweep_lib.load_sweep(sweep_lib.resolve("configs/sweeps/synth_v2.py") + ":" + arg)
  pool = benchmark["pretrain"]["overrides"]["data.eval"]  # <benchmark>/pretrain_val
  return dict(
      benchmark,
      name=benchmark["name"].replace("avt_synth_v2", "avt_synth_v2 held-out pool", 1),
      folds="data/folds/avt_synth_v2_pool.json",
      fractions=(0.4,),
      overrides={"data.train": pool, "data.eval": pool, "data.test": pool},
  )
