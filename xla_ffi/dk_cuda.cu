// CUDA kernels and XLA FFI handlers. As on the CPU, every number comes from dk_math.h; this
// file decides who computes what:
//  - forward, JVPs and the image gradient: one block per output location, threads over channels
//    (contiguous in NHWC); the footprints of the location's taps are computed once into shared
//    memory and read by every channel of their rotation group;
//  - weight gradient: blocks over (tile of locations, channel chunk) accumulate in shared memory,
//    each thread owning its channel's column, write one partial per tile, and a second kernel
//    sums the partials in a fixed order: deterministic, no floating-point atomics;
//  - rotation / offset / coordinate gradients: one thread per output element, summing over
//    channels: deterministic, no atomics;
//  - image and nd data gradients scatter with atomicAdd into a buffer of the accumulator type,
//    float32 or float64 (these are the only non-deterministic sums).
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "dk_common.h"
#include "dk_cuda_v2.cuh"
#include "dk_math.h"
#include "dk_targets.h"

namespace dk {
namespace {

constexpr int kThreads = 128;
constexpr int kTile = 32;                        // locations per weight-gradient block
constexpr size_t kMaxTableBytes = 32 * 1024;     // shared memory for footprint tables

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline ffi::Error cuda_error(const char* where) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("dk_jax: CUDA error in ") + where + ": " + cudaGetErrorString(e));
}

inline int channel_threads(int64_t C) {
  return int(std::min<int64_t>(kThreads, std::max<int64_t>(32, ceil_div(C, 32) * 32)));
}


// Footprints of every tap of one location, computed once per block: the taps' image
// footprints, then (with_kernels) taps * G kernel footprints, group-major.
template <bool kDeform, typename T>
__device__ void fill_location_table(const Problem& p, const T* rotation, const T* offset,
                                    int64_t loc, Footprint<acc_t<T>>* table, bool with_kernels) {
  const int64_t taps = p.taps();
  const int64_t j = loc % p.Wo, i = (loc / p.Wo) % p.Ho;
  const T* rot = rotation + loc * p.G * taps * 2;
  const T* off = kDeform ? offset + loc * taps * 2 : nullptr;
  const int64_t entries = taps + (with_kernels ? taps * p.G : 0);
  for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
    if (e < taps) {
      table[e] = image_footprint<kDeform>(p, off, i, j, e / p.Kw, e % p.Kw);
    } else {
      const int64_t k = e - taps, g = k / taps, tap = k % taps;
      table[e] = kernel_footprint(p, rot, tap / p.Kw, tap % p.Kw, g);
    }
  }
}

// Forward, JVPs and the image gradient: one block per location.
template <Mode M, bool kDeform, typename T>
__global__ void location_kernel(Problem p, Operands<T> A, const T* zero_row,
                                acc_t<T>* grad_image, bool kernel_table) {
  using F = acc_t<T>;
  extern __shared__ unsigned char smem[];
  Footprint<F>* table = reinterpret_cast<Footprint<F>*>(smem);
  constexpr int NI = kDeform ? 4 : 1;
  const int64_t loc = blockIdx.x;
  const int64_t n = loc / (p.Ho * p.Wo);
  const int64_t taps = p.taps(), C = p.C, S = p.scope();
  fill_location_table<kDeform>(p, A.rotation, A.offset, loc, table, kernel_table);
  __syncthreads();
  const T* x_n = A.x ? A.x + n * p.H * p.W * C : nullptr;
  // Columns modes read their "weight" rows from the location's columns of the cotangent.
  const T* w_n = is_cols(M) ? A.cot + loc * S * C : A.weight + (p.Nw == 1 ? 0 : n) * S * C;
  const T* rot = A.rotation + loc * p.G * taps * 2;
  constexpr Mode L = loop_of(M);
  const T* tan = takes_tangent(M) ? A.tangent + loc * tangent_stride(M, p.G, taps) : nullptr;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t g = c % p.G;
    F acc = F(0);
    for (int64_t tap = 0; tap < taps; ++tap) {
      const Footprint<F>& img = table[tap];
      Footprint<F> kf = kernel_table ? table[taps + g * taps + tap]
                                     : kernel_footprint(p, rot, tap / p.Kw, tap % p.Kw, g);
      use_order_weights<M>(kf, tan, g * taps + tap);
      const T* xr[4];
      const T* wr[4];
      for (int k = 0; k < NI; ++k) {
        xr[k] = (x_n && img.index[k] >= 0) ? x_n + img.index[k] * C : zero_row;
      }
      for (int k = 0; k < 4; ++k) wr[k] = kf.index[k] >= 0 ? w_n + kf.index[k] * C : zero_row;
      if (L == Mode::kForward) {
        acc += tap_product(blend<NI>(img.w, xr, c), blend<4>(kf.w, wr, c));
      } else if (M == Mode::kJvpRotation) {
        const int64_t r = (g * taps + tap) * 2;
        const F dk = position_tangent(blend<4>(kf.dwdu, wr, c), blend<4>(kf.dwdv, wr, c),
                                          widen(tan[r]), widen(tan[r + 1]));
        acc += tap_product(blend<NI>(img.w, xr, c), dk);
      } else if (M == Mode::kJvpOffset) {
        const F dx =
            position_tangent(blend<NI>(img.dwdu, xr, c), blend<NI>(img.dwdv, xr, c),
                             widen(tan[2 * tap]), widen(tan[2 * tap + 1]));
        acc += tap_product(dx, blend<4>(kf.w, wr, c));
      } else if (L == Mode::kGradImage || L == Mode::kColsGradImage) {
        const F gy = is_cols(M) ? F(1) : widen(A.cot[loc * C + c]);
        const F d = gy * blend<4>(kf.w, wr, c);
        for (int k = 0; k < NI; ++k) {
          if (scatters_to(img, k)) {
            atomicAdd(grad_image + (n * p.H * p.W + img.index[k]) * C + c, img.w[k] * d);
          }
        }
      }
    }
    if (L != Mode::kGradImage && L != Mode::kColsGradImage) A.out[loc * C + c] = narrow<T>(acc);
  }
}

