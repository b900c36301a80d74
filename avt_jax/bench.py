"""Speed and memory of the pretraining step, and of the input pipeline that feeds it.

  python -m avt_jax.bench --size=base,large --batch=64,512 --dtype=bfloat16 [--mesh=data=-1] [--steps=20]
      [--seq=100] [--features=512,17] [--remat=false,true] [--scan_layers=false] [--grad_accum=1]
      [--prng_impl=threefry2x32,rbg,unsafe_rbg] [--dropout_masks=counter,jax] [--fused_qkv] [--rounds=5]
      [--loader=<prepared dir>] [--peak_flops=...] [--compare_dtypes] [--json=<file>] [--reuse_host_memory=false]
      [--profile [--profile_top=15]] [--products [--products_reps=20]]

For every combination of the list flags the pretraining train step of `avt_jax.train` (masked-frame
reconstruction, BERT-Adam update, sharded with the default rules on the given mesh) is compiled and run on a
synthetic batch that lives on the devices (random precomputed features of the paper's widths, 512-d audio and 17
action units, T=100 tokens). The table gives the compile time, the median step time over `--steps` steps (after
`--warmup` steps, each step waited for with block_until_ready; with `--rounds=N` all configurations are compiled
first and then timed in turn N times, for side-by-side figures on a machine whose speed drifts), clips per
second, the achieved model TFLOP/s per device, MFU (model FLOP/s over the peak of all devices; peak from
`costs.PEAK_FLOPS` by device kind or `--peak_flops`), and memory per device.

Model FLOPs are counted analytically by `model_flops_per_clip` (matrix multiplications only: projections,
attention QK^T and AV, feed-forward, reconstruction heads; backward = 2x forward). XLA's own count of the compiled
step is shown next to it as a ratio (`xla/model`): it also counts elementwise work, and recomputation under remat
(about 4/3); it counts a loop body once, so with scan_layers or grad_accum > 1 the ratio drops.

Memory: `mem GiB` is XLA's estimate for the compiled step per device (arguments + outputs + temporaries - donated
buffers); `peak GiB` is the device allocator's peak (GPU / TPU only), which is cumulative over the rows of one run:
list a single configuration per run for an exact peak.

`--loader=<dir>` also times `input_pipeline.make_dataset` on a prepared directory at each batch size (batches/s and
clips/s, including the transfer onto the devices), so one can see which side limits training.
`--compare_dtypes` trains a few steps of the same model on the same batches in float32 and bfloat16 and prints the
losses side by side (a correctness check for the low-precision path).

`--profile` traces `--steps` steps of the first configuration with `jax.profiler` (after `--warmup`) and prints,
per step: wall time, the process's user and system CPU time and page faults (`getrusage`), and the XLA ops' own
time summed over threads by pass (forward, backward, update: the optimizer, the clipping and the loss, outside
the model's scope), by part of the model (attention core, attention projections, feed-forward, LayerNorm, dropout,
residual adds, frontends, reconstruction heads) and by kind (matrix products, i.e. fusions holding a dot, against
elementwise work and reductions), then the most expensive single ops. Ops are matched to the model through the
compiled HLO's op_name metadata (the Flax module path; `transpose(` marks the backward pass). Work a matrix
library spreads over helper threads is only partly traced, so the sums are a lower bound of the CPU time: compare
parts within one report, and wall times only side by side (`--rounds`).

`--products` reads every dot of the first configuration's compiled step (inside fusions too: operand shapes,
element types, dimension numbers) and times each distinct one alone as a jitted `lax.dot_general` (operands in
the default layout, median of `--products_reps` calls after one warm-up, less the cost of calling a jitted
function), then the step itself: how much of the step the products are at this machine's matrix rate, and what
is left for everything else (normalisation, softmax, dropout, residuals, the optimizer, layout copies). A faster
step must either run the products faster (another library, precision or shape) or shrink what is left.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from avt_jax import config_lib, costs, host_memory, input_pipeline, sharding, tasks, train
from avt_jax import setup as setup_lib
from avt_jax.models import avt

GIB = 1024 ** 3


# ----------------------------------------------------------------------------------------------------------------
# Analytic FLOPs.


def _layer_flops(width: int, q_len: int, kv_len: int, mlp_ratio: int) -> float:
  """Forward FLOPs of one encoder layer for one clip (a multiply-add counts 2)."""
  proj = 2 * q_len * width * width * 2 + 2 * kv_len * width * width * 2   # Q and output on queries; K and V on keys
  attention = 2 * q_len * kv_len * width * 2                              # QK^T and AV, summed over heads
  mlp = 2 * q_len * width * (mlp_ratio * width) * 2                       # fc1 and fc2
  return float(proj + attention + mlp)


def forward_flops_per_clip(model_cfg: Mapping[str, Any], seq_len: int, audio_dim: int,
                           visual_dim: int) -> dict[str, float]:
  """Forward matmul FLOPs of the pretraining model for one clip of `seq_len` tokens, per part.

  Frontends are the per-frame feature projections (features kind). Parts: frontends, cross (both cross-modal
  encoders), joint (the self-attention encoder at twice the width), heads (the two reconstruction heads).
  """
  d, layers, r = int(model_cfg["width"]), int(model_cfg["num_layers"]), int(model_cfg.get("mlp_ratio", 4))
  e, t = 2 * d, int(seq_len)
  return {
      "frontends": float(2 * t * audio_dim * d + 2 * t * visual_dim * d),
      "cross": 2 * layers * _layer_flops(d, t, t, r),
      "joint": layers * _layer_flops(e, t, t, r),
      "heads": float(2 * (2 * 2 * t * e * e) + 2 * t * e * (audio_dim + visual_dim)),
  }


def model_flops_per_clip(model_cfg: Mapping[str, Any], seq_len: int, audio_dim: int, visual_dim: int) -> float:
  """Model FLOPs of one training step per clip: forward + backward of every matrix multiplication.

  The backward pass of a matmul costs twice its forward (gradients of both operands), except for the frontend
  projections, whose input is data and needs no gradient (forward + weight gradient only). Softmax, LayerNorm,
  dropout, masking and the optimizer update are not counted; causal attention is counted in full (the scores are
  computed for every pair and masked). Remat recomputation is not model work and is not counted either.
  """
  parts = forward_flops_per_clip(model_cfg, seq_len, audio_dim, visual_dim)
  return 3.0 * sum(parts.values()) - parts["frontends"]


# ----------------------------------------------------------------------------------------------------------------
# Configs and synthetic batches.


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}; missing axes are 1 (data is -1 if no axis is -1)."""
  mesh = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = part.partition("=")
    if not sep or name not in sharding.AXES:
      raise ValueError(f"--mesh {text!r}: expected comma-separated axis=size with axes {sharding.AXES}")
    mesh[name] = int(value)
  out = {a: mesh.get(a, 1) for a in sharding.AXES}
  if "data" not in mesh and -1 not in out.values():
    out["data"] = -1
  return out


