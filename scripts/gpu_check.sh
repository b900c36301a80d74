#!/usr/bin/env bash
# GPU check for a fresh machine without network access: one command, one table.
#
#   scripts/gpu_check.sh
#
# 1. Installs the Python packages the machine lacks from wheels brought along in .whl/ (docs/scaling.md says which
#    and gives the `pip download` line): pip install --no-index --no-deps --target $SITE, then $SITE goes first on
#    PYTHONPATH. Nothing is fetched.
# 2. Prints nvidia-smi, the Python / JAX versions and jax.devices().
# 3. Runs the benchmark (python -m avt_jax.bench) for the base and large models at batch 64 and 512 in bfloat16
#    (T=100 tokens, 512-d audio / 17-d visual features), times the input pipeline on the bundled features dataset,
#    trains a few steps of base in float32 and bfloat16 on the same batches to compare the losses, and runs large
#    b512 once more with scan_layers + remat (the memory fallback).
# 4. The switches, on the first size at the largest batch: the key implementation of the step's dropout and
#    masking (config.prng_impl: threefry2x32, rbg, unsafe_rbg), the dropout mask generator (model.dropout_masks:
#    counter, jax), fused Q/K/V projections (model.fused_qkv) and the attention implementation (cudnn).
# 5. The input pipeline per core (bench/bench_loader.py, pinned to one core, batches moved onto the GPU): features
#    T=100 512/17 and raw T=50, 0 and 1 prefetch workers.
#
# Settings (environment): PYTHON (python3), WHEELS (.whl), SITE (/tmp/avt_site), SIZES (base,large),
# BATCHES (64,512), STEPS (20), FALLBACK (--size=large --batch=512: the scan + remat row; empty: none),
# SWITCHES (1; 0 skips step 4), LOADER (1; 0 skips step 5), LOADER_CLIPS (512), LOADER_BATCH (64),
# LOADER_BATCHES (20), OUT (directory for gpu_check.json; /tmp), JAX_COMPILATION_CACHE_DIR
# (/tmp/avt_jax_xla_cache; with a warm cache the "compile s" column is the time to load the program),
# REQUIRE_GPU (1; 0 runs on whatever JAX finds: the dry run of this script on a CPU is
#   REQUIRE_GPU=0 SIZES=tiny BATCHES=8 STEPS=1 FALLBACK= LOADER_CLIPS=32 LOADER_BATCH=8 LOADER_BATCHES=2
#   scripts/gpu_check.sh, which tests/test_bench.py runs).
# Exit status: 0 when everything ran and the dtype check passed, 1 when it failed, 2 for a missing package,
# 3 when JAX sees no GPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
SITE="${SITE:-/tmp/avt_site}"
SIZES="${SIZES:-base,large}"
BATCHES="${BATCHES:-64,512}"
STEPS="${STEPS:-20}"
FALLBACK="${FALLBACK---size=large --batch=512}"
SWITCHES="${SWITCHES:-1}"
LOADER="${LOADER:-1}"
LOADER_CLIPS="${LOADER_CLIPS:-512}"
LOADER_BATCH="${LOADER_BATCH:-64}"
LOADER_BATCHES="${LOADER_BATCHES:-20}"
OUT="${OUT:-/tmp}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/avt_jax_xla_cache}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
mkdir -p "$OUT"

echo "== packages"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(compgen -G "$WHEELS/*.whl" | wc -l) wheels from $WHEELS into $SITE"
else
  echo "no wheels in $WHEELS: using the installed packages"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
missing="$("$PY" -c '
import importlib.util
need = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "grain", "array_record", "clu", "etils",
        "msgpack", "absl"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))')"
if [ -n "$missing" ]; then
  echo "missing Python packages: $missing -- put their wheels in $WHEELS (docs/scaling.md)" >&2
  exit 2
fi

echo "== machine"
nvidia-smi || echo "(nvidia-smi not available)"
"$PY" -c '
import sys
import jax, flax, optax
print("python", sys.version.split()[0], "| jax", jax.__version__, "| flax", flax.__version__, "| optax",
      optax.__version__)
print("devices:", jax.devices())
sys.exit(0 if jax.default_backend() == "gpu" or sys.argv[1] == "0" else 3)' "${REQUIRE_GPU:-1}" ||
  { echo "JAX sees no GPU (see docs/scaling.md)" >&2; exit 3; }

