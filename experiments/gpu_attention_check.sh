#!/usr/bin/env bash
# One command for the GPU machine: GPU attention tests (compiled Pallas kernel, jax-triton
# forward, cuDNN dispatch, the Mosaic GPU Hopper forward), then the attention benchmark
# (pallas = Triton-lowered kernels, mosaic = Mosaic GPU forward, cudnn). Writes logs + JSONL to $OUT.
# Needs the jax-triton wheel in .whl/ (carry it):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl jax-triton==0.3.1
# Usage (repo root, GPU image's python3):  OUT=/tmp/out bash experiments/gpu_attention_check.sh [--full]
set -o pipefail
OUT=${OUT:-/tmp/attention_out}; mkdir -p "$OUT"
if ls .whl/jax_triton-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/jax_triton-*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
timeout 300 python3 -m pytest tests/test_attention_gpu.py -q -rs --tb=short 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
# Mosaic GPU forward: the compiled (GPU-marked) tests; they skip unless compute capability 9.x.
timeout 300 python3 -m pytest tests/test_mosaic_attention.py -m gpu -q -rs --tb=short 2>&1 \
  | tee "$OUT/mosaic_tests.log" | tail -40
if [ "$1" = "--full" ]; then
  ARGS="--D 128 64 --memory-sweep"
else
  ARGS="--D 128 --T 4096 16384 --impls pallas mosaic cudnn"
fi
timeout 400 python3 -m experiments.bench_attention $ARGS --json "$OUT/bench.jsonl" 2>&1 \
  | grep -v '^ \|^W1\|^E1' | tee "$OUT/bench.log"