def mesh_label(mesh: Mapping[str, int]) -> str:
  return "x".join(f"{a[0]}{mesh[a]}" for a in sharding.AXES if mesh[a] != 1) or "1"


def bench_config(size: str, batch: int, dtype: str = "bfloat16", seq_len: int = 100, audio_dim: int = 512,
                 visual_dim: int = 17, *, mesh: Mapping[str, int] | None = None, remat: bool = False,
                 scan_layers: bool = False, grad_accum: int = 1, attention_impl: str = "", prng_impl: str = "",
                 **model_overrides) -> ml_collections.ConfigDict:
  """The pretraining config of the benchmark: features frontends, synthetic data, the trainer's optimizer."""
  c = config_lib.base_config("pretrain")
  c.model = avt.model_config(size, audio_frontend=dict(type="features", dim=audio_dim),
                             visual_frontend=dict(type="features", dim=visual_dim), audio_target_dim=audio_dim,
                             visual_target_dim=visual_dim, dtype=dtype, remat=remat, scan_layers=scan_layers,
                             attention_impl=attention_impl, **model_overrides)
  c.batch_size = batch
  c.grad_accum_steps = grad_accum
  c.prng_impl = prng_impl
  c.data.max_tokens = seq_len
  c.mesh = ml_collections.ConfigDict(dict(mesh or {"data": -1, "fsdp": 1, "tensor": 1}))
  c.mesh.rules = ()
  return c


def _geometry(config) -> input_pipeline.Geometry:
  m = config.model
  return input_pipeline.Geometry("features", 1, int(m.audio_frontend.dim), 1, int(m.visual_frontend.dim), 0, 0)


