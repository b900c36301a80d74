"""Masked-frame pretraining on the unlabelled pool of the synthetic benchmark (sample/avt_synth/pretrain).

  python -m data.synth --output=sample/avt_synth          # once (the directory is committed)
  python -m avt_jax.main --config=configs/pretrain_synth.py --workdir=/tmp/avt_synth_pretrain

The pool's speakers are disjoint from the labelled speakers (data/synth.py), so no test speaker is seen, even
unlabelled. The model block must match configs/finetune_synth.py (the fine-tuning run restores this encoder).
Variant `:tiny` for tests.
"""

import os

from avt_jax import config_lib

# Shared with configs/finetune_synth.py: a small model that trains in minutes on a CPU.
SYNTH_MODEL = dict(size="custom", width=64, num_heads=4, num_layers=2)


def get_config(arg: str = ""):
  c = config_lib.base_config("pretrain")
  c.model.update(SYNTH_MODEL)
  c.data.train = os.path.join(config_lib.SYNTH, "pretrain")
  c.data.eval = ""                     # no validation: the encoder of the last checkpoint is used
  c.data.max_tokens = 16               # avt_synth clips have 8-16 tokens
  c.batch_size = 32
  c.total_steps = 1500
  c.log_every_steps = 50
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 1
  c.optimizer.lr = 1e-3
  c.masking.ratio = 0.05               # as released: ceil(5% of the length) spans of 3 tokens
  if arg == "v2":
    v2 = config_lib.SYNTH_V2
    c.data.train = os.path.join(v2, "pretrain")
    c.data.eval = os.path.join(v2, "pretrain_val")
    # The v2 protocol's pretraining since attempt 2 was confirmed (docs/protocols.md): bidirectional attention,
    # 3600 steps. The first protocol's: model.causal=True, total_steps=1200.
    c.model.causal = False
    c.total_steps = 3600
    c.eval_every_steps = 200
    c.eval_batch_size = 100
    held = [f"synthval_s{s:02d}" for s in range(10)]
    c.evals.eval.select = False        # the fine-tuning arm takes the last checkpoint, as for v1
    c.evals.probe = dict(type="linear_probe", when="during", target="label",
                         fit={"path": c.data.eval, "where": {"speaker": tuple(held[:5])}},
                         data={"path": c.data.eval, "where": {"speaker": tuple(held[5:])}})
    return c
  if arg == "tiny":
    c.model.update(dict(width=32, num_heads=2, num_layers=1))
    c.batch_size = 8
    c.total_steps = 4
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    return c
  if arg:
    raise ValueError(f"unknown variant {arg!r} of configs/pretrain_synth.py; expected '', 'v2' or 'tiny'")
  return c
