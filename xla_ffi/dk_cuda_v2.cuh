// Second-generation CUDA kernels (opt-in: DK_JAX_CUDA_KERNELS=v2, read on every call) for the
// depthwise forward (local and deformable) and the image gradients. The numbers still come
// from dk_math.h; what changes is who computes what, so that the per-channel loop is a few loads
// and multiply-adds:
//  - a warp owns one location (forward) or one input pixel (image gradient), its lanes own
//    channels, V consecutive channels per lane loaded as one 16-byte vector when C allows it;
//  - per (location, tap) the lanes first compute, once, the image offset (element offset within
//    the sample, or -1 outside) and per rotation group the four scope-corner offsets and
//    weights, into a per-warp table in shared memory; every lane then reads them by broadcast;
//  - the scope kernel of the block's sample is staged once per block in shared memory as
//    float32 with one extra zero row, where outside scope corners point: no branch per corner;
//  - offsets are 32-bit unless the image or the output reaches the 32-bit limit (a 64-bit
//    instantiation of the same kernels; the limit can be lowered with
//    DK_JAX_CUDA_INDEX32_LIMIT so that tests exercise that path on small shapes);
//  - the local image gradient is a gather: input pixel (h, w) sums, for every tap, the one
//    output location whose tap reads it (if any). No atomics, no memset, no float32 scratch:
//    deterministic, and bf16/f16 results are written directly;
//  - the DK+DCN image gradient stays a float32 scatter (as in v1) in the same structure, with
//    16-byte vector atomics on sm_90.
// Problems these kernels do not cover (a scope kernel too large for shared memory, N beyond a
// grid dimension) return false and the caller runs the v1 kernels.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "dk_common.h"
#include "dk_math.h"

