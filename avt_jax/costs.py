"""What a model costs: parameter counts per module, FLOPs of a compiled step, and the peak FLOP/s of a device (MFU)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip by `device_kind` prefix (vendor data sheets). Override with config.peak_flops.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


def peak_flops(override: float = 0.0) -> float:
  """Peak FLOP/s of one local device (0 when unknown, e.g. on CPU)."""
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind
  for prefix, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return value
  return 0.0


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_table(params: Mapping[str, Any], depth: int = 2) -> tuple[str, int]:
  """A text table of parameter counts per module (down to `depth` levels) and the total."""
  rows = []

  def walk(tree, prefix, level):
    for name in tree:
      sub = tree[name]
      path = f"{prefix}/{name}" if prefix else name
      if isinstance(sub, Mapping) and level < depth:
        rows.append((path, count(sub)))
        walk(sub, path, level + 1)
      else:
        rows.append((path, count(sub)))

  walk(params, "", 1)
  total = count(params)
  width = max([len(r[0]) for r in rows] + [5])
  lines = [f"{'module':<{width}}  {'parameters':>12}", "-" * (width + 14)]
  lines += [f"{p:<{width}}  {n:>12,}" for p, n in rows]
  lines += ["-" * (width + 14), f"{'total':<{width}}  {total:>12,}"]
  return "\n".join(lines), total


def compiled_flops(compiled) -> float:
  """FLOPs of a compiled computation from XLA's cost analysis (0 if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return 0.0
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))