// Columns, and their JVPs: one block per location, threads over channels; each thread sums
// its channel's Sh*Sw scope positions in shared memory (column[s * blockDim.x + thread]), so
// the scatter over a tap's four kernel corners needs no atomics.
template <Mode M, bool kDeform, typename T>
__global__ void cols_kernel(Problem p, Operands<T> A, const T* zero_row, bool kernel_table) {
  using F = acc_t<T>;
  extern __shared__ unsigned char smem[];
  Footprint<F>* table = reinterpret_cast<Footprint<F>*>(smem);
  constexpr int NI = kDeform ? 4 : 1;
  const int64_t taps = p.taps(), C = p.C, S = p.scope();
  F* column = reinterpret_cast<F*>(table + taps + (kernel_table ? taps * p.G : 0));
  const int64_t loc = blockIdx.x;
  const int64_t n = loc / (p.Ho * p.Wo);
  fill_location_table<kDeform>(p, A.rotation, A.offset, loc, table, kernel_table);
  __syncthreads();
  const T* x_n = A.x + n * p.H * p.W * C;
  const T* rot = A.rotation + loc * p.G * taps * 2;
  const T* tan = takes_tangent(M) ? A.tangent + loc * tangent_stride(M, p.G, taps) : nullptr;
  F* mine = column + threadIdx.x;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t g = c % p.G;
    for (int64_t s = 0; s < S; ++s) mine[s * blockDim.x] = F(0);
    for (int64_t tap = 0; tap < taps; ++tap) {
      const Footprint<F>& img = table[tap];
      Footprint<F> kf = kernel_table ? table[taps + g * taps + tap]
                                     : kernel_footprint(p, rot, tap / p.Kw, tap % p.Kw, g);
      use_order_weights<M>(kf, tan, g * taps + tap);
      const T* xr[4];
      for (int k = 0; k < NI; ++k) xr[k] = img.index[k] >= 0 ? x_n + img.index[k] * C : zero_row;
      F d;
      F w[4];
      if (M == Mode::kColsJvpOffset) {
        d = position_tangent(blend<NI>(img.dwdu, xr, c), blend<NI>(img.dwdv, xr, c),
                             widen(tan[2 * tap]), widen(tan[2 * tap + 1]));
      } else {
        d = blend<NI>(img.w, xr, c);
      }
      for (int k = 0; k < 4; ++k) {
        if (M == Mode::kColsJvpRotation) {
          const int64_t r = (g * taps + tap) * 2;
          w[k] = position_tangent(kf.dwdu[k], kf.dwdv[k], widen(tan[r]), widen(tan[r + 1]));
        } else {
          w[k] = kf.w[k];
        }
      }
      for (int k = 0; k < 4; ++k) {
        if (scatters_to(kf, k)) mine[kf.index[k] * blockDim.x] += w[k] * d;
      }
    }
    for (int64_t s = 0; s < S; ++s) A.out[(loc * S + s) * C + c] = narrow<T>(mine[s * blockDim.x]);
  }
}

