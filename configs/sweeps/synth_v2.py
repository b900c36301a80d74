"""Pretrained vs scratch on avt_synth_v2 ("nonlinear views"), pre-registered (docs/protocols.md, "avt_synth_v2").

  python -m launch.sweep --sweep=configs/sweeps/synth_v2.py --workdir=/tmp/avt_synth_v2 --parallel=2
  python -m launch.sweep --sweep=configs/sweeps/synth_v2.py:seed=1 --workdir=/tmp/avt_synth_v2_seed1 --parallel=2

The argument ("seed=<n>", "data=<dir>" or both, comma-separated) names the benchmark: the one `python -m
data.synth --version=2 --seed=<n>` writes, at <dir> (default sample/avt_synth_v2 for seed 0,
sample/avt_synth_v2_seed<n> otherwise); the sweep writes it there first when it is missing, and refuses a
directory that holds another seed's benchmark. "pretrain_steps=<n>" changes the pretraining's length (for attempts
registered in docs/protocols.md).

The protocol (changing a line here is a new protocol, reported as such). Fixed before any run, with one change
since: attempt 2 (bidirectional attention, 3600 pretraining steps), chosen on the held-out pool and confirmed on
benchmarks 0 and 4 as registered in docs/protocols.md, is the protocol's model and pretraining; the first
protocol's runs are reproduced with "pretrain_steps=1200" and --set=model.causal=true.
  model         bidirectional attention (model.causal=False) in pretraining and fine-tuning
  pretraining   configs/pretrain_synth.py:v2 on the pool (150 speakers), 3600 steps, batch 32, lr 1e-3, mask
                ratio 0.05 x span 3; the last checkpoint is fine-tuned; validated on the 10 held-out pool speakers
  gate          the pretrained model's L1 on the zeroed frames of the held-out pool must be below the
                past-mean predictor's; otherwise the table says "pretraining did not learn"
  fine-tuning   configs/finetune_synth.py:v2, 300 steps, batch 16, lr 1e-3 (one rate, fixed in advance), validation
                every 25 steps, checkpoint selected on validation accuracy, test once at that checkpoint
  axes          5 speaker folds (data/folds/avt_synth_v2.json) x seeds {0, 1} x labels {10%, 100%} x
                {pretrained, scratch}; at 10% the validation split is subsampled with the same stratified fraction
  success       at 10%: mean paired (pretrained - scratch) test accuracy >= +5 points with the 95% t-interval over
                the 10 (fold, seed) pairs above 0, on seed 0 and on another seed; the gap at 100% smaller than at
                10%; the gate passed
"""

import json
import os

from avt_jax import config_lib


def _options(arg: str) -> tuple[int, str, int | None]:
  opts = {}
  for item in filter(None, arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in ("seed", "data", "pretrain_steps"):
      raise ValueError(f"configs/sweeps/synth_v2.py:{arg}: expected 'seed=<n>', 'data=<dir>', "
                       "'pretrain_steps=<n>' (comma-separated)")
    opts[key] = value
  seed = int(opts.get("seed", 0))
  data = opts.get("data") or (config_lib.SYNTH_V2 if seed == 0 else f"{config_lib.SYNTH_V2}_seed{seed}")
  data = os.path.abspath(os.path.expanduser(data))
  info = os.path.join(data, "dataset_info.json")
  if os.path.exists(info):
    with open(info) as f:
      generator = json.load(f).get("generator", {})
    if generator.get("version") != 2 or generator.get("seed") != seed:
      raise ValueError(f"{data} holds avt_synth version {generator.get('version', 1)} seed {generator.get('seed')}, "
                       f"not version 2 seed {seed}: name another data=<dir>")
  return seed, data, int(opts["pretrain_steps"]) if "pretrain_steps" in opts else None


def get_sweep(arg: str = ""):
  seed, data, pretrain_steps = _options(arg)
  pretrain_overrides = {} if pretrain_steps is None else {"total_steps": pretrain_steps}
  return dict(
      name=f"avt_synth_v2 (benchmark seed {seed}): pretrained vs scratch, 6 classes, speaker-independent folds",
      prepare=dict(creates=data, command=["python", "-m", "data.synth", "--version=2", f"--seed={seed}",
                                          f"--output={data}"]),
      config="configs/finetune_synth.py:v2",
      pretrain=dict(config="configs/pretrain_synth.py:v2", overrides={
          "data.train": os.path.join(data, "pretrain"), "data.eval": os.path.join(data, "pretrain_val"),
          "evals.probe.fit.path": os.path.join(data, "pretrain_val"),
          "evals.probe.data.path": os.path.join(data, "pretrain_val"), **pretrain_overrides}),
      gate=dict(model="eval/zeroed_l1", beat="eval/zeroed_l1_past_mean", baselines=["eval/zeroed_l1_clip_mean"]),
      folds="data/folds/avt_synth_v2.json",
      subsets=None,                   # drawn into <workdir>/subsets.json from this benchmark's manifest
      subsample_validation=True,
      fractions=(0.1, 1.0),
      seeds=(0, 1),
      inits=("pretrained", "scratch"),
      lrs=(1e-3,),
      overrides={"data.train": data, "data.eval": data, "data.test": data},
  )
