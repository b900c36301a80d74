"""CPU time of one pretraining step of the authors' PyTorch release (github.com/mtran14/mult_pretraining, 7624d7c).

  python bench/bench_torch_release.py --release=<checkout of the release> [--batch=8,32] [--steps=5] [--warmup=2]
      [--threads=2]

Needs torch and numpy (e.g. `pip install torch --index-url https://download.pytorch.org/whl/cpu` in a separate
environment; measured with torch 2.13.0+cpu) and imports nothing from avt_jax: it is the independent reference for
the CPU rows of `python -m avt_jax.bench` (docs/scaling.md), run on the same machine in turn with it.

Timed per step, the body of the release's training loop (code/train_avc.py): model(x_a, x_v) -> nn.L1Loss on the
masked frames of both modalities (the loop's inline loss, written out here) -> loss.backward() ->
clip_grad_norm_(1.0) -> the release's BertAdam.step() (its code/optimizers.py: per-tensor clip 1.0, no bias
correction) -> zero_grad(). The model is the release's `CrossAttentionAVTransformer(n_code, n_heads, embed_size,
None x5)` with config/base.json (d=240, 10 heads, 4 layers), built as train_avc.py builds it; its dropouts are fixed
in the class (embed 0.25, residual 0.1, relu 0.1, joint attention 0.1, cross attention 0.0) and active
(model.train()). Inputs: random float32 [B, 100, 512] audio and [B, 100, 17] visual, masked as the release's
ContinuousAVDataset masks them (ceil(0.05 T) span starts of 3 frames; 80% zeroed, 10% a frame of another clip, 10%
kept), made once per batch size outside the timing (the release does it in its DataLoader; avt_jax masks inside the
step, so its timing includes the masking). Median of --steps steps after --warmup, torch.set_num_threads(--threads).

One shim, values unchanged: the release's make_positions clone()s its [B, T] input and .view(-1)s it, which torch 2.x
refuses for the joint encoder's non-contiguous input; its positional embedding is handed a contiguous input.
"""

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

T, D_A, D_V = 100, 512, 17
T_TOTAL = 40 * math.ceil(500_000 / 64)   # nominal schedule length (40 epochs of ~500k clips at batch 64); cost-neutral


def import_release(path):
  """Puts the release's code/ dir on sys.path and returns (model module, optimizers module, base config)."""
  code = os.path.join(path, "code") if os.path.isfile(os.path.join(path, "code", "model.py")) else path
  sys.path.insert(0, os.path.abspath(code))
  import model as rmodel          # noqa: E402  (release: code/model.py)
  import optimizers as roptim     # noqa: E402  (release: code/optimizers.py)
  import position_embedding as rpos  # noqa: E402
  # The shim of the module docstring (same values): newer torch keeps a non-contiguous input's strides in clone(),
  # so the release's make_positions fails on the joint encoder's input; hand it a contiguous one.
  fwd = rpos.SinusoidalPositionalEmbedding.forward
  rpos.SinusoidalPositionalEmbedding.forward = lambda self, x: fwd(self, x.contiguous())
  cfg = {"embed_size": 240, "n_heads": 10, "n_code": 4, "warmup": 0.1}
  cfg_path = os.path.join(os.path.dirname(os.path.abspath(code)), "config", "base.json")
  if os.path.isfile(cfg_path):
    import json
    with open(cfg_path) as f:
      cfg.update(json.load(f))
  return rmodel, roptim, cfg


def masked_batch(b, rng):
  """Random clips masked like the release's ContinuousAVDataset.__getitem__ (full-length clips, no padding)."""
  x_a = rng.standard_normal((b, T, D_A), dtype=np.float32)
  x_v = rng.standard_normal((b, T, D_V), dtype=np.float32)
  in_a, in_v, mask = x_a.copy(), x_v.copy(), np.zeros((b, T), bool)
  for i in range(b):
    for s in rng.integers(0, T, math.ceil(0.05 * T)):
      for t in range(s, min(s + 3, T)):
        mask[i, t] = True
        p = rng.random()
        if p < 0.8:                       # zeroed
          in_a[i, t], in_v[i, t] = 0.0, 0.0
        elif p < 0.9:                     # a frame of another clip
          j, u = (i + 1) % b, rng.integers(0, T)
          in_a[i, t], in_v[i, t] = x_a[j, u], x_v[j, u]
  return [torch.from_numpy(a) for a in (in_a, in_v, x_a, x_v, mask)]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--release", required=True, help="checkout of the release (or its code/ directory)")
  ap.add_argument("--batch", default="8,32")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()

  torch.set_num_threads(args.threads)
  warnings.filterwarnings("ignore", message="This overload of add_")   # release BertAdam's old add_(alpha, t)
  torch.manual_seed(args.seed)
  rmodel, roptim, cfg = import_release(args.release)

  # As train_avc.py: CrossAttentionAVTransformer(n_code, n_heads, embed_size, None, None, None, None, None).
  model = rmodel.CrossAttentionAVTransformer(cfg["n_code"], cfg["n_heads"], cfg["embed_size"],
                                             None, None, None, None, None)
  n_all = sum(p.numel() for p in model.parameters())
  n_unused = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("proj1", "proj2"))
  print(f"model: {type(model).__name__}(n_code={cfg['n_code']}, n_heads={cfg['n_heads']}, "
        f"embed_size={cfg['embed_size']}, None x5)")
  print(f"parameters: {n_all:,} total; {n_all - n_unused:,} without the unused proj1/proj2 ({n_unused:,})")

  criterion = nn.L1Loss()   # as train_avc.py
  rng = np.random.default_rng(args.seed)
  rows = []
  for b in [int(x) for x in args.batch.split(",")]:
    # Fresh optimizer per batch size (state is created lazily on the first step, which is a warm-up step).
    opt = roptim.BertAdam(model.parameters(), lr=1e-4, warmup=cfg["warmup"], t_total=T_TOTAL,
                          schedule="warmup_linear")
    in_a, in_v, tgt_a, tgt_v, mask = masked_batch(b, rng)
    m = mask.view(-1)
    model.train()
    times = []
    for i in range(args.warmup + args.steps):
      t0 = time.perf_counter()
      out_a, out_v = model(in_a, in_v)
      loss = (criterion(out_a.reshape(-1, D_A)[m], tgt_a.reshape(-1, D_A)[m]) +
              criterion(out_v.reshape(-1, D_V)[m], tgt_v.reshape(-1, D_V)[m]))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad()   # as the loop, after the step (torch 2 default: grads set to None)
      dt = time.perf_counter() - t0
      if i >= args.warmup:
        times.append(dt)
    ms = 1e3 * statistics.median(times)
    rows.append((b, ms, b / (ms / 1e3), loss.item()))

  print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}, float32, T={T}, median of {args.steps} steps after "
        f"{args.warmup} warm-up")
  print("\n| batch | step ms (median) | clips/s |\n|---:|---:|---:|")
  for b, ms, cps, _ in rows:
    print(f"| {b} | {ms:.1f} | {cps:.1f} |")
  print("\nlast loss per batch: " + ", ".join(f"B={b}: {l:.3f}" for b, _, _, l in rows))


if __name__ == "__main__":
  main()