// Forward: a block is kLocs locations x 32 channel lanes. The footprints of every tap of the
// block's locations are computed once, in parallel, into shared memory (compact: int32 index and
// weight per corner), then each warp sweeps the channels of one location, reading them by
// broadcast. One footprint serves every channel of its rotation group.
constexpr int kLocs = 8;

template <typename F>
struct CompactFootprint {
  int32_t index[4];
  F w[4];
};

template <bool kDeform, typename T>
__global__ void forward_tile_kernel(Problem p, Operands<T> A, const T* zero_row) {
  using F = acc_t<T>;
  extern __shared__ unsigned char smem[];
  CompactFootprint<F>* table = reinterpret_cast<CompactFootprint<F>*>(smem);
  constexpr int NI = kDeform ? 4 : 1;
  const int64_t taps = p.taps(), C = p.C, S = p.scope();
  const int64_t per_loc = taps * (1 + p.G);
  const int64_t locations = p.N * p.Ho * p.Wo;
  const int64_t first = int64_t(blockIdx.x) * kLocs;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t e = tid; e < kLocs * per_loc; e += blockDim.x * blockDim.y) {
    const int64_t loc = first + e / per_loc, k = e % per_loc;
    if (loc >= locations) continue;
    const int64_t j = loc % p.Wo, i = (loc / p.Wo) % p.Ho;
    Footprint<F> f;
    if (k < taps) {
      f = image_footprint<kDeform>(p, kDeform ? A.offset + loc * taps * 2 : A.offset, i, j,
                                   k / p.Kw, k % p.Kw);
    } else {
      const int64_t g = (k - taps) / taps, tap = (k - taps) % taps;
      f = kernel_footprint(p, A.rotation + loc * p.G * taps * 2, tap / p.Kw, tap % p.Kw, g);
    }
    CompactFootprint<F>& out = table[e];
    for (int c = 0; c < 4; ++c) {
      out.index[c] = int32_t(f.index[c]);
      out.w[c] = f.w[c];
    }
  }
  __syncthreads();
  const int64_t loc = first + threadIdx.y;
  if (loc >= locations) return;
  const int64_t n = loc / (p.Ho * p.Wo);
  const T* x_n = A.x + n * p.H * p.W * C;
  const T* w_n = A.weight + (p.Nw == 1 ? 0 : n) * S * C;
  const CompactFootprint<F>* mine = table + threadIdx.y * per_loc;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t g = c % p.G;
    F acc = F(0);
    for (int64_t tap = 0; tap < taps; ++tap) {
      const CompactFootprint<F>& img = mine[tap];
      const CompactFootprint<F>& kf = mine[taps + g * taps + tap];
      const T* xr[4];
      const T* wr[4];
      for (int k = 0; k < NI; ++k) xr[k] = img.index[k] >= 0 ? x_n + int64_t(img.index[k]) * C : zero_row;
      for (int k = 0; k < 4; ++k) wr[k] = kf.index[k] >= 0 ? w_n + int64_t(kf.index[k]) * C : zero_row;
      acc += tap_product(blend<NI>(img.w, xr, c), blend<4>(kf.w, wr, c));
    }
    A.out[loc * C + c] = narrow<T>(acc);
  }
}