def synthetic_batch(key: jax.Array, config, shardings: Mapping[str, Any]) -> dict[str, jax.Array]:
  """A random batch of the pipeline's features-kind layout, made directly on the devices with `shardings`."""
  b, t = config.batch_size, config.data.max_tokens
  da, dv = int(config.model.audio_frontend.dim), int(config.model.visual_frontend.dim)

  def make(key):
    ka, kv, kl = jax.random.split(key, 3)
    audio = jax.random.normal(ka, (b, t, da), jnp.float32)
    visual = jax.random.normal(kv, (b, t, dv), jnp.float32)
    # Valid lengths between T/2 and T, zero padding after them (as the pipeline pads).
    lengths = jax.random.randint(kl, (b,), (t + 1) // 2, t + 1)
    mask = jnp.arange(t)[None, :] < lengths[:, None]
    audio, visual = audio * mask[..., None], visual * mask[..., None]
    full = {"audio": audio, "visual": visual, "mask": mask, "audio_target": audio, "visual_target": visual,
            "label": jnp.zeros((b,), jnp.int32), "targets": jnp.zeros((b, 3), jnp.float32),
            "weight": jnp.ones((b,), jnp.float32)}
    return {k: full[k] for k in shardings}  # the keys the step reads

  return jax.jit(make, out_shardings=dict(shardings))(key)


class Step:
  """The trainer's pretraining step for `config`, compiled for its mesh, with a state and a synthetic batch."""

  def __init__(self, config, devices: Sequence[jax.Device] | None = None):
    self.config = config
    self.setup = setup_lib.build(config, _geometry(config), devices=devices)
    self.mesh, self.rules = self.setup.mesh, self.setup.rules
    self.abstract_state, self.state_shardings = self.setup.abstract_state, self.setup.state_shardings
    # The pipeline's stored-scale batch: the step finishes it on the devices, as in training.
    self.batch_shardings = {k: v.sharding for k, v in self.setup.abstract_stored_batch.items()}
    self._jitted = train.jit_train_step(self.setup)
    self.compiled = None
    self.compile_s = 0.0

  def lower(self):
    """The traced and lowered step (XLA's cost analysis of the unoptimised program is available from it)."""
    with self.setup.scope():
      return self._jitted.lower(self.abstract_state, self.setup.abstract_stored_batch,
                                train.step_key(self.config))

  def compile(self):
    """Compiles the step (compile_s: tracing, lowering and XLA compilation)."""
    t0 = time.perf_counter()
    lowered = self.lower()
    with self.setup.scope():
      self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t0
    return self.compiled

  def init_state(self):
    return self.setup.init()

  def batch(self, seed: int = 0):
    return synthetic_batch(jax.random.key(seed), self.config, self.batch_shardings)

  def __call__(self, state, batch, rng):
    with self.setup.scope():
      return self.compiled(state, batch, rng)


# ----------------------------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Result:
  size: str
  batch: int
  dtype: str
  mesh: str
  remat: bool
  scan_layers: bool
  grad_accum: int
  devices: int
  prng: str = ""
  masks: str = ""                      # model.dropout_masks
  compile_s: float = float("nan")
  step_ms: float = float("nan")
  clips_per_s: float = float("nan")
  model_flops_per_clip: float = float("nan")
  tflops_per_device: float = float("nan")
  mfu: float = float("nan")            # nan when the peak is unknown (CPU)
  xla_over_model: float = float("nan")
  mem_gib: float = float("nan")        # XLA's estimate per device
  peak_gib: float = float("nan")       # allocator peak per device (GPU / TPU)
  loss: float = float("nan")
  step_ms_range: str = ""              # lowest-highest per-round median step time (--rounds > 1)
  error: str = ""


def memory_estimate(compiled) -> float:
  """Bytes per device XLA plans for a compiled step (arguments + outputs + temporaries - aliased), or nan."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return float("nan")
  if m is None:
    return float("nan")
  return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def device_peak_bytes(devices: Sequence[jax.Device]) -> float:
  """Largest allocator peak over the local devices (nan where the backend keeps no statistics, e.g. CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return float(max(peaks)) if peaks else float("nan")


def _prepared(config, devices: Sequence[jax.Device] | None = None):
  """(Result with the compile-time columns filled, Step, the step's key)."""
  m = config.model
  res = Result(m.size, config.batch_size, m.dtype, "", bool(m.remat), bool(m.scan_layers),
               int(config.grad_accum_steps), 0)
  rng = train.step_key(config)  # the trainer's key, of config.prng_impl
  res.prng = str(jax.random.key_impl(rng))
  res.masks = m.dropout_masks
  step = Step(config, devices)
  res.mesh = mesh_label(dict(step.mesh.shape))
  res.devices = step.mesh.size
  res.model_flops_per_clip = model_flops_per_clip(m, config.data.max_tokens, int(m.audio_frontend.dim),
                                                  int(m.visual_frontend.dim))
  compiled = step.compile()
  res.compile_s = step.compile_s
  res.mem_gib = memory_estimate(compiled) / GIB
  xla = costs.compiled_flops(compiled) * res.devices  # cost analysis is of the per-device program
  res.xla_over_model = xla / (res.model_flops_per_clip * config.batch_size) if xla else float("nan")
  return res, step, rng


def _timed(step: "Step", state, batch, rng, warmup: int, steps: int):
  """(state, last outputs, seconds of each of `steps` steps after `warmup`), each step waited for."""
  times, out = [], None
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, out = step(state, batch, rng)
    jax.block_until_ready((state, out))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return state, out, times


def _fill_speed(res: Result, times: Sequence[float], out, step: "Step", peak_flops: float) -> Result:
  res.loss = float(out["loss"])
  res.step_ms = 1e3 * statistics.median(times)
  res.clips_per_s = res.batch / (res.step_ms / 1e3)
  achieved = res.model_flops_per_clip * res.clips_per_s                # model FLOP/s over all devices
  res.tflops_per_device = achieved / res.devices / 1e12
  peak = costs.peak_flops(peak_flops)
  res.mfu = achieved / (peak * res.devices) if peak else float("nan")
  res.peak_gib = device_peak_bytes(step.mesh.local_devices) / GIB
  return res


def time_train_step(config, *, steps: int = 20, warmup: int = 3, peak_flops: float = 0.0,
                    devices: Sequence[jax.Device] | None = None, compile_only: bool = False) -> Result:
  """Compiles and times the pretraining step of `config` (median over `steps` steps after `warmup`).

  With compile_only the step is compiled but not run: compile time, XLA's memory estimate and FLOP ratio only
  (e.g. to plan the memory of a GPU configuration on a CPU machine).
  """
  res, step, rng = _prepared(config, devices)
  if compile_only:
    return res
  _, out, times = _timed(step, step.init_state(), step.batch(0), rng, warmup, steps)
  return _fill_speed(res, times, out, step, peak_flops)


@dataclasses.dataclass
class _Timing:
  """One configuration of a round-robin run: its compiled step, its state between rounds, what was timed."""
  result: Result
  step: "Step | None" = None
  rng: Any = None
  state: Any = None
  batch: Any = None
  times: list = dataclasses.field(default_factory=list)          # seconds of every timed step
  round_ms: list = dataclasses.field(default_factory=list)       # median per round
  out: Any = None


def time_round_robin(configs: Sequence[Any], *, rounds: int, steps: int = 5, warmup: int = 3,
                     peak_flops: float = 0.0, devices: Sequence[jax.Device] | None = None) -> list[Result]:
  """Compiles every configuration first, then times them in turn, `rounds` times (`steps` steps each per round):
  on a machine whose speed drifts, each configuration sees the same conditions, so their ratios hold even when
  one configuration's timings vary by tens of percent. step_ms is the median over every timed step; the
  `range ms` column gives the lowest and highest per-round median. A configuration that fails keeps its error."""
  timings = []
  for config in configs:
    try:
      res, step, rng = _prepared(config, devices)
      timings.append(_Timing(res, step, rng, step.init_state(), step.batch(0)))
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: keep the other rows)
      timings.append(_Timing(_failed(config, e)))
  for r in range(rounds):
    for t in timings:
      if t.step is None:
        continue
      t.state, t.out, new = _timed(t.step, t.state, t.batch, t.rng, warmup if r == 0 else 1, steps)
      t.times.extend(new)
      t.round_ms.append(1e3 * statistics.median(new))
  for t in timings:
    if t.step is not None:
      _fill_speed(t.result, t.times, t.out, t.step, peak_flops)
      t.result.step_ms_range = f"{min(t.round_ms):.0f}-{max(t.round_ms):.0f}"
  return [t.result for t in timings]


def _failed(config, e: BaseException) -> Result:
  m = config.model
  return Result(m.size, config.batch_size, m.dtype, mesh_label(dict(config.mesh)), bool(m.remat),
                bool(m.scan_layers), int(config.grad_accum_steps), jax.device_count(), config.get("prng_impl", ""),
                m.dropout_masks,
                error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")


def time_loader(path: str, batch: int, seq_len: int, *, num_batches: int = 20, warmup: int = 2,
                worker_count: int = 0, mesh=None) -> dict[str, float]:
  """Batches/s and clips/s of the training input pipeline on a prepared directory (pretraining's keys, stored
  scale, as the trainer reads it), including the transfer of each batch onto the devices
  (`sharding.global_batch`)."""
  mesh = mesh or sharding.make_mesh({"data": -1})
  ds = input_pipeline.make_dataset(path, split="train", global_batch_size=batch, seed=0, max_tokens=seq_len,
                                   worker_count=worker_count, keys=tasks.get("pretrain").batch_keys, finish=False)
  it = iter(ds)
  for _ in range(warmup):
    jax.block_until_ready(sharding.global_batch(next(it), mesh))
  t0 = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(sharding.global_batch(next(it), mesh))
  dt = time.perf_counter() - t0
  return {"batches_per_s": num_batches / dt, "clips_per_s": num_batches * batch / dt}


def compare_dtypes(size: str, batch: int, *, steps: int = 5, seq_len: int = 100, audio_dim: int = 512,
                   visual_dim: int = 17, mesh: Mapping[str, int] | None = None,
                   dtypes: Sequence[str] = ("float32", "bfloat16")) -> dict[str, list[float]]:
  """Losses of `steps` training steps from the same initial parameters on the same batches, per compute dtype."""
  losses = {}
  for dtype in dtypes:
    step = Step(bench_config(size, batch, dtype, seq_len, audio_dim, visual_dim, mesh=mesh))
    step.compile()
    state = step.init_state()  # Parameters are float32 whatever the compute dtype: the same initial values.
    rng = train.step_key(step.config)
    losses[dtype] = []
    for i in range(steps):
      state, out = step(state, step.batch(100 + i), rng)
      losses[dtype].append(float(out["loss"]))
  return losses


# ----------------------------------------------------------------------------------------------------------------
# Table.


COLUMNS = (("size", "{}"), ("batch", "{}"), ("dtype", "{}"), ("mesh", "{}"), ("remat", "{}"), ("scan", "{}"),
           ("accum", "{}"), ("prng", "{}"), ("masks", "{}"), ("compile s", "{:.1f}"), ("step ms", "{:.1f}"), ("range ms", "{}"),
           ("clips/s", "{:,.0f}"),
           ("TFLOP/s/dev", "{:.3g}"), ("MFU", "{:.1%}"), ("xla/model", "{:.2f}"), ("mem GiB", "{:.3g}"),
           ("peak GiB", "{:.3g}"))


# ----------------------------------------------------------------------------------------------------------------
# Profile: where the step's time goes (--profile).


# Trace events that are not XLA ops: executor and thread-pool bookkeeping, Python frames.
_NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end:", "$", "PjitFunction",
            "CommonPjRtLoadedExecutable", "ParseArguments", "Handle inputs")
_NAME = r"%?([\w.\-]+)"  # an HLO instruction's name, printed with or without its '%'
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?" + _NAME + r" = (\S+) ([\w\-]+)\(.*?op_name=\"([^\"]*)\"", re.M)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{$")


def op_metadata(hlo_text: str) -> dict[str, tuple[str, str, bool]]:
  """{instruction: (shape, op_name, is a matrix product)} of the compiled module's instructions with metadata.

  A fusion is a matrix product when its fused computation contains a dot or a convolution (a dot library's fusion
  may also be a plain reduction)."""
  has_product, current = set(), None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
    elif current and re.search(r" (dot|convolution)\(", line):
      has_product.add(current)
  meta = {}
  for m in _INSTRUCTION.finditer(hlo_text):
    name, shape, opcode, op_name = m.groups()
    calls = re.search(r"calls=%?([\w.\-]+)", m.group(0))
    product = opcode in ("dot", "convolution") or bool(calls and calls.group(1) in has_product)
    meta[name] = (shape, op_name, product)
  return meta


def classify(op_name: str, product: bool) -> tuple[str, str, str]:
  """(pass, part, kind) of one XLA op from its op_name metadata and whether it is a matrix product."""
  kind = "matmul" if product else "elementwise / reduce"
  if "Model)" not in op_name and "Model/" not in op_name:  # outside the model's apply
    return "update", "optimizer, clipping, loss", kind
  pass_ = "backward" if "transpose(" in op_name else "forward"
  path = op_name.split("Model)")[-1] if "Model)" in op_name else op_name
  if "Dropout" in path or "dropout" in path:
    part = "dropout"
  elif re.search(r"attention/(query|key|value|out)/", path):
    part = "attention projections"
  elif "attention/" in path:
    part = "attention core (QK, softmax, AV)"
  elif re.search(r"/fc[12]/|relu", path):
    part = "feed-forward"
  elif "/ln_" in path:
    part = "LayerNorm"
  elif "recon_" in path:
    part = "reconstruction heads"
  elif "frontend" in path:
    part = "frontends"
  elif re.search(r"layer_\d+/add", path) or "add_any" in path:
    part = "residual adds"
  else:
    part = "other model ops (embedding, loss, masking)"
  return pass_, part, kind


def trace_steps(step: "Step", state, batch, rng, steps: int, trace_dir: str):
  """`_timed` of `steps` steps under jax.profiler; (wall seconds per step, rusage before, rusage after)."""
  import resource  # pylint: disable=g-import-not-at-top  (Unix only; the rest of the module is not)
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  with jax.profiler.trace(trace_dir):
    _, _, times = _timed(step, state, batch, rng, 0, steps)
  return times, r0, resource.getrusage(resource.RUSAGE_SELF)


def op_times(trace_dir: str) -> collections.Counter:
  """{op name: nanoseconds summed over all threads} of the newest trace under trace_dir."""
  files = sorted(Path(trace_dir).glob("plugins/profile/*/*.xplane.pb"))
  if not files:
    raise FileNotFoundError(f"no .xplane.pb trace under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(str(files[-1]))
  total = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for ev in line.events:
        if not ev.name.startswith(_NOT_OPS):
          total[ev.name] += ev.duration_ns
  return total


def summarize(times_ns: collections.Counter, meta: dict[str, tuple[str, str, bool]], steps: int):
  """(rows [(pass, part, kind, ms per step)], top ops [(ms per step, name, shape, op_name)], unmatched ms)."""
  groups, top, unmatched = collections.Counter(), [], 0.0
  for name, ns in times_ns.items():
    ms = ns / 1e6 / steps
    shape, op_name, product = meta.get(name, ("", "", False))
    if not op_name:
      unmatched += ms
      continue
    groups[classify(op_name, product)] += ms
    top.append((ms, name, shape, op_name))
  rows = [(*k, v) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
  return rows, sorted(top, reverse=True), unmatched


def profile_train_step(config, *, steps: int = 3, warmup: int = 2, top: int = 15) -> str:
  """Traces `steps` steps of `config` after `warmup` and returns the report of --profile (module docstring)."""
  step = Step(config)
  meta = op_metadata(step.compile().as_text())
  rng = train.step_key(config)
  state, batch = step.init_state(), step.batch(0)
  state, _, _ = _timed(step, state, batch, rng, 0, warmup)
  with tempfile.TemporaryDirectory() as trace_dir:
    times, r0, r1 = trace_steps(step, state, batch, rng, steps, trace_dir)
    rows, top_ops, unmatched = summarize(op_times(trace_dir), meta, steps)
  n = steps
  faults = (r1.ru_minflt - r0.ru_minflt) / n
  lines = [f"{config.model.size} b{config.batch_size} {config.model.dtype} T={config.data.max_tokens} on "
           f"{jax.devices()[0].device_kind}, {n} traced steps",
           f"wall {statistics.median(times) * 1e3:.1f} ms per step (median) | CPU user "
           f"{(r1.ru_utime - r0.ru_utime) / n * 1e3:.0f} ms, system {(r1.ru_stime - r0.ru_stime) / n * 1e3:.0f} ms | "
           f"page faults {faults:,.0f} ({faults * 4096 / 2 ** 20:,.0f} MiB of 4 KiB pages) per step"]
  traced = sum(r[3] for r in rows) + unmatched
  lines += ["", f"XLA ops, thread time summed over threads: {traced:.1f} ms per step", "",
            "| pass | part | kind | ms per step | share |", "|---|---|---|---|---|"]
  lines += [f"| {p} | {part} | {kind} | {ms:.1f} | {100 * ms / traced:.1f}% |" for p, part, kind, ms in rows]
  if unmatched:
    lines.append(f"| - | ops without metadata | - | {unmatched:.1f} | {100 * unmatched / traced:.1f}% |")
  for label, idx in (("pass", 0), ("kind", 2)):
    totals = collections.Counter()
    for r in rows:
      totals[r[idx]] += r[3]
    lines += ["", f"by {label}: " + ", ".join(f"{k} {v:.1f} ms ({100 * v / traced:.0f}%)"
                                               for k, v in totals.most_common())]
  lines += ["", f"top {top} ops:"]
  lines += [f"  {ms:7.2f} ms  {name:28s} {shape:28s} {op_name[-90:]}" for ms, name, shape, op_name in top_ops[:top]]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The step's matrix products, each timed alone (--products).

_DOT_TYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "f64": jnp.float64}
_ARRAY_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?" + _NAME + r" = (\w+)\[([\d,]*)\]")  # name, type, dims
_DOT = re.compile(r"= (\w+)\[[\d,]*\]\S* dot\(" + _NAME + ", " + _NAME + r"\), (.*?)(?:, metadata=|$)")


@dataclasses.dataclass(frozen=True)
class Product:
  """One dot of the program: operand shapes and types, output type, dimension numbers."""
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  lhs_type: str
  rhs_type: str
  out_type: str
  lhs_contracting: tuple[int, ...]
  rhs_contracting: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]

  @property
  def flops(self) -> float:
    """2 x every output element x the contracted length."""
    free_rhs = [d for i, d in enumerate(self.rhs) if i not in self.rhs_contracting and i not in self.rhs_batch]
    return 2.0 * math.prod(self.lhs) * math.prod(free_rhs)

  def label(self) -> str:
    return (f"{self.lhs_type}{list(self.lhs)} x {self.rhs_type}{list(self.rhs)} -> {self.out_type}, contract "
            f"{list(self.lhs_contracting)}/{list(self.rhs_contracting)}"
            + (f", batch {list(self.lhs_batch)}/{list(self.rhs_batch)}" if self.lhs_batch else ""))


def _dims(attrs: str, key: str) -> tuple[int, ...]:
  m = re.search(key + r"=\{([\d,]*)\}", attrs)
  return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def dot_products(hlo_text: str) -> collections.Counter:
  """{Product: its occurrences} in an optimised HLO module's text (a dot in a loop body counts once, as in XLA's
  cost analysis: use it on steps without scan_layers or gradient accumulation)."""
  shapes = {}
  for line in hlo_text.splitlines():
    m = _ARRAY_INSTRUCTION.match(line)
    if m:
      shapes[m.group(1)] = (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
  found = collections.Counter()
  for line in hlo_text.splitlines():
    m = _DOT.search(line)
    if not m:
      continue
    out_type, lhs, rhs, attrs = m.groups()
    if lhs not in shapes or rhs not in shapes:
      raise ValueError(f"dot with an operand of unknown shape (%{lhs}, %{rhs}): {line.strip()[:200]}")
    (lt, ls), (rt, rs) = shapes[lhs], shapes[rhs]
    found[Product(ls, rs, lt, rt, out_type, _dims(attrs, "lhs_contracting_dims"),
                  _dims(attrs, "rhs_contracting_dims"), _dims(attrs, "lhs_batch_dims"),
                  _dims(attrs, "rhs_batch_dims"))] += 1
  return found


def time_product(p: Product, reps: int) -> float:
  """Median seconds of one jitted lax.dot_general of `p` on constant operands (after one warm-up call)."""
  for t in (p.lhs_type, p.rhs_type, p.out_type):
    if t not in _DOT_TYPES:
      raise ValueError(f"dot of element type {t!r}: expected one of {sorted(_DOT_TYPES)}")
  lhs = jnp.ones(p.lhs, _DOT_TYPES[p.lhs_type])
  rhs = jnp.ones(p.rhs, _DOT_TYPES[p.rhs_type])
  dims = ((p.lhs_contracting, p.rhs_contracting), (p.lhs_batch, p.rhs_batch))
  fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=_DOT_TYPES[p.out_type]))
  jax.block_until_ready(fn(lhs, rhs))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(lhs, rhs))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def products_report(config, *, reps: int = 20, steps: int = 5, warmup: int = 2, top: int = 15) -> str:
  """The report of --products (module docstring) for `config`."""
  step = Step(config)
  compiled = step.compile()
  found = dot_products(compiled.as_text())
  if not found:
    raise ValueError("no dot in the compiled step")
  call_s = time_product(Product((1, 1), (1, 1), "f32", "f32", "f32", (1,), (0,), (), ()), reps)
  rows = []
  for p, n in found.items():
    s = max(time_product(p, reps) - call_s, 1e-9)
    rows.append((n * s, n, p, p.flops / s))
  rows.sort(key=lambda r: -r[0])
  rng = train.step_key(config)
  _, _, times = _timed(step, step.init_state(), step.batch(0), rng, warmup, steps)
  step_ms = 1e3 * statistics.median(times)
  total_s = sum(r[0] for r in rows)
  total_flops = sum(n * p.flops for _, n, p, _ in rows)
  m = config.model
  lines = [f"{m.size} b{config.batch_size} {m.dtype} T={config.data.max_tokens} on {jax.devices()[0].device_kind}",
           "", "| products (each alone) | count | ms per step | GFLOP/s |", "|---|---|---|---|"]
  lines += [f"| {p.label()} | {n} | {1e3 * s:.1f} | {rate / 1e9:.0f} |" for s, n, p, rate in rows[:top]]
  if len(rows) > top:
    rest = rows[top:]
    lines.append(f"| {len(rest)} other shapes | {sum(r[1] for r in rest)} | {1e3 * sum(r[0] for r in rest):.1f} | |")
  lines += ["", f"dots: {sum(found.values())} in {len(found)} shapes, {total_flops / 1e9:.2f} GFLOP "
            f"(XLA's count for the whole step: {costs.compiled_flops(compiled) / 1e9:.2f})",
            f"products alone: {1e3 * total_s:.1f} ms, {total_flops / total_s / 1e9:.0f} GFLOP/s (less "
            f"{1e3 * call_s:.3f} ms per call for calling a jitted function)",
            f"the step (median of {steps}): {step_ms:.1f} ms; products alone {100 * 1e3 * total_s / step_ms:.0f}% "
            f"of it, {step_ms - 1e3 * total_s:.1f} ms left for everything else"]
  return "\n".join(lines)


