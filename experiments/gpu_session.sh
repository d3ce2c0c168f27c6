#!/usr/bin/env bash
# Every GPU measurement this codebase still owes, in stages that each fit one 10-minute device call.
# Run on the GPU machine with its own python3 (jax 0.11.2 CUDA, flax, optax, torch, triton), from the
# repository root; results (logs + JSON) go to $OUT.
#
#   OUT=/tmp/out bash experiments/gpu_session.sh attention   # GPU attention tests + attention bench (incl. Mosaic GPU)
#   OUT=/tmp/out bash experiments/gpu_session.sh train       # JAX vs torch eager vs torch.compile train step (bf16)
#   OUT=/tmp/out bash experiments/gpu_session.sh memory      # remat policies: temp memory + step time, bf16
#   OUT=/tmp/out bash experiments/gpu_session.sh tests       # every test marked `gpu`
#
# Wheels the GPU image lacks travel in .whl/ (ignored by git; carry it). Fetch them once, on a machine with
# PyPI, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     jax-triton==0.3.1 ml-collections==1.1.0 tensorboardX==2.6.5
set -o pipefail
stage=${1:?usage: gpu_session.sh attention|train|memory|tests}
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
date -u +%F | tee -a "$OUT/device.txt"

case "$stage" in
  attention)
    bash experiments/gpu_attention_check.sh --full ;;
  train)
    timeout 560 python3 experiments/bench_train_step.py --gpu --configs cpu-small,gpu-base \
      --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log" ;;
  memory)
    timeout 560 python3 -m experiments.bench_memory --depths 12 --widths 512,1024 --batch-size 64 \
      --input-size 32 --precision bf16 --json "$OUT/memory.json" 2>&1 | tee "$OUT/memory.log" ;;
  tests)
    timeout 560 python3 -m pytest tests -m gpu -q -rs --tb=short 2>&1 | tee "$OUT/gpu_tests.log" ;;
  *)
    echo "unknown stage $stage (attention|train|memory|tests)"; exit 2 ;;
esac