// Weight gradient, first pass: block (tile of kTile locations of one sample, channel chunk).
template <Mode M, bool kDeform, typename T>
__global__ void grad_weight_partial_kernel(Problem p, Operands<T> A, const T* zero_row,
                                           acc_t<T>* partials, int64_t tiles_per_sample,
                                           bool kernel_table) {
  using F = acc_t<T>;
  extern __shared__ unsigned char smem[];
  const int64_t taps = p.taps(), C = p.C, S = p.scope();
  const size_t table_entries = size_t(taps + (kernel_table ? taps * p.G : 0));
  Footprint<F>* table = reinterpret_cast<Footprint<F>*>(smem);
  F* column = reinterpret_cast<F*>(table + table_entries);  // S x blockDim.x
  constexpr int NI = kDeform ? 4 : 1;
  const int64_t tile = blockIdx.x;
  const int64_t n = tile / tiles_per_sample;
  const int64_t first = (tile % tiles_per_sample) * kTile;
  const int64_t last = min(first + int64_t(kTile), p.Ho * p.Wo);
  const int64_t c = blockIdx.y * blockDim.x + threadIdx.x;
  for (int64_t s = 0; s < S; ++s) column[s * blockDim.x + threadIdx.x] = F(0);
  const T* x_n = A.x + n * p.H * p.W * C;
  for (int64_t l = first; l < last; ++l) {
    const int64_t loc = n * p.Ho * p.Wo + l;
    __syncthreads();
    fill_location_table<kDeform>(p, A.rotation, A.offset, loc, table, kernel_table);
    __syncthreads();
    if (c >= C) continue;
    const int64_t g = c % p.G;
    const T* rot = A.rotation + loc * p.G * taps * 2;
    const F gy = widen(A.cot[loc * C + c]);
    const T* tan = takes_tangent(M) ? A.tangent + loc * tangent_stride(M, p.G, taps) : nullptr;
    for (int64_t tap = 0; tap < taps; ++tap) {
      const Footprint<F>& img = table[tap];
      Footprint<F> kf = kernel_table ? table[taps + g * taps + tap]
                                     : kernel_footprint(p, rot, tap / p.Kw, tap % p.Kw, g);
      use_order_weights<M>(kf, tan, g * taps + tap);
      const T* xr[4];
      for (int k = 0; k < NI; ++k) xr[k] = img.index[k] >= 0 ? x_n + img.index[k] * C : zero_row;
      const F d = gy * blend<NI>(img.w, xr, c);
      for (int k = 0; k < 4; ++k) {
        if (scatters_to(kf, k)) column[kf.index[k] * blockDim.x + threadIdx.x] += kf.w[k] * d;
      }
    }
  }
  if (c < C) {
    for (int64_t s = 0; s < S; ++s) {
      partials[(tile * S + s) * C + c] = column[s * blockDim.x + threadIdx.x];
    }
  }
}

// Weight gradient, second pass: sum the tiles of each sample (Nw = N) or of all samples.
template <typename T>
__global__ void grad_weight_reduce_kernel(Problem p, const acc_t<T>* partials,
                                          int64_t tiles_per_sample, T* out) {
  using F = acc_t<T>;
  const int64_t S = p.scope(), C = p.C;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // over Nw * S * C
  if (e >= p.Nw * S * C) return;
  const int64_t nw = e / (S * C), sc = e % (S * C);
  const int64_t t0 = p.Nw == 1 ? 0 : nw * tiles_per_sample;
  const int64_t t1 = p.Nw == 1 ? p.N * tiles_per_sample : t0 + tiles_per_sample;
  F acc = F(0);
  for (int64_t t = t0; t < t1; ++t) acc += partials[t * S * C + sc];
  out[e] = narrow<T>(acc);
}

// Rotation gradient: one thread per (location, tap, group), summing its group's channels.
// Columns (kCols): the weight rows are the location's columns of the cotangent, gy = 1.
// kCross: the gradient of the cross tangent instead (one number, with d2w/du dv).
template <bool kDeform, bool kCols, bool kCross, typename T>
__global__ void grad_rotation_kernel(Problem p, Operands<T> A, const T* zero_row) {
  using F = acc_t<T>;
  constexpr int NI = kDeform ? 4 : 1;
  const int64_t taps = p.taps(), C = p.C;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (loc, g, tap)
  if (e >= p.N * p.Ho * p.Wo * p.G * taps) return;
  const int64_t tap = e % taps, g = (e / taps) % p.G, loc = e / (taps * p.G);
  const int64_t n = loc / (p.Ho * p.Wo), i = (loc / p.Wo) % p.Ho, j = loc % p.Wo;
  const int64_t a = tap / p.Kw, b = tap % p.Kw;
  const Footprint<F> img =
      image_footprint<kDeform>(p, kDeform ? A.offset + loc * taps * 2 : A.offset, i, j, a, b);
  const Footprint<F> kf = kernel_footprint(p, A.rotation + loc * p.G * taps * 2, a, b, g);
  const T* x_n = A.x + n * p.H * p.W * C;
  const T* w_n = kCols ? A.cot + loc * p.scope() * C : A.weight + (p.Nw == 1 ? 0 : n) * p.scope() * C;
  const T* xr[4];
  const T* wr[4];
  for (int k = 0; k < NI; ++k) xr[k] = img.index[k] >= 0 ? x_n + img.index[k] * C : zero_row;
  for (int k = 0; k < 4; ++k) wr[k] = kf.index[k] >= 0 ? w_n + kf.index[k] * C : zero_row;
  F su = F(0), sv = F(0);
  for (int64_t c = g; c < C; c += p.G) {
    const F d = (kCols ? F(1) : widen(A.cot[loc * C + c])) * blend<NI>(img.w, xr, c);
    if (kCross) {
      su += d * blend<4>(kf.duv, wr, c);
    } else {
      su += d * blend<4>(kf.dwdu, wr, c);
      sv += d * blend<4>(kf.dwdv, wr, c);
    }
  }
  if (kCross) {
    A.out[loc * p.G * taps + g * taps + tap] = narrow<T>(su);
    return;
  }
  T* o = A.out + loc * p.G * taps * 2 + (g * taps + tap) * 2;
  o[0] = narrow<T>(su);
  o[1] = narrow<T>(sv);
}