def _cells(r: Result) -> list[str]:
  values = (r.size, r.batch, r.dtype, r.mesh, "y" if r.remat else "n", "y" if r.scan_layers else "n", r.grad_accum,
            r.prng, r.masks, r.compile_s, r.step_ms, r.step_ms_range or "-", r.clips_per_s, r.tflops_per_device, r.mfu,
            r.xla_over_model, r.mem_gib,
            r.peak_gib)
  cells = []
  for (_, fmt), v in zip(COLUMNS, values):
    cells.append("-" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
  if r.error:
    cells[9:] = [r.error] + [""] * (len(cells) - 10)
  return cells


def format_table(results: Sequence[Result]) -> str:
  """A Markdown table of benchmark results."""
  rows = [[name for name, _ in COLUMNS]] + [_cells(r) for r in results]
  widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
  line = lambda row: "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"
  return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] +
                   [line(r) for r in rows[1:]])


def _device_line() -> str:
  d = jax.devices()[0]
  return (f"{jax.device_count()} x {d.device_kind} ({d.platform}), {jax.process_count()} process(es), "
          f"jax {jax.__version__}")


# ----------------------------------------------------------------------------------------------------------------
# Command line.


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("size", ["base"], "Model sizes (tiny, small, base, large).")
  flags.DEFINE_list("batch", ["64"], "Global batch sizes.")
  flags.DEFINE_list("dtype", ["bfloat16"], "Compute dtypes (float32, bfloat16).")
  flags.DEFINE_string("mesh", "data=-1", "Mesh, e.g. 'data=-1' or 'data=2,fsdp=4'.")
  flags.DEFINE_integer("steps", 20, "Timed steps per configuration (the median is reported); per round with "
                       "--rounds.")
  flags.DEFINE_integer("rounds", 1, "> 1: compile every configuration first, then time them in turn this many "
                       "times (side by side on a machine whose speed drifts; the range column shows the drift).")
  flags.DEFINE_bool("compile_only", False, "Only compile: compile time, memory estimate and FLOP ratio.")
  flags.DEFINE_integer("warmup", 3, "Untimed steps before timing.")
  flags.DEFINE_bool("profile", False, "Trace --steps steps of the first configuration with jax.profiler and print "
                    "where the time goes (by pass, model part and kind), instead of the timing table.")
  flags.DEFINE_integer("profile_top", 15, "With --profile: the most expensive single ops to list; with --products: "
                       "the most expensive product shapes.")
  flags.DEFINE_bool("products", False, "Time every matrix product of the first configuration's compiled step alone "
                    "and the step itself, and print how much of the step they are, instead of the timing table.")
  flags.DEFINE_integer("products_reps", 20, "With --products: timed calls of each distinct product.")
  flags.DEFINE_bool("reuse_host_memory", True, "Keep freed host memory for the next step, as training does "
                    "(config.reuse_host_memory, avt_jax/host_memory.py); false measures without it.")
  flags.DEFINE_integer("seq", 100, "Tokens per clip (T).")
  flags.DEFINE_list("features", ["512", "17"], "Audio and visual feature widths.")
  flags.DEFINE_list("remat", ["false"], "Rematerialise layers: false, true or both.")
  flags.DEFINE_list("scan_layers", ["false"], "Scan over layers: false, true or both.")
  flags.DEFINE_list("grad_accum", ["1"], "Gradient accumulation steps (micro-batches per step).")
  flags.DEFINE_string("attention_impl", "", "jax.nn.dot_product_attention implementation ('', 'xla', 'cudnn').")
  flags.DEFINE_bool("fused_qkv", False, "Self-attention Q/K/V as one product with stacked kernels (model.fused_qkv).")
  flags.DEFINE_list("prng_impl", [""], "Key implementations of the step's dropout and masking (config.prng_impl: "
                    "threefry2x32, rbg, unsafe_rbg, philox4x32; '' = the platform default).")
  flags.DEFINE_list("dropout_masks", [""], "Dropout mask generators (model.dropout_masks: counter, jax; '' = the "
                    "model's default).")
  flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s of one device (default: from the device kind).")
  flags.DEFINE_string("loader", "", "Prepared dataset directory: also time the input pipeline on it.")
  flags.DEFINE_integer("loader_batches", 20, "Batches timed per loader measurement.")
  flags.DEFINE_integer("loader_workers", 0, "Prefetch worker processes for the loader measurement (data.worker_count).")
  flags.DEFINE_bool("compare_dtypes", False, "Also train a few steps in float32 and bfloat16 and compare losses.")
  flags.DEFINE_integer("compare_steps", 5, "Steps of the dtype comparison.")
  flags.DEFINE_float("compare_rtol", 0.02, "Largest relative loss difference bfloat16 vs float32 that passes.")
  flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
  return flags.FLAGS


