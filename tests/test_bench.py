"""Benchmark tests: the analytic FLOP count against XLA's cost analysis of the compiled train step (CPU, small
models), and one end-to-end run of `python -m avt_jax.bench` on a tiny model."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avt_jax import bench, config_lib, costs, summary

CACHE = os.path.join(os.environ.get("PYTEST_XLA_CACHE", "/tmp"), f"avt_jax_test_xla_{os.getuid()}")
NO_DROPOUT = dict(embed_dropout=0.0, residual_dropout=0.0, relu_dropout=0.0, joint_attention_dropout=0.0)


def _config(size, batch, seq, **model):
  return bench.bench_config(size, batch, "float32", seq, 24, 7, mesh={"data": 1, "fsdp": 1, "tensor": 1}, **model)


def test_model_flops_match_xla_cost_analysis():
  # The `small` preset (width 96, 4 heads, 2 layers) without dropout: XLA's count of the compiled step also holds
  # elementwise work (softmax, LayerNorm, the optimizer update) and came out 2% above the model FLOPs.
  config = _config("small", 16, 32, **NO_DROPOUT)
  compiled = bench.Step(config, jax.devices()[:1]).compile()
  xla = costs.compiled_flops(compiled)
  model = 16 * bench.model_flops_per_clip(config.model, 32, 24, 7)
  assert 1.0 <= xla / model < 1.10, xla / model


def _lowered_flops(config) -> float:
  """XLA's cost analysis of the step before optimisation (within 0.2% of the compiled count here; no compile)."""
  cost = bench.Step(config, jax.devices()[:1]).lower().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_attention_flops_grow_quadratically_like_xla():
  # Cost as a function of T: a + b T + c T^2 (a: the optimizer update; b T: projections, feed-forward, heads; c T^2:
  # QK^T and AV). The second difference f(4T) - 3 f(2T) + 2 f(T) = 6 c T^2 keeps only the attention part.
  # Without dropout (its random bits over the attention scores are also T^2).
  cfg = dict(width=64, num_heads=4, num_layers=1, **NO_DROPOUT)
  seqs = (16, 32, 64)
  configs = [_config("custom", 8, t, **cfg) for t in seqs]
  model = [8 * bench.model_flops_per_clip(c.model, t, 24, 7) for c, t in zip(configs, seqs)]
  xla = [_lowered_flops(c) for c in configs]
  second = lambda f: f[2] - 3 * f[1] + 2 * f[0]
  # Softmax over the scores is T^2 work too: measured 1.05.
  assert 0.95 < second(xla) / second(model) < 1.10, second(xla) / second(model)
  assert 1.0 <= xla[2] / model[2] < 1.15, xla[2] / model[2]
  # Hand count of that part: 3 encoders x 1 layer x (QK^T + AV = 4 T^2 w FLOPs forward, x3 with backward) x batch,
  # with widths 64, 64 and 128 (the joint encoder is twice as wide): 6 c T^2 at T=16.
  c = 3 * 4 * (64 + 64 + 128) * 8
  assert second(model) == 6 * c * 16 ** 2


def test_paper_base_model_flops_by_hand():
  # Base (d=240, 4 layers, MLP 4d) at T=100 with 512 / 17 features, forward per clip:
  #   cross layer (d):  24 T d^2 + 4 T^2 d = 138,240,000 + 9,600,000; two cross encoders of 4 layers
  #   joint layer (2d): 24 T (2d)^2 + 4 T^2 (2d) = 552,960,000 + 19,200,000; 4 layers
  #   frontends: 2 T (512 + 17) d = 25,392,000; heads: 2 x 4 T (2d)^2 + 2 T (2d)(512 + 17) = 184,320,000 + 50,784,000
  fwd = 8 * (138_240_000 + 9_600_000) + 4 * (552_960_000 + 19_200_000) + 25_392_000 + 184_320_000 + 50_784_000
  cfg = bench.bench_config("base", 64).model
  assert bench.model_flops_per_clip(cfg, 100, 512, 17) == 3 * fwd - 25_392_000


def test_parse_mesh():
  assert bench.parse_mesh("data=-1") == {"data": -1, "fsdp": 1, "tensor": 1}
  assert bench.parse_mesh("fsdp=4") == {"data": -1, "fsdp": 4, "tensor": 1}
  assert bench.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="axis=size"):
    bench.parse_mesh("model=2")


