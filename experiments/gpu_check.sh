#!/usr/bin/env bash
# The one prepared GPU check: <= 8 minutes on one H200 (internal deadline 450 s, + 30 s for the
# summary), the GPU image's own packages only (python3 with jax 0.11.2 CUDA, flax, optax, orbax,
# chex, torch 2.11, triton 3.6; no ml_collections, tensorboardX, jax-triton, transformers or
# tokenizers needed), most valuable work first, every kernel measurement in its own subprocess
# under `timeout` (a hang costs that step's seconds only). Order: device, Mosaic correctness,
# LM-kernel correctness (decode_attention, linear_attention: never run on a GPU before), ptxas,
# LM-kernel benches, attention T=16k, DiT train step, attention T=4k. The LM steps add about
# 60-80 s on an H200 (estimated, compiles included; at most 105 s by their limits), so the
# deadline cuts the tail first (T=4k benches, then torch.compile): the steps table says what ran.
#
# A GPU session runs exactly (device tool, from the repository root; nothing to carry):
#   run(command="bash experiments/gpu_check.sh", timeout_s=540)
# CPU smoke test of the same Python parts at tiny sizes in interpret mode (< 3 min on 2 cores:
# its 165 s deadline cuts the lowest-value tail; the LM steps compile with
# XLA_FLAGS=--xla_backend_optimization_level=0 there; OUT defaults to a new temp dir;
# tests/test_gpu_check.py runs it):
#   OUT=/tmp/gc bash experiments/gpu_check.sh --cpu-smoke
# Optional further stages, after the default ones and still inside the deadline (set a longer one
# with GPU_CHECK_DEADLINE_S=540 and timeout_s=600 when adding them):
#   bash experiments/gpu_check.sh --tune      # bench_attention --tune: Triton blocks + Mosaic sweep
#   bash experiments/gpu_check.sh --full      # the full attention table (D 128/64, T 512..16k)
#   bash experiments/gpu_check.sh --tests     # the attention tests marked `gpu` (pytest)
#   bash experiments/gpu_check.sh --memory    # bench_memory: remat policies, bf16 (table in log.txt)
#
# Results in $OUT, 8 files at the end (the device tool returns at most 8):
#   device.json        device, library versions, measured ceilings (bf16 matmul TFLOP/s, copy GB/s)
#   correctness.jsonl  Mosaic fwd+bwd (and each FA3 forward schedule) vs reference_attention
#   ptxas.txt          registers / spills / SASS census (HGMMA, LDL/STL) of the Mosaic kernels
#   attention.jsonl    bf16 D=128 T=16k (then 4k): mosaic, pallas (Triton), cudnn, torch SDPA;
#                      causal and not; fwd and fwd+bwd ms + TFLOP/s
#   lm_kernels.jsonl   decode_attention and linear_attention (experiments/gpu_check_lm.py):
#                      correctness vs the references (bf16, f32) and ms / GB/s vs plain JAX
#   train_step.json    DiT-B/2 train step: JAX vs torch eager vs torch.compile, MFU
#   log.txt            every step's full output, then the steps table (steps.tsv) at the end
#   summary.md         the short tables (also printed last), the steps table included
# steps.tsv (step, status ok / failed rc=N / timeout / skipped: deadline, seconds) is kept in
# $OUT while the check runs and moved into log.txt once summary.md holds its table.
set -u -o pipefail
cd "$(dirname "$0")/.."

MODE=gpu TUNE=0 FULL=0 TESTS=0 MEMORY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=smoke ;;
    --tune) TUNE=1 ;;
    --full) FULL=1 ;;
    --tests) TESTS=1 ;;
    --memory) MEMORY=1 ;;
    *) echo "usage: gpu_check.sh [--cpu-smoke] [--tune] [--full] [--tests] [--memory]"; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/gpu_check_tmp.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
: > "$OUT/steps.tsv"
: > "$OUT/log.txt"
rm -f "$OUT/summary.md"

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and torch share the GPU
if [ "$MODE" = smoke ]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  DEADLINE_S=${GPU_CHECK_DEADLINE_S:-165}
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  SMOKE=--smoke T_MAIN=128 T_MORE=64 TRAIN_CFG=tiny TRAIN_DEV=--cpu TRAIN_REP="--repeats 1"
  # interpret-mode Pallas compiles ~3x faster on CPU at LLVM -O0 (same results)
  LM_ENV=("XLA_FLAGS=--xla_backend_optimization_level=0${XLA_FLAGS:+ $XLA_FLAGS}")
else
  PY=${PYTHON:-python3}
  DEADLINE_S=${GPU_CHECK_DEADLINE_S:-450}
  SMOKE= T_MAIN=16384 T_MORE=4096 TRAIN_CFG=gpu-base TRAIN_DEV=--gpu TRAIN_REP="--repeats 3"
  LM_ENV=()
fi
END=$((SECONDS + DEADLINE_S))