def _bools(values: Sequence[str]) -> list[bool]:
  out = []
  for v in values:
    if v.lower() not in ("true", "false", "1", "0", "y", "n"):
      raise ValueError(f"expected true/false, got {v!r}")
    out.append(v.lower() in ("true", "1", "y"))
  return out


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.reuse_host_memory:
    host_memory.keep_freed_memory()  # before JAX starts its runtime threads, as avt_jax.main does
  audio_dim, visual_dim = (int(x) for x in f.features)
  mesh = parse_mesh(f.mesh)
  print(_device_line(), flush=True)
  peak = costs.peak_flops(f.peak_flops)
  print(f"peak {peak / 1e12:.0f} TFLOP/s per device" if peak else "peak FLOP/s unknown for this device: MFU not "
        "shown (give --peak_flops)", flush=True)
  configs = []
  for size in f.size:
    for batch in (int(b) for b in f.batch):
      for dtype in f.dtype:
        for remat in _bools(f.remat):
          for scan in _bools(f.scan_layers):
            for accum in (int(a) for a in f.grad_accum):
              for prng in f.prng_impl:
                for masks in f.dropout_masks:
                  extra = {"dropout_masks": masks} if masks else {}
                  configs.append(bench_config(size, batch, dtype, f.seq, audio_dim, visual_dim, mesh=mesh,
                                              remat=remat, scan_layers=scan, grad_accum=accum,
                                              attention_impl=f.attention_impl, prng_impl=prng,
                                              fused_qkv=f.fused_qkv, **extra))
  if f.profile:
    print(profile_train_step(configs[0], steps=f.steps, warmup=f.warmup, top=f.profile_top))
    return
  if f.products:
    print(products_report(configs[0], reps=f.products_reps, steps=f.steps, warmup=f.warmup, top=f.profile_top))
    return
  if f.rounds > 1 and not f.compile_only:
    print(f"{len(configs)} configurations compiled first, then timed in turn, {f.rounds} rounds of {f.steps} steps",
          flush=True)
    results = time_round_robin(configs, rounds=f.rounds, steps=f.steps, warmup=f.warmup, peak_flops=f.peak_flops)
  else:
    results = []
    for config in configs:
      try:
        r = time_train_step(config, steps=f.steps, warmup=f.warmup, peak_flops=f.peak_flops,
                            compile_only=f.compile_only)
      except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: keep the other rows)
        r = _failed(config, e)
      results.append(r)
      print(format_table([r]).splitlines()[-1], flush=True)
  print()
  print(f"pretraining step, T={f.seq}, features {audio_dim}/{visual_dim}, {_device_line()}")
  print(format_table(results))
  report = {"device": _device_line(), "seq": f.seq, "features": [audio_dim, visual_dim],
            "results": [dataclasses.asdict(r) for r in results]}
  if f.loader:
    loader_rows = []
    for batch in sorted({int(b) for b in f.batch}):
      lr = time_loader(f.loader, batch, f.seq, num_batches=f.loader_batches, worker_count=f.loader_workers)
      loader_rows.append({"batch": batch, **lr})
      print(f"loader {f.loader}: batch {batch}, T={f.seq}, {f.loader_workers} workers: "
            f"{lr['batches_per_s']:.2f} batches/s = {lr['clips_per_s']:,.0f} clips/s")
    report["loader"] = loader_rows
  if f.compare_dtypes:
    size, batch = f.size[0], int(f.batch[0])
    losses = compare_dtypes(size, batch, steps=f.compare_steps, seq_len=f.seq, audio_dim=audio_dim,
                            visual_dim=visual_dim, mesh=mesh)
    print(f"\nfloat32 vs bfloat16, {size} b{batch}: same initial parameters and batches")
    print("| step | loss float32 | loss bfloat16 | rel. diff |\n|---|---|---|---|")
    worst = 0.0
    for i, (a, b) in enumerate(zip(losses["float32"], losses["bfloat16"]), 1):
      rel = abs(b - a) / max(abs(a), 1e-12)
      worst = max(worst, rel)
      print(f"| {i} | {a:.5f} | {b:.5f} | {rel:.2e} |")
    ok = worst <= f.compare_rtol and all(math.isfinite(x) for v in losses.values() for x in v)
    print(f"dtype check: {'PASS' if ok else 'FAIL'} (largest relative difference {worst:.2e}, "
          f"tolerance {f.compare_rtol:g})")
    report["compare_dtypes"] = {"losses": losses, "worst_rel_diff": worst, "pass": ok}
  if f.json:
    with open(f.json, "w") as fh:
      json.dump(report, fh, indent=2)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