def test_bench_command_prints_the_table(tmp_path):
  out = tmp_path / "bench.json"
  # Backend optimisation off: 2-3x faster CPU compiles; the numbers checked here do not depend on it. The persistent
  # compilation cache makes reruns fast.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
             JAX_PLATFORMS="cpu", PYTHONPATH=config_lib.REPO, JAX_COMPILATION_CACHE_DIR=CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  cmd = [sys.executable, "-m", "avt_jax.bench", "--size=tiny", "--batch=8", "--dtype=float32", "--seq=8",
         "--features=24,7", "--steps=3", "--warmup=1", "--mesh=data=2",
         f"--loader={config_lib.SAMPLE}", "--loader_batches=3", "--compare_dtypes", "--compare_steps=3",
         f"--json={out}"]
  proc = subprocess.run(cmd, env=env, cwd=config_lib.REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout
  header = [l for l in text.splitlines() if l.startswith("| size")]
  assert header and all(c in header[0] for c in ("compile s", "step ms", "clips/s", "TFLOP/s/dev", "MFU", "mem GiB"))
  assert "dtype check: PASS" in text
  assert "batches/s" in text
  report = json.load(open(out))
  rows = report["results"]
  assert len(rows) == 1
  for r in rows:
    assert not r["error"]
    assert r["mesh"] == "d2" and r["devices"] == 2
    np.testing.assert_allclose(r["clips_per_s"], 8 / (r["step_ms"] / 1e3), rtol=1e-9)
    np.testing.assert_allclose(r["tflops_per_device"] * 1e12 * 2, r["model_flops_per_clip"] * r["clips_per_s"],
                               rtol=1e-9)
    assert np.isnan(r["mfu"])  # No peak for CPU.
    assert r["mem_gib"] > 0 and np.isfinite(r["loss"])
  losses = report["compare_dtypes"]["losses"]
  assert len(losses["float32"]) == len(losses["bfloat16"]) == 3
  assert report["loader"][0]["clips_per_s"] > 0


def _cpu_env(**extra):
  return dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu",
              PYTHONPATH=config_lib.REPO, JAX_COMPILATION_CACHE_DIR=CACHE,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1", **extra)


def test_gpu_check_dry_run_on_cpu_prints_every_section(tmp_path):
  # The script a lent GPU runs once: here on the CPU with a tiny model, so that it is known to work before then.
  env = _cpu_env(REQUIRE_GPU="0", SIZES="tiny", BATCHES="8", STEPS="1", FALLBACK="", LOADER_CLIPS="24",
                 LOADER_BATCH="8", LOADER_BATCHES="2", OUT=str(tmp_path), WHEELS=str(tmp_path / "no_wheels"))
  proc = subprocess.run(["bash", "scripts/gpu_check.sh"], env=env, cwd=config_lib.REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
  text = proc.stdout
  for section in ("== machine", "== benchmark", "== switches", "== input pipeline per core"):
    assert section in text, section
  assert "dtype check: PASS" in text
  prng = json.load(open(tmp_path / "gpu_check_prng.json"))["results"]
  assert [r["prng"] for r in prng] == ["threefry2x32", "rbg", "unsafe_rbg"] and not any(r["error"] for r in prng)
  masks = json.load(open(tmp_path / "gpu_check_masks.json"))["results"]
  assert [r["masks"] for r in masks] == ["counter", "jax"] and not any(r["error"] for r in masks)
  loader = (tmp_path / "gpu_check_loader.txt").read_text()
  rows = re.findall(r"^\s*this checkout\s+(\d)\s", loader, re.M)
  assert rows == ["0", "1", "0", "1"], loader  # features and raw, 0 and 1 workers


def test_bench_loader_compares_two_checkouts_side_by_side(tmp_path):
  # The same checkout twice: the table has both, and their ratio (about 1; not asserted: timing).
  cmd = [sys.executable, "bench/bench_loader.py", "--kind=raw", "--max_tokens=10", "--clips=16", "--batch_size=4",
         "--batches=2", "--warmup=1", "--workers=0", f"--compare={config_lib.REPO}"]
  proc = subprocess.run(cmd, env=_cpu_env(), cwd=config_lib.REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = re.findall(r"^\s*(this checkout|compared)\s+0\s+\S+\s+(\d+)\s+\d+\s+(True|False)$", proc.stdout, re.M)
  assert [r[0] for r in rows] == ["this checkout", "compared"], proc.stdout
  assert all(int(r[1]) > 0 and r[2] == "True" for r in rows), proc.stdout  # clips/s; stored-scale batches
  assert "ratio this / compared, 0 workers:" in proc.stdout


def test_round_robin_times_every_configuration_in_each_round():
  configs = [_config("tiny", 4, 8, prng_impl=impl) for impl in ("threefry2x32", "unsafe_rbg")]
  results = bench.time_round_robin(configs, rounds=3, steps=2, warmup=1, devices=jax.devices()[:1])
  assert [r.prng for r in results] == ["threefry2x32", "unsafe_rbg"]
  for r in results:
    assert not r.error and np.isfinite(r.loss)
    low, high = (float(x) for x in r.step_ms_range.split("-"))
    assert low <= round(r.step_ms) + 1 and r.step_ms <= high + 1  # the overall median lies within the rounds'
    np.testing.assert_allclose(r.clips_per_s, 4 / (r.step_ms / 1e3), rtol=1e-9)


def test_profile_attributes_ops_to_model_parts():
  fwd = "jit(train_step)/jvp(PretrainModel)/encoder/joint/layer_1/"
  bwd = "jit(train_step)/transpose(jvp(PretrainModel))/encoder/cross_visual_audio/layer_0/"
  assert bench.classify(fwd + "fc1/dot_general", True) == ("forward", "feed-forward", "matmul")
  assert bench.classify(bwd + "attention/key/...e,enh->...nh/dot_general", True)[:2] == (
      "backward", "attention projections")
  assert bench.classify(bwd + "attention/vmap()/reduce_sum", False) == (
      "backward", "attention core (QK, softmax, AV)", "elementwise / reduce")
  assert bench.classify(fwd + "Dropout_1/jit(_where)/select_n", False)[1] == "dropout"
  assert bench.classify(fwd + "ln_mlp/add", False)[1] == "LayerNorm"
  assert bench.classify("jit(train_step)/add", False)[:2] == ("update", "optimizer, clipping, loss")
  # A fusion counts as a matrix product only when its fused computation holds a dot.
  hlo = """%fused_computation.1 (p: f32[4,8]) -> f32[4] {
  %r = f32[4]{0} reduce(%p, %c), dimensions={1}, to_apply=%add
}
%fused_computation.2 (p: f32[4,8], q: f32[8,3]) -> f32[4,3] {
  %d = f32[4,3]{1,0} dot(%p, %q), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
ENTRY %main (a: f32[4,8], b: f32[8,3]) -> f32[4,3] {
  %ynn_fusion.1 = f32[4]{0} fusion(%a), kind=kCustom, calls=%fused_computation.1, metadata={op_name="x/reduce_sum"}
  %ynn_fusion.2 = f32[4,3]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.2, metadata={op_name="x/dot"}
}
"""
  meta = bench.op_metadata(hlo)
  assert meta["ynn_fusion.1"] == ("f32[4]{0}", "x/reduce_sum", False)
  assert meta["ynn_fusion.2"] == ("f32[4,3]{1,0}", "x/dot", True)


def test_profile_runs_and_accounts_for_the_traced_time():
  cmd = [sys.executable, "-m", "avt_jax.bench", "--size=tiny", "--batch=2", "--seq=16", "--dtype=float32", "--steps=1",
         "--warmup=1", "--profile", "--profile_top=3"]
  proc = subprocess.run(cmd, env=_cpu_env(), cwd=config_lib.REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  traced = float(re.search(r"thread time summed over threads: ([\d.]+) ms", proc.stdout).group(1))
  rows = re.findall(r"^\| (forward|backward|update|-) \| [^|]+ \| [^|]+ \| ([\d.]+) \| ([\d.]+)% \|$", proc.stdout,
                    re.M)
  assert {r[0] for r in rows} >= {"forward", "backward", "update"}, proc.stdout
  assert abs(sum(float(r[2]) for r in rows) - 100) < 1.0, proc.stdout  # every traced op is in one row
  assert abs(sum(float(r[1]) for r in rows) - traced) < 0.05 * len(rows) + 0.05, proc.stdout
  assert re.search(r"by kind: .*matmul", proc.stdout) and "page faults" in proc.stdout


def test_products_reads_every_dot_of_a_compiled_program():
  x, w = jnp.ones((32, 48)), jnp.ones((48, 64))
  q, k = jnp.ones((2, 3, 24, 16)), jnp.ones((2, 3, 16, 40))
  a, b = jnp.ones((40, 24)), jnp.ones((40, 56))

  def f(x, w, q, k, a, b):  # a plain product, a batched one, and one contracting the leading dims (x^T y)
    return (x @ w).sum() + jnp.einsum("bnij,bnjk->bnik", q, k).sum() + jnp.einsum("ti,tj->ij", a, b).sum()

  found = bench.dot_products(jax.jit(f).lower(x, w, q, k, a, b).compile().as_text())
  flops = sorted(p.flops for p in found.elements())
  # By hand: 2 x output elements x contracted length, whatever layout XLA chose for each.
  assert flops == sorted([2 * 32 * 64 * 48, 2 * (2 * 3 * 24 * 40) * 16, 2 * 24 * 56 * 40]), found
  batched = [p for p in found if p.lhs_batch]
  assert len(batched) == 1 and len(batched[0].lhs_batch) == 2 and batched[0].out_type == "f32"
  assert bench.time_product(batched[0], reps=2) > 0


def test_products_command_prints_the_table():
  cmd = [sys.executable, "-m", "avt_jax.bench", "--size=tiny", "--batch=2", "--seq=20", "--dtype=float32",
         "--products", "--products_reps=3", "--steps=2", "--warmup=1"]
  proc = subprocess.run(cmd, env=_cpu_env(), cwd=config_lib.REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  m = re.search(r"^dots: (\d+) in (\d+) shapes, ([\d.]+) GFLOP \(XLA's count for the whole step: ([\d.]+)\)",
                proc.stdout, re.M)
  assert m, proc.stdout
  assert int(m.group(1)) >= int(m.group(2)) > 0
  assert 0 < float(m.group(3)) <= float(m.group(4)) + 0.01  # the products are part of the step's work
  assert re.search(r"^the step \(median of 2\): [\d.]+ ms; products alone \d+% of it", proc.stdout, re.M)
