// The CPU loops for AVX2 with FMA: 8 float lanes in ymm registers. Selected at load on CPUs
// that have both and lack AVX-512 (dk_cpu.cc), or when DK_JAX_CPU_ISA=avx2 asks for it.
#include "dk_cpu_kernels.h"

#if defined(__x86_64__)
#define DK_CPU_ISA_NAME "avx2"
#define DK_CPU_VECTOR_BYTES 32

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace dk {
namespace avx2 {
#include "dk_cpu_loops.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const CpuKernels& cpu_kernels_avx2() { return avx2::kKernels; }
}  // namespace dk
#endif