echo "== benchmark (pretraining step, T=100, features 512/17, bfloat16) and float32 vs bfloat16 check"
status=0
"$PY" -m avt_jax.bench --size="$SIZES" --batch="$BATCHES" --dtype=bfloat16 --steps="$STEPS" --warmup=3 \
    --seq=100 --features=512,17 --loader="$ROOT/sample/avt_synth/pretrain" --loader_batches=20 \
    --compare_dtypes --compare_steps=5 --json="$OUT/gpu_check.json" | tee "$OUT/gpu_check.txt" || status=1
grep -q "dtype check: PASS" "$OUT/gpu_check.txt" || status=1

if [ -n "$FALLBACK" ]; then
  echo "== memory fallback ($FALLBACK) with scan_layers + remat, for when a plain row above ran out of memory"
  # shellcheck disable=SC2086  # FALLBACK holds several flags.
  "$PY" -m avt_jax.bench $FALLBACK --dtype=bfloat16 --steps="$STEPS" --warmup=3 --seq=100 \
      --features=512,17 --remat=true --scan_layers=true --json="$OUT/gpu_check_remat.json" \
      | tee "$OUT/gpu_check_remat.txt" || status=1
fi

FIRST_SIZE="${SIZES%%,*}"
LAST_BATCH="${BATCHES##*,}"
if [ "$SWITCHES" = 1 ]; then
  echo "== switches ($FIRST_SIZE b$LAST_BATCH bfloat16): dropout/masking key implementation, attention implementation"
  "$PY" -m avt_jax.bench --size="$FIRST_SIZE" --batch="$LAST_BATCH" --dtype=bfloat16 --steps="$STEPS" --warmup=3 \
      --seq=100 --features=512,17 --prng_impl=threefry2x32,rbg,unsafe_rbg --rounds=3 \
      --json="$OUT/gpu_check_prng.json" \
      | tee "$OUT/gpu_check_prng.txt" || status=1
  # Dropout masks hashed from element counters inside the fusion (default) against jax.random.bernoulli.
  "$PY" -m avt_jax.bench --size="$FIRST_SIZE" --batch="$LAST_BATCH" --dtype=bfloat16 --steps="$STEPS" --warmup=3 \
      --seq=100 --features=512,17 --dropout_masks=counter,jax --rounds=3 --json="$OUT/gpu_check_masks.json" \
      | tee "$OUT/gpu_check_masks.txt" || status=1
  # Self-attention Q/K/V as one matrix product (model.fused_qkv; off by default: no gain measured on CPU).
  "$PY" -m avt_jax.bench --size="$FIRST_SIZE" --batch="$LAST_BATCH" --dtype=bfloat16 --steps="$STEPS" --warmup=3 \
      --seq=100 --features=512,17 --fused_qkv --json="$OUT/gpu_check_fused.json" \
      | tee "$OUT/gpu_check_fused.txt" || status=1
  # cuDNN's fused attention (a failure to lower is printed in its row, not fatal).
  "$PY" -m avt_jax.bench --size="$FIRST_SIZE" --batch="$LAST_BATCH" --dtype=bfloat16 --steps="$STEPS" --warmup=3 \
      --seq=100 --features=512,17 --attention_impl=cudnn --json="$OUT/gpu_check_cudnn.json" \
      | tee "$OUT/gpu_check_cudnn.txt" || status=1
fi

if [ "$LOADER" = 1 ]; then
  echo "== input pipeline per core (one pinned core, each batch on the device at the end of its timing)"
  : > "$OUT/gpu_check_loader.txt"
  for spec in "features 100" "raw 50"; do
    set -- $spec
    "$PY" bench/bench_loader.py --kind="$1" --max_tokens="$2" --workers=0,1 --cpus=1 --clips="$LOADER_CLIPS" \
        --batch_size="$LOADER_BATCH" --batches="$LOADER_BATCHES" | tee -a "$OUT/gpu_check_loader.txt" || status=1
  done
fi

cat <<'EOF'

Anchors, clips/s on one H100 (base b64 | base b512 | large b64 | large b512):
  PyTorch release, fp32 eager:            1,306 | 2,332 |   505 |     -
  bf16 autocast + torch.compile:            973 | 5,881 |     - |     -
  plain jit + bf16 Flax:                  7,707 | 11,269 | 2,569 | 3,870
EOF
echo "results: $OUT/gpu_check.txt, $OUT/gpu_check.json (exit status $status)"
exit "$status"
