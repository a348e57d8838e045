// What the CPU handlers (dk_cpu.cc) and the per-instruction-set builds of the CPU loops
// (dk_cpu_<isa>.cc, each including dk_cpu_loops.h) share: the list of kernels, the table of
// entry points each build fills, and the thread helpers.
//
// One library carries the loops compiled for several instruction sets (AVX-512, AVX2 + FMA and
// the baseline of the architecture: SSE2 on x86-64, NEON on aarch64) and picks one table at load
// (dk_cpu.cc). Everything here is compiled for the baseline: only the loops are ISA-specific.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "dk_common.h"
#include "dk_targets.h"

namespace dk {

// The buffers of one nd_linear_sample call, in the roles the loops read them: `lhs` is the data
// (forward, JVP, grad coord) or the output cotangent (grad data); `tangent` the coordinate
// tangent (JVP) or the output cotangent (grad coord).
struct NdCall {
  NdProblem p;
  ffi::DataType dtype;
  const void* lhs = nullptr;
  const void* coord = nullptr;
  const void* tangent = nullptr;
  void* out = nullptr;
};

using DkKernel = ffi::Error (*)(ffi::ThreadPool*, const DkCall&);
using NdKernel = ffi::Error (*)(ffi::ThreadPool*, const NdCall&);

// The entry points of one instruction set's build of the loops.
struct CpuKernels {
  const char* isa;
#define DK_KERNEL_FIELD_dk(name) DkKernel name;
#define DK_KERNEL_FIELD_nd(name) NdKernel name;
#define DK_KERNEL_FIELD(name, family, mode, deform) DK_KERNEL_FIELD_##family(name)
  DK_TARGETS(DK_KERNEL_FIELD)
#undef DK_KERNEL_FIELD
};

// One table per build; the x86-64 tables of AVX2 and AVX-512 exist only on x86-64.
const CpuKernels& cpu_kernels_baseline();
#if defined(__x86_64__)
const CpuKernels& cpu_kernels_avx2();
const CpuKernels& cpu_kernels_avx512();
#endif

// ------------------------------------------------------------------------------------------
// Threads (compiled for the baseline; the loop bodies they run are the ISA builds' own).

inline int64_t thread_budget(ffi::ThreadPool* pool) {
  int64_t n = pool ? pool->num_threads() : 1;
  if (const char* env = std::getenv("DK_JAX_NUM_THREADS")) {
    const long v = std::strtol(env, nullptr, 10);
    if (v > 0) n = std::min<int64_t>(n <= 0 ? v : n, v);
  }
  return std::max<int64_t>(n, 1);
}

// Runs body(chunk) for chunk in [0, n_chunks) on the calling thread and up to `workers - 1`
// pool threads. Chunks are claimed from a shared counter and the caller only waits for chunks
// that were claimed, never for a pool task to start: a busy pool (for instance one whose threads
// run other custom calls) cannot deadlock us, it only leaves the caller with more chunks.
template <typename F>
void parallel_for(ffi::ThreadPool* pool, int64_t workers, int64_t n_chunks, const F& body) {
  if (n_chunks <= 0) return;
  workers = std::min(workers, n_chunks);
  if (workers <= 1 || pool == nullptr) {
    for (int64_t c = 0; c < n_chunks; ++c) body(c);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  // A late task only touches `state` (kept alive by its own copy of the pointer): it finds no
  // chunk left and never calls body, whose captures may be gone by then.
  auto work = [state, n_chunks, &body]() {
    int64_t finished = 0;
    for (int64_t c; (c = state->next.fetch_add(1)) < n_chunks; ++finished) body(c);
    if (finished > 0) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += finished;
      state->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < workers; ++t) {
    auto task = work;
    pool->Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == n_chunks; });
}

// [begin, end) of chunk c when n items are cut into k nearly equal chunks.
inline std::pair<int64_t, int64_t> chunk_range(int64_t n, int64_t k, int64_t c) {
  return {n * c / k, n * (c + 1) / k};
}

}  // namespace dk