// Offset gradient: one thread per (location, tap), summing over every channel.
template <bool kCols, typename T>
__global__ void grad_offset_kernel(Problem p, Operands<T> A, const T* zero_row) {
  using F = acc_t<T>;
  const int64_t taps = p.taps(), C = p.C;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (loc, tap)
  if (e >= p.N * p.Ho * p.Wo * taps) return;
  const int64_t tap = e % taps, loc = e / taps;
  const int64_t n = loc / (p.Ho * p.Wo), i = (loc / p.Wo) % p.Ho, j = loc % p.Wo;
  const int64_t a = tap / p.Kw, b = tap % p.Kw;
  const Footprint<F> img = image_footprint<true>(p, A.offset + loc * taps * 2, i, j, a, b);
  const T* x_n = A.x + n * p.H * p.W * C;
  const T* w_n = kCols ? A.cot + loc * p.scope() * C : A.weight + (p.Nw == 1 ? 0 : n) * p.scope() * C;
  const T* xr[4];
  for (int k = 0; k < 4; ++k) xr[k] = img.index[k] >= 0 ? x_n + img.index[k] * C : zero_row;
  F su = F(0), sv = F(0);
  for (int64_t g = 0; g < p.G; ++g) {
    const Footprint<F> kf = kernel_footprint(p, A.rotation + loc * p.G * taps * 2, a, b, g);
    const T* wr[4];
    for (int k = 0; k < 4; ++k) wr[k] = kf.index[k] >= 0 ? w_n + kf.index[k] * C : zero_row;
    for (int64_t c = g; c < C; c += p.G) {
      const F d = (kCols ? F(1) : widen(A.cot[loc * C + c])) * blend<4>(kf.w, wr, c);
      su += d * blend<4>(img.dwdu, xr, c);
      sv += d * blend<4>(img.dwdv, xr, c);
    }
  }
  A.out[e * 2] = narrow<T>(su);
  A.out[e * 2 + 1] = narrow<T>(sv);
}

template <typename T>
__global__ void store_kernel(const acc_t<T>* src, T* dst, int64_t n) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < n) dst[e] = narrow<T>(src[e]);
}

// Zero-filled device memory from XLA's scratch allocator (no cudaMalloc per call).
inline void* scratch_zeros(ffi::ScratchAllocator& scratch, size_t bytes, cudaStream_t stream) {
  // XLA accepts alignments up to 16 bytes here.
  auto mem = scratch.Allocate(std::max<size_t>(bytes, 16), 16);
  if (!mem.has_value()) return nullptr;
  cudaMemsetAsync(*mem, 0, std::max<size_t>(bytes, 16), stream);
  return *mem;
}

