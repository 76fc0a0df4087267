#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and a checkout of this repository (stock PyTorch,
# Triton, pytest already installed; nothing is downloaded), build the CUDA extension, run the
# gpu-marked tests and the op benchmark, and write everything under $OUT (default
# benchmarks/results/gpu). Budget: well under 8 minutes on one H200.
#
#   OUT=/tmp/gpu benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: > "$summary"
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc seconds=$((SECONDS - start))" | tee -a "$summary"
  return $rc
}

{ nvidia-smi; $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'; } > "$OUT/env.txt" 2>&1

# Editable install, no dependencies, no build isolation: compiles fimlora._C against this torch.
FIMLORA_BUILD_EXT=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  step build 300 $PY -m pip install --no-build-isolation --no-deps -e .
step backends 60 $PY -m fimlora.cli env
step gpu_tests 240 $PY -m pytest -q -m "gpu or interpreter or ext" -p no:cacheprovider \
  tests/test_op.py tests/test_triton_kernel.py tests/test_ext.py
step op_benchmark 240 $PY benchmarks/op_throughput.py --device cuda --out op_throughput_gpu.csv
cp benchmarks/results/op_throughput_gpu.csv "$OUT/" 2>/dev/null
# Registers and spills of the CUDA kernel, as compiled for this GPU.
so=$(ls fimlora/_C*.so 2>/dev/null | head -1)
[ -n "$so" ] && cuobjdump --dump-resource-usage "$so" > "$OUT/cuda_resource_usage.txt" 2>&1
cat "$summary"