namespace dk {
namespace v2 {

constexpr int kWarps = 8;  // locations (or pixels) in flight per block
constexpr size_t kMaxShared = 48 * 1024;

// Which kernels the handlers run, read at call time so one process can time both.
inline bool requested() {
  const char* s = std::getenv("DK_JAX_CUDA_KERNELS");
  return s != nullptr && std::strcmp(s, "v2") == 0;
}

// Element counts from which the 64-bit instantiation is used (2^31 unless lowered for tests).
inline int64_t index32_limit() {
  const char* s = std::getenv("DK_JAX_CUDA_INDEX32_LIMIT");
  if (s != nullptr && *s != '\0') {
    const long long v = std::atoll(s);
    if (v > 0 && v < (int64_t(1) << 31)) return v;
  }
  return int64_t(1) << 31;
}

// Image taps: element offsets (pixel * C) within the sample, -1 for an outside corner (the
// load is then skipped: an outside corner must read an exact zero even where x holds inf).
// 16-byte aligned so that a lane reads an entry with 16-byte shared loads.
template <typename Idx>
struct alignas(16) ImageEntry {
  Idx off[4];
  float w[4];
};

// Scope taps: float offsets (scope index * C) into the staged kernel, S * C (the zero row) for
// an outside corner.
struct alignas(16) ScopeEntry {
  int32_t off[4];
  float w[4];
};

// Output index of image position h along one axis for tap a, or -1 when no output's tap a
// reads h. Defined by the forward's image_position, so the gather visits exactly the taps the
// forward reads.
DK_HD int64_t output_position(int64_t h, int64_t a, int64_t stride, int64_t pad, int64_t dil,
                              int64_t out_size) {
  const int64_t num = h + pad - a * dil;
  if (num < 0) return -1;
  const int64_t i = num / stride;
  return (i < out_size && image_position(i, a, stride, pad, dil) == h) ? i : -1;
}

// V channels of one row as floats: one 16-byte load when V > 1 (V * sizeof(T) == 16).
template <int V, typename T>
__device__ __forceinline__ void load_row(const T* src, float (&dst)[V]) {
  if constexpr (V == 1) {
    dst[0] = widen(src[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "vector rows are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
    const uint32_t word[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (std::is_same<T, float>::value) {
      for (int v = 0; v < 4; ++v) dst[v] = __uint_as_float(word[v]);
    } else {
      for (int v = 0; v < V; ++v) {
        dst[v] = widen(T{uint16_t(word[v / 2] >> (16 * (v % 2)))});
      }
    }
  }
}

template <int V, typename T>
__device__ __forceinline__ void store_row(T* dst, const float (&src)[V]) {
  if constexpr (V == 1) {
    dst[0] = narrow<T>(src[0]);
  } else {
    uint32_t word[4];
    if constexpr (std::is_same<T, float>::value) {
      for (int v = 0; v < 4; ++v) word[v] = __float_as_uint(src[v]);
    } else {
      for (int v = 0; v < 4; ++v) {
        word[v] = uint32_t(narrow<T>(src[2 * v]).bits) |
                  (uint32_t(narrow<T>(src[2 * v + 1]).bits) << 16);
      }
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(word[0], word[1], word[2], word[3]);
  }
}

// V consecutive floats of the staged kernel (16-byte aligned when V > 1).
template <int V>
__device__ __forceinline__ void load_staged(const float* src, float (&dst)[V]) {
  if constexpr (V == 1) {
    dst[0] = src[0];
  } else {
    for (int q = 0; q < V / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(src)[q];
      dst[4 * q] = f.x, dst[4 * q + 1] = f.y, dst[4 * q + 2] = f.z, dst[4 * q + 3] = f.w;
    }
  }
}

// Shared memory of one block: the staged kernel ((S + 1) * C floats, padded to 16 bytes), then
// per warp `image` image entries and taps * G scope entries.
struct Layout {
  size_t kernel_bytes, image_bytes, scope_bytes, total;
};

template <typename Idx>
inline Layout layout(const Problem& p, int64_t image_entries) {
  Layout L;
  L.kernel_bytes = (size_t((p.scope() + 1) * p.C) * sizeof(float) + 15) / 16 * 16;
  L.image_bytes = (size_t(image_entries) * sizeof(ImageEntry<Idx>) + 15) / 16 * 16;
  L.scope_bytes = size_t(p.taps() * p.G) * sizeof(ScopeEntry);
  L.total = L.kernel_bytes + kWarps * (L.image_bytes + L.scope_bytes);
  return L;
}

// Stages the scope kernel of sample n (or the shared one) as float32, plus the zero row.
template <typename T>
__device__ __forceinline__ void stage_kernel(const Problem& p, const T* weight, int n,
                                             float* staged) {
  const int SC = int(p.scope() * p.C);
  const T* w = weight + (p.Nw == 1 ? 0 : int64_t(n) * SC);
  for (int e = threadIdx.x; e < SC; e += blockDim.x) staged[e] = widen(w[e]);
  for (int e = threadIdx.x; e < int(p.C); e += blockDim.x) staged[SC + e] = 0.f;
}

// The scope entry of tap (a, b), group g at a location whose rotations start at `rot`.
template <typename T>
__device__ __forceinline__ ScopeEntry scope_entry(const Problem& p, const T* rot, int64_t a,
                                                  int64_t b, int64_t g) {
  const auto f = kernel_footprint(p, rot, a, b, g);
  const int32_t zero = int32_t(p.scope() * p.C);
  ScopeEntry s;
  for (int k = 0; k < 4; ++k) {
    s.off[k] = f.index[k] >= 0 ? int32_t(f.index[k] * p.C) : zero;
    s.w[k] = f.w[k];
  }
  return s;
}

// Kernel blend of tap `tap` for V channels starting at c: channel c + v uses the entry of its
// rotation group (c + v) % G (group_base[v] = that group * taps).
template <int V>
__device__ __forceinline__ void kernel_blend(const ScopeEntry* scope, const float* staged, int G,
                                             int tap, int c, const int (&group_base)[V],
                                             float (&kb)[V]) {
  if (G == 1) {
    const ScopeEntry s = scope[tap];
    float wv[4][V];
    for (int k = 0; k < 4; ++k) load_staged<V>(staged + s.off[k] + c, wv[k]);
    for (int v = 0; v < V; ++v) {
      kb[v] = blend_values<4, float>(s.w, [&](int k) { return wv[k][v]; });
    }
  } else {
    for (int v = 0; v < V; ++v) {
      const ScopeEntry& s = scope[group_base[v] + tap];
      kb[v] = blend_values<4, float>(s.w, [&](int k) { return staged[s.off[k] + c + v]; });
    }
  }
}

template <int V>
__device__ __forceinline__ void group_bases(int c, int G, int taps, int (&group_base)[V]) {
  for (int v = 0; v < V; ++v) group_base[v] = ((c + v) % G) * taps;
}

// Sum over the location's (or pixel's) taps of V channels starting at c. `tap_value(tap, xv)`
// fills xv[NI][V] and the image weights, or returns false when the tap reads nothing.
template <int NI, int V, typename TapValue>
__device__ __forceinline__ void accumulate(const ScopeEntry* scope, const float* staged, int taps,
                                           int G, int c, const TapValue& tap_value,
                                           float (&acc)[V]) {
  for (int v = 0; v < V; ++v) acc[v] = 0.f;
  int group_base[V];
  group_bases(c, G, taps, group_base);
  for (int tap = 0; tap < taps; ++tap) {
    float xv[NI][V];
    float iw[NI];
    if (!tap_value(tap, xv, iw)) continue;
    float kb[V];
    kernel_blend<V>(scope, staged, G, tap, c, group_base, kb);
    for (int v = 0; v < V; ++v) {
      const float ib = blend_values<NI, float>(iw, [&](int k) { return xv[k][v]; });
      acc[v] += tap_product(ib, kb[v]);
    }
  }
}

// The entries of one location (image taps, then taps * G scope taps), filled by a warp's lanes.
template <bool kDeform, typename Idx, typename T>
__device__ __forceinline__ void fill_location(const Problem& p, const Operands<T>& A, int n, int l,
                                              int lane, ImageEntry<Idx>* image,
                                              ScopeEntry* scope) {
  constexpr int NI = kDeform ? 4 : 1;
  const int taps = int(p.taps()), G = int(p.G), C = int(p.C), Kw = int(p.Kw);
  const int Wo = int(p.Wo), HoWo = int(p.Ho * p.Wo);
  const int i = l / Wo, j = l - i * Wo;
  const int64_t loc = int64_t(n) * HoWo + l;
  const T* rot = A.rotation + loc * p.G * p.taps() * 2;
  const T* off = kDeform ? A.offset + loc * p.taps() * 2 : nullptr;
  for (int e = lane; e < taps * (1 + G); e += 32) {
    if (e < taps) {
      const auto f = image_footprint<kDeform>(p, off, i, j, e / Kw, e % Kw);
      for (int k = 0; k < NI; ++k) {
        image[e].off[k] = f.index[k] >= 0 ? Idx(f.index[k]) * Idx(C) : Idx(-1);
        image[e].w[k] = f.w[k];
      }
    } else {
      const int k = e - taps, g = k / taps, tap = k - g * taps;
      scope[k] = scope_entry(p, rot, tap / Kw, tap % Kw, g);
    }
  }
}

// Forward: grid (blocks per sample, N), kWarps warps per block, a warp per location.
template <bool kDeform, int V, typename Idx, typename T>
__global__ void __launch_bounds__(kWarps * 32)
    forward_kernel(Problem p, Operands<T> A, Layout L) {
  extern __shared__ float4 v2_smem[];
  constexpr int NI = kDeform ? 4 : 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.y;
  const int taps = int(p.taps()), G = int(p.G), C = int(p.C);
  const int HoWo = int(p.Ho * p.Wo);
  unsigned char* base = reinterpret_cast<unsigned char*>(v2_smem);
  float* staged = reinterpret_cast<float*>(base);
  unsigned char* mine = base + L.kernel_bytes + warp * (L.image_bytes + L.scope_bytes);
  ImageEntry<Idx>* image = reinterpret_cast<ImageEntry<Idx>*>(mine);
  ScopeEntry* scope = reinterpret_cast<ScopeEntry*>(mine + L.image_bytes);
  stage_kernel(p, A.weight, n, staged);
  __syncthreads();
  const T* x_n = A.x + int64_t(n) * p.H * p.W * p.C;
  T* out_n = A.out + int64_t(n) * HoWo * p.C;
  for (int l = blockIdx.x * kWarps + warp; l < HoWo; l += gridDim.x * kWarps) {
    fill_location<kDeform>(p, A, n, l, lane, image, scope);
    __syncwarp();
    for (int c = lane * V; c < C; c += 32 * V) {
      float acc[V];
      accumulate<NI, V>(scope, staged, taps, G, c,
                        [&](int tap, float (&xv)[NI][V], float (&iw)[NI]) {
                          const ImageEntry<Idx>& im = image[tap];
                          for (int k = 0; k < NI; ++k) {
                            iw[k] = im.w[k];
                            if (im.off[k] >= 0) {
                              load_row<V>(x_n + im.off[k] + c, xv[k]);
                            } else {
                              for (int v = 0; v < V; ++v) xv[k][v] = 0.f;
                            }
                          }
                          return true;
                        },
                        acc);
      store_row<V>(out_n + Idx(l) * Idx(C) + c, acc);
    }
    __syncwarp();
  }
}

// Local image gradient as a gather: grid (blocks per sample, N), a warp per input pixel.
// gx[n, h, w, c] = sum over taps (a, b) whose output (i, j) reads (h, w) of
//   gy[n, i, j, c] * kernel blend of tap (a, b) at (i, j), channel c.
template <int V, typename Idx, typename T>
__global__ void __launch_bounds__(kWarps * 32)
    grad_image_gather_kernel(Problem p, Operands<T> A, Layout L) {
  extern __shared__ float4 v2_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.y;
  const int taps = int(p.taps()), G = int(p.G), C = int(p.C), Kw = int(p.Kw);
  const int Wd = int(p.W), HW = int(p.H * p.W);
  unsigned char* base = reinterpret_cast<unsigned char*>(v2_smem);
  float* staged = reinterpret_cast<float*>(base);
  unsigned char* mine = base + L.kernel_bytes + warp * (L.image_bytes + L.scope_bytes);
  ImageEntry<Idx>* image = reinterpret_cast<ImageEntry<Idx>*>(mine);  // off[0]: gy offset
  ScopeEntry* scope = reinterpret_cast<ScopeEntry*>(mine + L.image_bytes);
  stage_kernel(p, A.weight, n, staged);
  __syncthreads();
  const T* gy_n = A.cot + int64_t(n) * p.Ho * p.Wo * p.C;
  T* gx_n = A.out + int64_t(n) * HW * p.C;
  for (int q = blockIdx.x * kWarps + warp; q < HW; q += gridDim.x * kWarps) {
    const int h = q / Wd, w = q - h * Wd;
    for (int e = lane; e < taps * (1 + G); e += 32) {
      const int tap = e < taps ? e : (e - taps) % taps;
      const int64_t a = tap / Kw, b = tap % Kw;
      const int64_t i = output_position(h, a, p.sh, p.ph, p.dh, p.Ho);
      const int64_t j = output_position(w, b, p.sw, p.pw, p.dw, p.Wo);
      const bool reads = i >= 0 && j >= 0;
      const int64_t o = i * p.Wo + j;
      if (e < taps) {
        image[e].off[0] = reads ? Idx(o) * Idx(C) : Idx(-1);
      } else if (reads) {
        const T* rot = A.rotation + (int64_t(n) * p.Ho * p.Wo + o) * p.G * p.taps() * 2;
        scope[e - taps] = scope_entry(p, rot, a, b, (e - taps) / taps);
      }
    }
    __syncwarp();
    for (int c = lane * V; c < C; c += 32 * V) {
      float acc[V];
      // dy/d(image tap) = kernel: the image "blend" of a rigid tap is gy with weight one.
      accumulate<1, V>(scope, staged, taps, G, c,
                       [&](int tap, float (&gv)[1][V], float (&iw)[1]) {
                         const ImageEntry<Idx>& im = image[tap];
                         if (im.off[0] < 0) return false;
                         iw[0] = 1.f;
                         load_row<V>(gy_n + im.off[0] + c, gv[0]);
                         return true;
                       },
                       acc);
      store_row<V>(gx_n + Idx(q) * Idx(C) + c, acc);
    }
    __syncwarp();
  }
}

// Adds w * d[0..V) to V consecutive floats with atomics: 16-byte vector atomics where the
// architecture has them (sm_90), one per channel otherwise.
template <int V>
__device__ __forceinline__ void scatter_add(float* dst, float w, const float (&d)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (V % 4 == 0) {
    for (int q = 0; q < V / 4; ++q) {
      atomicAdd(reinterpret_cast<float4*>(dst) + q,
                make_float4(w * d[4 * q], w * d[4 * q + 1], w * d[4 * q + 2], w * d[4 * q + 3]));
    }
    return;
  }
#endif
  for (int v = 0; v < V; ++v) atomicAdd(dst + v, w * d[v]);
}

// DK+DCN image gradient: bilinear image taps have no fixed inverse, so this stays a scatter
// into float32 (gx), but with the forward's structure (a warp per location, entries computed
// once, staged kernel) and vector atomics. Not deterministic, as in v1.
//   gx[n, corner k of tap t, c] += w_k * gy[n, i, j, c] * kernel blend of tap t, channel c.
template <int V, typename Idx, typename T>
__global__ void __launch_bounds__(kWarps * 32)
    grad_image_scatter_kernel(Problem p, Operands<T> A, Layout L, float* gx) {
  extern __shared__ float4 v2_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.y;
  const int taps = int(p.taps()), G = int(p.G), C = int(p.C);
  const int HoWo = int(p.Ho * p.Wo);
  unsigned char* base = reinterpret_cast<unsigned char*>(v2_smem);
  float* staged = reinterpret_cast<float*>(base);
  unsigned char* mine = base + L.kernel_bytes + warp * (L.image_bytes + L.scope_bytes);
  ImageEntry<Idx>* image = reinterpret_cast<ImageEntry<Idx>*>(mine);
  ScopeEntry* scope = reinterpret_cast<ScopeEntry*>(mine + L.image_bytes);
  stage_kernel(p, A.weight, n, staged);
  __syncthreads();
  const T* gy_n = A.cot + int64_t(n) * HoWo * p.C;
  float* gx_n = gx + int64_t(n) * p.H * p.W * p.C;
  for (int l = blockIdx.x * kWarps + warp; l < HoWo; l += gridDim.x * kWarps) {
    fill_location<true>(p, A, n, l, lane, image, scope);
    __syncwarp();
    for (int c = lane * V; c < C; c += 32 * V) {
      float gy[V];
      load_row<V>(gy_n + Idx(l) * Idx(C) + c, gy);
      int group_base[V];
      group_bases(c, G, taps, group_base);
      for (int tap = 0; tap < taps; ++tap) {
        float d[V];
        kernel_blend<V>(scope, staged, G, tap, c, group_base, d);
        for (int v = 0; v < V; ++v) d[v] = gy[v] * d[v];
        const ImageEntry<Idx>& im = image[tap];
        for (int k = 0; k < 4; ++k) {
          if (im.off[k] >= 0) scatter_add<V>(gx_n + im.off[k] + c, im.w[k], d);
        }
      }
    }
    __syncwarp();
  }
}

// The launches (nvcc only: scripts/cuda_v2_host_check.cc runs the kernels above on the CPU,
// one std::thread per CUDA thread, to check their indexing without a GPU).
#if defined(__CUDACC__)
// Blocks per sample: enough blocks to fill the device a few times over, each sweeping its
// sample's locations with a stride, so the kernel staging is amortised over many locations.
inline unsigned blocks_per_sample(int64_t items, int64_t N) {
  static int sms = [] {
    int dev = 0, count = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      count = 132;
    }
    return count;
  }();
  const int64_t want = std::max<int64_t>(1, (int64_t(sms) * 8 + N - 1) / N);
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(want, (items + kWarps - 1) / kWarps)));
}

template <bool kDeform, int V, typename Idx, typename T>
bool launch_forward_as(cudaStream_t stream, const Problem& p, const Operands<T>& A) {
  const Layout L = layout<Idx>(p, p.taps());
  if (L.total > kMaxShared) return false;
  dim3 grid(blocks_per_sample(p.Ho * p.Wo, p.N), unsigned(p.N));
  forward_kernel<kDeform, V, Idx, T><<<grid, kWarps * 32, L.total, stream>>>(p, A, L);
  return true;
}

template <int V, typename Idx, typename T>
bool launch_grad_image_as(cudaStream_t stream, const Problem& p, const Operands<T>& A) {
  const Layout L = layout<Idx>(p, p.taps());
  if (L.total > kMaxShared) return false;
  dim3 grid(blocks_per_sample(p.H * p.W, p.N), unsigned(p.N));
  grad_image_gather_kernel<V, Idx, T><<<grid, kWarps * 32, L.total, stream>>>(p, A, L);
  return true;
}

template <int V, typename Idx, typename T>
bool launch_scatter_as(cudaStream_t stream, const Problem& p, const Operands<T>& A, float* gx) {
  const Layout L = layout<Idx>(p, p.taps());
  if (L.total > kMaxShared) return false;
  dim3 grid(blocks_per_sample(p.Ho * p.Wo, p.N), unsigned(p.N));
  grad_image_scatter_kernel<V, Idx, T><<<grid, kWarps * 32, L.total, stream>>>(p, A, L, gx);
  return true;
}

// The DK+DCN image gradient into gx (float32, zeroed by the caller); false: run v1.
template <typename T>
bool try_launch_deform_grad_image(cudaStream_t stream, const Problem& p, const Operands<T>& A,
                                  float* gx) {
  if (p.N <= 0 || p.N > 65535 || p.C <= 0) return false;
  if (p.H * p.W >= (int64_t(1) << 31) || p.Ho * p.Wo >= (int64_t(1) << 31)) return false;
  constexpr int kVec = 16 / int(sizeof(T));
  auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const bool vector = p.C % kVec == 0 && aligned(A.cot) && aligned(gx);
  const int64_t limit = index32_limit();
  if (p.N * p.H * p.W * p.C >= limit || p.N * p.Ho * p.Wo * p.C >= limit) {
    return vector ? launch_scatter_as<kVec, int64_t>(stream, p, A, gx)
                  : launch_scatter_as<1, int64_t>(stream, p, A, gx);
  }
  return vector ? launch_scatter_as<kVec, int32_t>(stream, p, A, gx)
                : launch_scatter_as<1, int32_t>(stream, p, A, gx);
}

// Runs the v2 kernel for mode M if there is one for this problem; false: run v1.
template <Mode M, bool kDeform, typename T>
bool try_launch(cudaStream_t stream, const Problem& p, const Operands<T>& A) {
  constexpr bool kForward = M == Mode::kForward;
  constexpr bool kGather = M == Mode::kGradImage && !kDeform;
  if constexpr (!kForward && !kGather) {
    return false;
  } else {
    if (p.N <= 0 || p.N > 65535 || p.C <= 0) return false;
    if (p.H * p.W >= (int64_t(1) << 31) || p.Ho * p.Wo >= (int64_t(1) << 31)) return false;
    constexpr int kVec = 16 / int(sizeof(T));
    // 16-byte rows need C a multiple of the vector and 16-byte aligned buffers.
    auto aligned = [](const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % 16 == 0; };
    const bool vector = p.C % kVec == 0 && aligned(A.x) && aligned(A.cot) && aligned(A.out);
    const int64_t limit = index32_limit();
    const bool wide = p.N * p.H * p.W * p.C >= limit || p.N * p.Ho * p.Wo * p.C >= limit;
    if constexpr (kForward) {
      if (wide) {
        return vector ? launch_forward_as<kDeform, kVec, int64_t>(stream, p, A)
                      : launch_forward_as<kDeform, 1, int64_t>(stream, p, A);
      }
      return vector ? launch_forward_as<kDeform, kVec, int32_t>(stream, p, A)
                    : launch_forward_as<kDeform, 1, int32_t>(stream, p, A);
    } else {
      if (wide) {
        return vector ? launch_grad_image_as<kVec, int64_t>(stream, p, A)
                      : launch_grad_image_as<1, int64_t>(stream, p, A);
      }
      return vector ? launch_grad_image_as<kVec, int32_t>(stream, p, A)
                    : launch_grad_image_as<1, int32_t>(stream, p, A);
    }
  }
}

#endif  // __CUDACC__

}  // namespace v2
}  // namespace dk