template <Mode M, bool kDeform, typename T>
ffi::Error dk_launch(cudaStream_t stream, ffi::ScratchAllocator& scratch, const Problem& p,
                     const Operands<T>& A, int64_t out_elements) {
  using F = acc_t<T>;
  // Opt-in second-generation kernels (dk_cuda_v2.cuh), chosen per call; they accumulate in
  // float32, so float64 inputs keep the first-generation kernels.
  if constexpr (std::is_same<F, float>::value) {
    if (v2::requested() && v2::try_launch<M, kDeform, T>(stream, p, A)) return cuda_error("v2");
  }
  const int64_t locations = p.N * p.Ho * p.Wo;
  const int64_t taps = p.taps();
  const T* zero_row = static_cast<const T*>(scratch_zeros(scratch, p.C * sizeof(T), stream));
  if (!zero_row) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "dk_jax: scratch");
  const size_t fp = sizeof(Footprint<F>);
  const bool kernel_table = size_t(taps * (p.G + 1)) * fp <= kMaxTableBytes;
  const size_t table_bytes = size_t(taps + (kernel_table ? taps * p.G : 0)) * fp;
  const int threads = channel_threads(p.C);

  constexpr Mode L = loop_of(M);
  if (L == Mode::kForward || M == Mode::kJvpRotation || M == Mode::kJvpOffset ||
      L == Mode::kGradImage || L == Mode::kColsGradImage) {
    F* grad_image = nullptr;
    const bool scatter = L == Mode::kGradImage || L == Mode::kColsGradImage;
    if (scatter) {
      if (std::is_same<T, F>::value) {
        grad_image = reinterpret_cast<F*>(A.out);
        cudaMemsetAsync(grad_image, 0, out_elements * sizeof(F), stream);
      } else {
        grad_image = static_cast<F*>(scratch_zeros(scratch, out_elements * sizeof(F), stream));
        if (!grad_image) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "dk_jax: scratch");
      }
    }
    const size_t tile_bytes = size_t(kLocs * taps * (1 + p.G)) * sizeof(CompactFootprint<F>);
    // The opt-in v2 scatter of the DK+DCN image gradient (dk_cuda_v2.cuh) runs instead of the
    // location kernel where it applies.
    bool launched = false;
    if constexpr (std::is_same<F, float>::value) {
      launched = locations > 0 && M == Mode::kGradImage && kDeform && v2::requested() &&
                 v2::try_launch_deform_grad_image(stream, p, A, grad_image);
    }
    if (!launched && locations > 0) {
      if (M == Mode::kForward && tile_bytes <= kMaxTableBytes) {
        forward_tile_kernel<kDeform, T><<<unsigned(ceil_div(locations, kLocs)), dim3(32, kLocs),
                                          tile_bytes, stream>>>(p, A, zero_row);
      } else {
        location_kernel<M, kDeform, T><<<unsigned(locations), threads, table_bytes, stream>>>(
            p, A, zero_row, grad_image, kernel_table);
      }
    }
    if (scatter && !std::is_same<T, F>::value && out_elements > 0) {
      store_kernel<T><<<unsigned(ceil_div(out_elements, 256)), 256, 0, stream>>>(
          grad_image, A.out, out_elements);
    }
    return cuda_error("location_kernel");
  }
  if (L == Mode::kGradWeight) {
    const int64_t tiles_per_sample = ceil_div(p.Ho * p.Wo, kTile);
    const int64_t tiles = p.N * tiles_per_sample;
    const int64_t S = p.scope();
    F* partials = static_cast<F*>(
        scratch_zeros(scratch, size_t(std::max<int64_t>(tiles, 1) * S * p.C) * sizeof(F), stream));
    if (!partials) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "dk_jax: scratch");
    // Each thread keeps its channel's S sums in shared memory: fewer threads for large scopes.
    const size_t avail = 48 * 1024 - table_bytes;
    const int wthreads = int(std::min<size_t>(threads, avail / (size_t(S) * sizeof(F)) / 32 * 32));
    if (wthreads < 32) return invalid("scope too large for the CUDA weight gradient");
    const size_t shared = table_bytes + size_t(S) * wthreads * sizeof(F);
    if (tiles > 0) {
      dim3 grid(unsigned(tiles), unsigned(ceil_div(p.C, wthreads)));
      grad_weight_partial_kernel<M, kDeform, T><<<grid, wthreads, shared, stream>>>(
          p, A, zero_row, partials, tiles_per_sample, kernel_table);
    }
    const int64_t total = p.Nw * S * p.C;
    if (total > 0) {
      grad_weight_reduce_kernel<T><<<unsigned(ceil_div(total, 256)), 256, 0, stream>>>(
          p, partials, tiles_per_sample, A.out);
    }
    return cuda_error("grad_weight");
  }
  if (writes_cols(M)) {
    // Each thread keeps its channel's S sums in shared memory: fewer threads for large scopes.
    const int64_t S = p.scope();
    const size_t avail = 48 * 1024 - table_bytes;
    const int cthreads = int(std::min<size_t>(threads, avail / (size_t(S) * sizeof(F)) / 32 * 32));
    if (cthreads < 32) return invalid("scope too large for the CUDA columns kernel");
    const size_t shared = table_bytes + size_t(S) * cthreads * sizeof(F);
    if (locations > 0) {
      cols_kernel<M, kDeform, T><<<unsigned(locations), cthreads, shared, stream>>>(
          p, A, zero_row, kernel_table);
    }
    return cuda_error("cols_kernel");
  }
  if (M == Mode::kGradRotation || M == Mode::kColsGradRotation) {
    const int64_t total = locations * p.G * taps;
    if (total > 0) {
      grad_rotation_kernel<kDeform, is_cols(M), false, T><<<unsigned(ceil_div(total, 128)), 128, 0, stream>>>(
          p, A, zero_row);
    }
    return cuda_error("grad_rotation");
  }
  if (is_grad_cross(M)) {
    const int64_t total = locations * p.G * taps;
    if (total > 0) {
      grad_rotation_kernel<kDeform, is_cols(M), true, T><<<unsigned(ceil_div(total, 128)), 128, 0, stream>>>(
          p, A, zero_row);
    }
    return cuda_error("grad_cross_rotation");
  }
  if (M == Mode::kGradOffset || M == Mode::kColsGradOffset) {
    const int64_t total = locations * taps;
    if (total > 0) {
      grad_offset_kernel<is_cols(M), T><<<unsigned(ceil_div(total, 128)), 128, 0, stream>>>(p, A, zero_row);
    }
    return cuda_error("grad_offset");
  }
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dk_jax: unknown mode");
}