# step NAME LIMIT_S CMD...: runs CMD under timeout min(LIMIT_S, time left), output to log.txt;
# records the outcome in steps.tsv and prints one line.
step() {
  local name=$1 limit=$2 left t rc status start
  shift 2
  limit=$((limit * ${GPU_CHECK_LIMIT_SCALE:-1}))   # a loaded machine (the test suite) scales the per-step limits
  left=$((END - SECONDS))
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped: deadline\t0\n' "$name" >> "$OUT/steps.tsv"
    echo "[gpu_check] $name: skipped (deadline)"
    return 0
  fi
  t=$(( limit < left ? limit : left ))
  start=$SECONDS
  echo "===== $name (limit ${t}s) $(date -u +%T)" >> "$OUT/log.txt"
  timeout -k 5 "$t" "$@" >> "$OUT/log.txt" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout after ${t}s" ;;
    *) status="failed rc=$rc" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  echo "[gpu_check] $name: $status ($((SECONDS - start))s; ${DEADLINE_S}s budget, $((END - SECONDS))s left)"
}
check() { step "$1" "$2" "$PY" -m experiments.gpu_check "${@:3}" --out "$OUT" $SMOKE; }
# lm PART LIMIT_S: one part of experiments/gpu_check_lm.py (-> lm_kernels.jsonl)
lm() { step "lm $1" "$2" env ${LM_ENV[@]+"${LM_ENV[@]}"} "$PY" -m experiments.gpu_check_lm "$1" \
  --out "$OUT" $SMOKE; }

echo "[gpu_check] mode=$MODE out=$OUT python=$PY deadline=${DEADLINE_S}s"
command -v nvidia-smi > /dev/null && nvidia-smi >> "$OUT/log.txt" 2>&1

# (1) device info + measured ceilings
check device 60 device
# (2) Mosaic GPU correctness (never run on a GPU before): fwd+bwd, then each FA3 forward schedule
for c in fwdbwd-gqa-causal-ragged fwdbwd-noncausal fwdbwd-d64-mqa-causal-ragged-f16; do
  check "correct $c" 60 correct --case "$c"
done
for c in fwd-overlap fwd-pingpong fwd-overlap+pingpong; do
  check "correct $c" 45 correct --case "$c"
done
# (2b) LM kernels (never run on a GPU before): decode_attention (bf16 + f32: ragged GQA, tree
# mask + MQA, num_splits=1 vs auto), linear_attention fwd and fwd+bwd (bf16 + f32, causal or not)
lm decode-correct 30
lm linear-correct 30
check ptxas 60 ptxas --dump "$TMP/mosaic_dump"
# (2c) LM kernel timings: decode B=1/8/32 S=8k (kernel / reference / XLA: ms, K+V GB/s);
# linear B=4 T=4k H=8 D=64 (kernel / chunked JAX / quadratic: fwd, fwd+bwd ms)
lm decode-bench 20
lm linear-bench 25
# (3) attention TFLOP/s at bf16 D=128 T=16k, causal and not, fwd and fwd+bwd
for impl in mosaic pallas cudnn torch_sdpa; do
  check "bench $impl T=$T_MAIN" 90 bench --impl "$impl" --T "$T_MAIN"
done
# (4) DiT train step: JAX + torch eager (interleaved), then torch.compile on its own
step "train jax,torch_eager" 120 "$PY" experiments/bench_train_step.py $TRAIN_DEV --configs "$TRAIN_CFG" \
  --impls jax,torch_eager $TRAIN_REP --target-seconds 0.5 --json "$TMP/train_a.json"
step "train torch_compile" 150 "$PY" experiments/bench_train_step.py $TRAIN_DEV --configs "$TRAIN_CFG" \
  --impls torch_compile $TRAIN_REP --target-seconds 0.5 --json "$TMP/train_b.json"
# (5) if time remains: T=4k
for impl in mosaic pallas cudnn torch_sdpa; do
  check "bench $impl T=$T_MORE" 60 bench --impl "$impl" --T "$T_MORE"
done
# optional stages
if [ "$TUNE" = 1 ]; then
  step "tune" 300 "$PY" -m experiments.bench_attention --tune --impls pallas mosaic --D 128 \
    --T "$T_MAIN" --json "$TMP/tune.jsonl"
  cat "$TMP/tune.jsonl" >> "$OUT/attention.jsonl" 2> /dev/null
fi
if [ "$FULL" = 1 ]; then
  step "full table" 400 "$PY" -m experiments.bench_attention --D 128 64 --impls mosaic pallas cudnn \
    torch_sdpa xla --json "$TMP/full.jsonl"
  cat "$TMP/full.jsonl" >> "$OUT/attention.jsonl" 2> /dev/null
fi
if [ "$TESTS" = 1 ]; then
  step "gpu tests" 400 "$PY" -m pytest tests/test_attention_gpu.py tests/test_mosaic_attention.py \
    tests/test_mosaic_attention_bwd.py -m gpu -q -rs --tb=short
fi
if [ "$MEMORY" = 1 ]; then
  step "memory" 300 "$PY" -m experiments.bench_memory --depths 12 --widths 512,1024 --batch-size 64 \
    --input-size 32 --precision bf16
fi

END=$((END + 30))   # the summary always runs
check summary 30 summary "$TMP/train_a.json" "$TMP/train_b.json"   # merges train_step.json too
if [ -s "$OUT/summary.md" ]; then   # 8 files at most come back: the steps table moves to log.txt
  { echo "===== steps.tsv (step, status, seconds)"; cat "$OUT/steps.tsv"; } >> "$OUT/log.txt"
  rm -f "$OUT/steps.tsv"
  cat "$OUT/summary.md"
else
  echo "[gpu_check] no summary.md: see $OUT/steps.tsv and $OUT/log.txt"
  exit 1
fi
