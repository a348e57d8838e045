#!/usr/bin/env bash
# Builds the CPU library with AddressSanitizer and runs every handler on a small case with
# offsets outside the image and scope, +-inf and NaN. Exits non-zero on any ASan report.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(pwd)/.venv/bin/python}
BUILD=build/asan
cmake -S . -B "$BUILD" -G Ninja -DDK_JAX_CUDA=OFF -DDK_JAX_MARCH_NATIVE=OFF -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -O1" \
  -DPython_EXECUTABLE="$PY" -DPython_FIND_STRATEGY=LOCATION -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" > "$BUILD.log"
cmake --build "$BUILD" >> "$BUILD.log"
LIB=$(ls "$BUILD"/_dk_cpu*.so)
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
  DK_JAX_CPU_LIBRARY="$LIB" "$PY" scripts/asan_small_case.py
echo "asan_check: no AddressSanitizer or UBSan report"
