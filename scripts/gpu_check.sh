#!/usr/bin/env bash
# The GPU check, in one go (about 5 minutes on an H100/H200, capped at 7.5): build with CUDA, run
# the GPU tests with the default (v1) kernels and again with DK_JAX_CUDA_KERNELS=v2, time the
# two generations of kernels in one process (benchmarks/cuda_kernels.py), then
# compute-sanitizer memcheck on a small case with each. Everything lands in $OUT (or
# ./gpu-results): log.txt, results.json (exit status and seconds per step), cuda_kernels.json.
# GPU_CHECK_FULL=1 adds the full operator benchmark and the ops suite on the GPU (about 4 more
# minutes). Works offline: the build uses the preinstalled scikit-build-core/pybind11/cmake/ninja.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG="$OUT/log.txt"
# Steps stop being started (and are cut short) once GPU_CHECK_BUDGET_S seconds have passed, so
# the whole check fits a short lease; the steps come in order of importance.
BUDGET=${GPU_CHECK_BUDGET_S:-450}
declare -A STATUS
step() {  # step NAME TIMEOUT CMD...: run, log, remember the exit status
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 15)); then
    STATUS[$name]="skipped: budget of ${BUDGET}s spent"
    echo "== $name: ${STATUS[$name]}" | tee -a "$LOG"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  STATUS[$name]="${PIPESTATUS[0]} $((SECONDS - start))s"
  echo "== $name: exit ${STATUS[$name]}" | tee -a "$LOG"
}

nvidia-smi 2>&1 | tee -a "$LOG" | head -15
step build 150 env DK_JAX_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${DK_CUDA_ARCHS:-90}" \
  "$PY" -m pip install --no-build-isolation --no-deps -q -e .
# The kernel-generation tests set the variable themselves (both values); the rest of the file
# runs once per generation.
step gpu_tests_v1 200 env -u DK_JAX_CUDA_KERNELS \
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step gpu_tests_v2 120 env DK_JAX_CUDA_KERNELS=v2 \
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "not kernels"
step bench_kernels 180 "$PY" -m benchmarks.cuda_kernels --json "$OUT/cuda_kernels.json"
for v in v2 v1; do
  step "memcheck_$v" 60 env DK_JAX_CUDA_KERNELS=$v compute-sanitizer --tool memcheck \
    --leak-check no --error-exitcode 3 "$PY" scripts/gpu_small_case.py
done
if [[ "${GPU_CHECK_FULL:-0}" == 1 ]]; then
  step bench 150 "$PY" -m benchmarks.ops --repeats 10 --json "$OUT/ops_gpu.json"
  step ops_tests_on_gpu 100 "$PY" -m pytest -q -p no:cacheprovider -x tests/test_ops.py \
    -k "not bad_input and not check_grads"
fi

{
  echo "{"
  first=1
  for k in "${!STATUS[@]}"; do
    [[ $first == 1 ]] || echo ","
    first=0
    printf '  "%s": "%s"' "$k" "${STATUS[$k]}"
  done
  echo
  echo "}"
} > "$OUT/results.json"
cat "$OUT/results.json"
