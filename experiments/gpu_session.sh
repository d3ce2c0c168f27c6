#!/usr/bin/env bash
# Every GPU measurement this codebase still owes, in stages that each fit one 10-minute device call.
# Run on the GPU machine with its own python3 (jax 0.11.2 CUDA, flax, optax, torch, triton), from the
# repository root; results (logs + JSON) go to $OUT.
#
#   OUT=/tmp/out bash experiments/gpu_session.sh attn-tests  # compiled attention kernels vs reference: Triton-lowered,
#                                                            # jax-triton forward, cuDNN dispatch, Mosaic GPU fwd + bwd
#   OUT=/tmp/out bash experiments/gpu_session.sh attn-tune   # Mosaic GPU sweep (block_k, slots, FA3 schedules), then
#                                                            # pallas vs mosaic vs cudnn vs torch SDPA at D=128, T=4k/16k
#   OUT=/tmp/out bash experiments/gpu_session.sh attn-bench  # the full attention table (D 128/64, T 512..16k) + memory
#   OUT=/tmp/out bash experiments/gpu_session.sh train       # JAX vs torch eager vs torch.compile train step (bf16)
#   OUT=/tmp/out bash experiments/gpu_session.sh memory      # remat policies: temp memory + step time, bf16
#   OUT=/tmp/out bash experiments/gpu_session.sh tests       # every other test marked `gpu`
#
# Wheels the GPU image lacks travel in .whl/ (ignored by git; carry it). Fetch them once, on a machine with
# PyPI, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     jax-triton==0.3.1 ml-collections==1.1.0 tensorboardX==2.6.5
set -o pipefail
stage=${1:?usage: gpu_session.sh attn-tests|attn-tune|attn-bench|train|memory|tests}
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
  attn-tests)
    timeout 560 python3 -m pytest tests/test_attention_gpu.py tests/test_mosaic_attention.py \
      tests/test_mosaic_attention_bwd.py -m gpu -q -rs --tb=short 2>&1 | tee "$OUT/attn_tests.log" ;;
  attn-tune)
    timeout 560 python3 -m experiments.bench_attention --tune --impls pallas mosaic cudnn torch_sdpa \
      --D 128 --T 4096 16384 --json "$OUT/attn_tune.jsonl" 2>&1 | grep -v '^W1\|^E1' \
      | tee "$OUT/attn_tune.log" ;;
  attn-bench)
    timeout 560 python3 -m experiments.bench_attention --D 128 64 --memory-sweep \
      --json "$OUT/attn_bench.jsonl" 2>&1 | grep -v '^W1\|^E1' | tee "$OUT/attn_bench.log" ;;
  train)
    timeout 560 python3 experiments/bench_train_step.py --gpu --configs cpu-small,gpu-base \
      --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log" ;;
  memory)
    timeout 560 python3 -m experiments.bench_memory --depths 12 --widths 512,1024 --batch-size 64 \
      --input-size 32 --precision bf16 --json "$OUT/memory.json" 2>&1 | tee "$OUT/memory.log" ;;
  tests)
    timeout 560 python3 -m pytest tests -m gpu -q -rs --tb=short --ignore tests/test_attention_gpu.py \
      --ignore tests/test_mosaic_attention.py --ignore tests/test_mosaic_attention_bwd.py 2>&1 \
      | tee "$OUT/gpu_tests.log" ;;
  *)
    echo "unknown stage $stage (attn-tests|attn-tune|attn-bench|train|memory|tests)"; exit 2 ;;
esac
