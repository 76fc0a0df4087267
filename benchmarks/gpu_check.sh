#!/usr/bin/env bash
# GPU check (issue 7): on a machine with an NVIDIA GPU and a checkout of this repository (stock
# PyTorch, Triton, transformers, peft and pytest already installed; nothing is downloaded), in
# order of importance, each step only if the time left allows it:
#   build      the CUDA extension fimlora._C for this GPU (editable install, no dependencies)
#   gpu_tests  the gpu-marked tests: the triton and compiled backends against the float64 oracle
#   at_scale   calibration of a LLaMA-3-8B-shaped model: step time and memory against the floor,
#              memory against a full-model Fisher, 8 batches of 8 x 2048 (benchmarks/calibration_at_scale.py)
#   op         the op's GB/s per backend against copy bandwidth (benchmarks/op_throughput.py)
#   tune       the Triton kernel's tiles and sample splits (benchmarks/tune_triton.py)
#   confidence calibration with per-sample norms on vs off (benchmarks/confidence_overhead.py)
# Logs and CSVs go to $OUT/run/ (default OUT=benchmarks/results/gpu); with GPU_CHECK_PACK=1 they
# are packed into the one file $OUT/gpu_check.tgz instead. BUDGET_S (default 520) caps the whole run.
#
#   OUT=/tmp/gpu benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
RUN="$OUT/run"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-520}
mkdir -p "$RUN"
export PYTHONUNBUFFERED=1
summary="$RUN/summary.txt"
: > "$summary"

step() {  # step NAME LIMIT_S COMMAND...: run within min(LIMIT_S, time left), log to $RUN/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS - 15))
  if [ "$left" -lt 30 ]; then
    echo "$name: skipped, ${left}s left of the budget" | tee -a "$summary"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" > "$RUN/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc seconds=$((SECONDS - start)) (limit ${limit}s)" | tee -a "$summary"
  return $rc
}

{ nvidia-smi; $PY -c 'import torch, triton, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name())'; } > "$RUN/env.txt" 2>&1

# Without TORCH_CUDA_ARCH_LIST, torch builds for the GPUs it sees (sm_90 on an H200).
FIMLORA_BUILD_EXT=1 MAX_JOBS=${MAX_JOBS:-16} \
  step build 240 $PY -m pip install --no-build-isolation --no-deps -e .
# -P: `python -m` would put the checkout's root first on the path, and its kernels/ would stand in
# for the PyPI package `kernels` (DESIGN §4); the benchmark scripts keep it off themselves.
$PY -P -m fimlora.cli env >> "$RUN/env.txt" 2>&1
step gpu_tests 150 $PY -P -m pytest -q -x -m "gpu or interpreter or ext" -p no:cacheprovider \
  tests/test_op.py tests/test_triton_kernel.py tests/test_ext.py
step at_scale 200 $PY benchmarks/calibration_at_scale.py
cp benchmarks/results/calibration_at_scale_cuda.csv "$RUN/" 2>/dev/null
step op 90 $PY benchmarks/op_throughput.py --device cuda --repeats 10 --out op_throughput_gpu.csv
cp benchmarks/results/op_throughput_gpu.csv "$RUN/" 2>/dev/null
step tune 120 $PY benchmarks/tune_triton.py
cp benchmarks/results/tune_triton_gpu.csv "$RUN/" 2>/dev/null
step confidence 90 $PY benchmarks/confidence_overhead.py --device cuda
cp benchmarks/results/confidence_overhead_cuda.csv "$RUN/" 2>/dev/null
# Registers and spills of the CUDA kernel, as compiled for this GPU.
so=$(ls fimlora/_C*.so 2>/dev/null | head -1)
[ -n "$so" ] && cuobjdump --dump-resource-usage "$so" > "$RUN/cuda_resource_usage.txt" 2>&1

echo "--- results"
grep -hE "goal|best|copy bandwidth|passed|failed" "$RUN"/*.log 2>/dev/null | head -40
if [ "${GPU_CHECK_PACK:-0}" = 1 ]; then
  tar czf "$OUT/gpu_check.tgz" -C "$OUT" run && rm -rf "$RUN"
fi
