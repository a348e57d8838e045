#!/usr/bin/env bash
# Nsight Compute profile of the CUDA forward kernel on the standard shape at N=64 (speed of
# light, memory workload and occupancy sections), for the roofline notes in docs/BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
DK_JAX_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${DK_CUDA_ARCHS:-90}" \
  "$PY" -m pip install --no-build-isolation --no-deps -q -e . || exit 1
cat > /tmp/dk_profile_case.py <<'PYEOF'
import jax, jax.numpy as jnp, numpy as np, dk_jax
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(64, 56, 56, 128)), jnp.float32)
w = jnp.asarray(rng.normal(size=(4, 4, 128)), jnp.float32)
r = jnp.asarray(rng.normal(size=(64, 56, 56, 18)) * 0.5, jnp.float32)
f = jax.jit(lambda x, r, w: dk_jax.sample_depthwise(x, r, w, kernel_size=3, padding=1))
for _ in range(3):
    jax.block_until_ready(f(x, r, w))
PYEOF
timeout 200 ncu --kernel-name regex:forward_tile --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
  --section LaunchStats --section WarpStateStats "$PY" /tmp/dk_profile_case.py 2>&1 \
  | tee "$OUT/ncu_forward.txt" | grep -vE "^==PROF==|^\s*$" | tail -90
