// The CPU loops for the architecture's baseline, compiled with the library's own flags: SSE2 on
// x86-64 (4 float lanes in xmm registers), NEON on aarch64 (4 lanes in q registers). Runs on
// every CPU of the architecture.
#include "dk_cpu_kernels.h"

#define DK_CPU_ISA_NAME "baseline"
#define DK_CPU_VECTOR_BYTES 16

namespace dk {
namespace baseline {
#include "dk_cpu_loops.h"
}  // namespace baseline

const CpuKernels& cpu_kernels_baseline() { return baseline::kKernels; }
}  // namespace dk
