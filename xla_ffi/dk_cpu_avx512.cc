// The CPU loops for AVX-512 (F, VL, BW, DQ): 16 float lanes in zmm registers. Selected at load
// on CPUs that have these instructions (dk_cpu.cc); the baseline build runs everywhere else.
#include "dk_cpu_kernels.h"

#if defined(__x86_64__)
#define DK_CPU_ISA_NAME "avx512"
#define DK_CPU_VECTOR_BYTES 64

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#endif
namespace dk {
namespace avx512 {
#include "dk_cpu_loops.h"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const CpuKernels& cpu_kernels_avx512() { return avx512::kKernels; }
}  // namespace dk
#endif