template <Mode M, bool kDeform>
ffi::Error dk_cuda_handler(cudaStream_t stream, ffi::ScratchAllocator scratch,
                           ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> out,
                           const Geometry& geometry) {
  DkCall call;
  if (auto err = read_dk_call(M, kDeform, args, *out, geometry, &call); err.failure()) return err;
  return dispatch_float(call.dtype, [&](auto tag) {
    using T = decltype(tag);
    return dk_launch<M, kDeform, T>(stream, scratch, call.p, call.typed<T>(), call.out_elements);
  });
}

// ------------------------------------------------------------------------------------------
// nd_linear_sample

// Forward / JVP: one thread per (point, channel); grad data: the same, scattering.
template <NdMode M, typename T>
__global__ void nd_point_channel_kernel(NdProblem p, const T* lhs, const T* coord,
                                        const T* tangent, T* out, acc_t<T>* grad_data) {
  using F = acc_t<T>;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.Nb * p.M * p.C) return;
  const int64_t c = e % p.C, point = e / p.C, nb = point / p.M;
  const NdFootprint f = nd_point_footprint(p, coord, point);
  const int64_t V = p.spatial();
  F acc = F(0);
  for (int k = 0; k < nd_corner_count(f); ++k) {
    const int64_t idx = nd_corner_index(f, k, p.shape);
    if (idx < 0) continue;
    if (M == NdMode::kGradData) {
      if (!nd_scatters(f)) break;
      atomicAdd(grad_data + (nb * V + idx) * p.C + c,
                nd_corner_weight(f, k, -1) * widen(lhs[point * p.C + c]));
      continue;
    }
    F w = F(0);
    if (M == NdMode::kForward) {
      w = nd_corner_weight(f, k, -1);
    } else {
      for (int d = 0; d < p.dims; ++d) {
        w += nd_corner_weight(f, k, d) * widen(tangent[point * p.dims + d]);
      }
    }
    acc += w * widen(lhs[(nb * V + idx) * p.C + c]);
  }
  if (M != NdMode::kGradData) out[e] = narrow<T>(acc);
}

// Coordinate gradient: one thread per (point, dimension), summing over channels.
template <typename T>
__global__ void nd_grad_coord_kernel(NdProblem p, const T* cot, const T* data, const T* coord,
                                     T* out) {
  using F = acc_t<T>;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.Nb * p.M * p.dims) return;
  const int d = int(e % p.dims);
  const int64_t point = e / p.dims, nb = point / p.M;
  const NdFootprint f = nd_point_footprint(p, coord, point);
  const int64_t V = p.spatial();
  F s = F(0);
  for (int k = 0; k < nd_corner_count(f); ++k) {
    const int64_t idx = nd_corner_index(f, k, p.shape);
    if (idx < 0) continue;
    const F w = nd_corner_weight(f, k, d);
    for (int64_t c = 0; c < p.C; ++c) {
      s += widen(cot[point * p.C + c]) * w * widen(data[(nb * V + idx) * p.C + c]);
    }
  }
  out[e] = narrow<T>(s);
}

