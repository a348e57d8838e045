#!/usr/bin/env bash
# Cross-compiles the CPU handlers and loops for aarch64 (`make check-aarch64`): the NEON build of
# the loops is the baseline there and the x86-64 builds drop out. Compiles and links the
# library's C++ (not the pybind11 module, which would need an aarch64 Python), then checks that
# the loops use NEON's 4-lane float instructions. Needs Debian's g++-aarch64-linux-gnu and the
# .venv (for the XLA FFI headers that ship with jax).
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX:-aarch64-linux-gnu-g++}
OBJDUMP=${OBJDUMP:-aarch64-linux-gnu-objdump}
PY=${PY:-.venv/bin/python}
command -v "$CXX" >/dev/null || { echo "no $CXX: apt-get install g++-aarch64-linux-gnu"; exit 1; }
XLA=$("$PY" -c "import jax.ffi; print(jax.ffi.include_dir())")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for src in dk_cpu dk_cpu_baseline dk_cpu_avx2 dk_cpu_avx512; do
  echo "compiling xla_ffi/$src.cc for aarch64"
  "$CXX" -std=c++17 -O3 -Wall -Wextra -Werror -Wno-psabi -fno-math-errno -fPIC \
    -DDK_PLATFORM_CPU -isystem "$XLA" -Ixla_ffi -c "xla_ffi/$src.cc" -o "$OUT/$src.o" &
done
wait
"$CXX" -shared -o "$OUT/libdk_cpu.so" "$OUT"/*.o
file "$OUT/libdk_cpu.so"
neon=$("$OBJDUMP" -d "$OUT/libdk_cpu.so" | grep -cE 'fml[as][[:space:]]+v[0-9]+\.4s' || true)
echo "NEON 4-lane float multiply-adds in the library: $neon"
[ "$neon" -gt 0 ] || { echo "no NEON vector code found"; exit 1; }
exported=$(nm -D --defined-only "$OUT/libdk_cpu.so")
for sym in dk_sample_forward_cpu dk_deform_cols_grad_offset_cpu dk_nd_grad_coord_cpu; do
  grep -q " T $sym\$" <<<"$exported" || { echo "missing $sym"; exit 1; }
done
echo "aarch64 build: ok"