template <NdMode M>
ffi::Error nd_cuda_handler(cudaStream_t stream, ffi::ScratchAllocator scratch,
                           ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> out) {
  const size_t expected = (M == NdMode::kForward || M == NdMode::kGradData) ? 2 : 3;
  if (args.size() != expected) return invalid("wrong number of operands");
  ffi::AnyBuffer b[3] = {*out, *out, *out};
  for (size_t k = 0; k < expected; ++k) {
    auto buf = args.get<ffi::AnyBuffer>(k);
    if (buf.has_error()) return buf.error();
    if (buf->element_type() != out->element_type()) return invalid("operands must share one dtype");
    b[k] = *buf;
  }
  NdProblem p;
  const ffi::AnyBuffer& data_like =
      M == NdMode::kGradData ? *out : (M == NdMode::kGradCoord ? b[1] : b[0]);
  const ffi::AnyBuffer& coord = M == NdMode::kGradCoord ? b[2] : b[1];
  if (auto err = read_nd_problem(data_like, coord, &p); err.failure()) return err;
  return dispatch_float(out->element_type(), [&](auto tag) -> ffi::Error {
    using T = decltype(tag);
    using F = acc_t<T>;
    auto ptr = [](const ffi::AnyBuffer& x) { return static_cast<const T*>(x.untyped_data()); };
    T* o = static_cast<T*>(out->untyped_data());
    const int64_t n_out = int64_t(out->element_count());
    if (M == NdMode::kGradCoord) {
      if (n_out > 0) {
        nd_grad_coord_kernel<T><<<unsigned(ceil_div(n_out, 128)), 128, 0, stream>>>(
            p, ptr(b[0]), ptr(b[1]), ptr(b[2]), o);
      }
      return cuda_error("nd_grad_coord");
    }
    F* grad_data = nullptr;
    if (M == NdMode::kGradData) {
      grad_data = std::is_same<T, F>::value
                      ? reinterpret_cast<F*>(o)
                      : static_cast<F*>(scratch_zeros(scratch, n_out * sizeof(F), stream));
      if (!grad_data) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "dk_jax: scratch");
      cudaMemsetAsync(grad_data, 0, n_out * sizeof(F), stream);
    }
    const int64_t work = p.Nb * p.M * p.C;
    if (work > 0) {
      nd_point_channel_kernel<M, T><<<unsigned(ceil_div(work, 128)), 128, 0, stream>>>(
          p, ptr(b[0]), ptr(b[1]), expected == 3 ? ptr(b[2]) : nullptr, o, grad_data);
    }
    if (M == NdMode::kGradData && !std::is_same<T, F>::value && n_out > 0) {
      store_kernel<T><<<unsigned(ceil_div(n_out, 256)), 256, 0, stream>>>(grad_data, o, n_out);
    }
    return cuda_error("nd_linear_sample");
  });
}

}  // namespace
}  // namespace dk

namespace ffi = xla::ffi;

DK_TARGETS(DK_DECLARE_CUDA)

#define DK_CUDA_HANDLER_dk(name, mode, deform)                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name##_cuda, (dk::dk_cuda_handler<dk::Mode::mode, deform>), \
                                ffi::Ffi::Bind()                                      \
                                    .Ctx<ffi::PlatformStream<cudaStream_t>>()         \
                                    .Ctx<ffi::ScratchAllocator>()                     \
                                    .RemainingArgs()                                  \
                                    .Ret<ffi::AnyBuffer>()                            \
                                    .Attrs<dk::Geometry>());
#define DK_CUDA_HANDLER_nd(name, mode, deform)                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name##_cuda, (dk::nd_cuda_handler<dk::NdMode::mode>), \
                                ffi::Ffi::Bind()                                      \
                                    .Ctx<ffi::PlatformStream<cudaStream_t>>()         \
                                    .Ctx<ffi::ScratchAllocator>()                     \
                                    .RemainingArgs()                                  \
                                    .Ret<ffi::AnyBuffer>());
#define DK_CUDA_HANDLER(name, family, mode, deform) DK_CUDA_HANDLER_##family(name, mode, deform)
DK_TARGETS(DK_CUDA_HANDLER)
