// Runs the v2 CUDA kernels (xla_ffi/dk_cuda_v2.cuh) on the CPU, one std::thread per CUDA thread
// with real barriers (scripts/cuda_host_shim), against a direct loop over dk_math.h's
// footprints (forward, gather image gradient, DK+DCN scatter image gradient): checks their indexing, tables, vector/scalar channel paths, rotation groups,
// grid striding and 32/64-bit offsets without a GPU. Shared memory and outputs are poisoned
// (NaN) before each launch, so an unwritten output or an unstaged read shows. Built and run by
// tests/test_cuda_host.py:
//   g++ -std=c++20 -O1 -pthread -Iscripts/cuda_host_shim -Ixla_ffi -I<jax ffi include> \
//       scripts/cuda_v2_host_check.cc -o /tmp/v2check && /tmp/v2check
// Prints one line per case and exits non-zero on a mismatch.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "dk_cuda_v2.cuh"

namespace dk {
namespace v2 {
float4 v2_smem[kMaxShared / sizeof(float4)];
}  // namespace v2
}  // namespace dk

using namespace dk;
using namespace dk::v2;

template <class F>
void launch(dim3 grid, unsigned threads, F body) {
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::memset(v2::v2_smem, 0xff, sizeof(v2::v2_smem));
      std::barrier<> block(threads);
      std::vector<std::unique_ptr<std::barrier<>>> warps;
      for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(bx, by);
          block_barrier = &block;
          warp_barrier = warps[t / 32].get();
          body();
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}

struct Case {
  int64_t N, H, W, C, K, S, stride, pad, dil, G;
  bool per_sample;
  float spread;
};

template <typename T>
std::vector<T> random(std::mt19937& rng, size_t n, float scale) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<T> v(n);
  for (auto& e : v) e = narrow<T>(d(rng));
  return v;
}

// y[n,i,j,c] = sum_taps blend(image) * blend(kernel), straight from the footprints.
template <bool kDeform, typename T>
std::vector<float> reference_forward(const Problem& p, const Operands<T>& A) {
  constexpr int NI = kDeform ? 4 : 1;
  const int64_t S = p.scope(), taps = p.taps();
  std::vector<float> y(p.N * p.Ho * p.Wo * p.C);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t i = 0; i < p.Ho; ++i)
      for (int64_t j = 0; j < p.Wo; ++j) {
        const int64_t loc = (n * p.Ho + i) * p.Wo + j;
        for (int64_t c = 0; c < p.C; ++c) {
          float acc = 0.f;
          for (int64_t t = 0; t < taps; ++t) {
            const auto img = image_footprint<kDeform>(
                p, kDeform ? A.offset + loc * taps * 2 : nullptr, i, j, t / p.Kw, t % p.Kw);
            const auto kf =
                kernel_footprint(p, A.rotation + loc * p.G * taps * 2, t / p.Kw, t % p.Kw, c % p.G);
            float xb = 0.f, kb = 0.f;
            for (int k = 0; k < NI; ++k) {
              if (img.index[k] >= 0) xb += img.w[k] * widen(A.x[(n * p.H * p.W + img.index[k]) * p.C + c]);
            }
            const int64_t nw = p.Nw == 1 ? 0 : n;
            for (int k = 0; k < 4; ++k) {
              if (kf.index[k] >= 0) kb += kf.w[k] * widen(A.weight[(nw * S + kf.index[k]) * p.C + c]);
            }
            acc += xb * kb;
          }
          y[loc * p.C + c] = acc;
        }
      }
  return y;
}

// gx = scatter of gy * kernel blend to each rigid tap's pixel.
template <typename T>
std::vector<float> reference_grad_image(const Problem& p, const Operands<T>& A) {
  const int64_t S = p.scope(), taps = p.taps();
  std::vector<float> gx(p.N * p.H * p.W * p.C, 0.f);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t i = 0; i < p.Ho; ++i)
      for (int64_t j = 0; j < p.Wo; ++j) {
        const int64_t loc = (n * p.Ho + i) * p.Wo + j;
        for (int64_t t = 0; t < taps; ++t) {
          const auto img = image_footprint<false>(p, A.offset, i, j, t / p.Kw, t % p.Kw);
          if (img.index[0] < 0) continue;
          for (int64_t c = 0; c < p.C; ++c) {
            const auto kf =
                kernel_footprint(p, A.rotation + loc * p.G * taps * 2, t / p.Kw, t % p.Kw, c % p.G);
            float kb = 0.f;
            const int64_t nw = p.Nw == 1 ? 0 : n;
            for (int k = 0; k < 4; ++k) {
              if (kf.index[k] >= 0) kb += kf.w[k] * widen(A.weight[(nw * S + kf.index[k]) * p.C + c]);
            }
            gx[(n * p.H * p.W + img.index[0]) * p.C + c] += widen(A.cot[loc * p.C + c]) * kb;
          }
        }
      }
  return gx;
}

// gx = scatter of w_k * gy * kernel blend to the four bilinear corners of each deformable tap.
template <typename T>
std::vector<float> reference_deform_grad_image(const Problem& p, const Operands<T>& A) {
  const int64_t S = p.scope(), taps = p.taps();
  std::vector<float> gx(p.N * p.H * p.W * p.C, 0.f);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t i = 0; i < p.Ho; ++i)
      for (int64_t j = 0; j < p.Wo; ++j) {
        const int64_t loc = (n * p.Ho + i) * p.Wo + j;
        for (int64_t t = 0; t < taps; ++t) {
          const auto img =
              image_footprint<true>(p, A.offset + loc * taps * 2, i, j, t / p.Kw, t % p.Kw);
          for (int64_t c = 0; c < p.C; ++c) {
            const auto kf =
                kernel_footprint(p, A.rotation + loc * p.G * taps * 2, t / p.Kw, t % p.Kw, c % p.G);
            float kb = 0.f;
            const int64_t nw = p.Nw == 1 ? 0 : n;
            for (int k = 0; k < 4; ++k) {
              if (kf.index[k] >= 0) kb += kf.w[k] * widen(A.weight[(nw * S + kf.index[k]) * p.C + c]);
            }
            const float d = widen(A.cot[loc * p.C + c]) * kb;
            for (int k = 0; k < 4; ++k) {
              if (img.index[k] >= 0) gx[(n * p.H * p.W + img.index[k]) * p.C + c] += img.w[k] * d;
            }
          }
        }
      }
  return gx;
}

template <typename T>
double rel_err(const std::vector<T>& got, const std::vector<float>& want) {
  double err = 0.0, scale = 1e-30;
  for (size_t e = 0; e < want.size(); ++e) {
    const double g = widen(got[e]);
    if (!(std::abs(g - want[e]) <= err)) err = std::isnan(g) ? INFINITY : std::abs(g - want[e]);
    scale = std::max(scale, double(std::abs(want[e])));
  }
  return err / scale;
}

int failures = 0;

template <typename T, int V, typename Idx>
void check(const Case& k, const char* tname) {
  std::mt19937 rng(unsigned(k.C * 131 + k.G * 7 + V + sizeof(Idx)));
  Problem p;
  p.N = k.N, p.H = k.H, p.W = k.W, p.C = k.C;
  p.Kh = p.Kw = k.K, p.Sh = p.Sw = k.S;
  p.sh = p.sw = k.stride, p.ph = p.pw = k.pad, p.dh = p.dw = k.dil;
  p.Ho = (k.H + 2 * k.pad - k.dil * (k.K - 1) - 1) / k.stride + 1;
  p.Wo = (k.W + 2 * k.pad - k.dil * (k.K - 1) - 1) / k.stride + 1;
  p.G = k.G, p.Nw = k.per_sample ? k.N : 1;
  const int64_t locs = p.N * p.Ho * p.Wo, taps = p.taps();
  auto x = random<T>(rng, p.N * p.H * p.W * p.C, 1.f);
  auto w = random<T>(rng, p.Nw * p.scope() * p.C, 1.f);
  auto rot = random<T>(rng, locs * p.G * taps * 2, k.spread);
  auto off = random<T>(rng, locs * taps * 2, k.spread);
  auto gy = random<T>(rng, locs * p.C, 1.f);
  const T nan = narrow<T>(NAN);
  const double tol = sizeof(T) == 4 ? 1e-5 : 1e-2;
  const Layout L = layout<Idx>(p, taps);
  if (L.total > kMaxShared) {
    std::printf("skip %s: %zu bytes of shared memory\n", tname, L.total);
    return;
  }
  const dim3 grid(3, unsigned(p.N));  // few blocks: every warp strides over several locations
  auto report = [&](const char* what, double err, double limit = -1.0) {
    const bool ok = err <= (limit > 0 ? limit : tol);
    failures += !ok;
    std::printf("%s %-14s %-5s V=%d idx%zu N=%ld H=%ld W=%ld C=%ld K=%ld S=%ld s=%ld G=%ld Nw=%ld: rel err %.2e\n",
                ok ? "ok  " : "FAIL", what, tname, V, 8 * sizeof(Idx), long(p.N), long(p.H),
                long(p.W), long(p.C), long(p.Kh), long(p.Sh), long(p.sh), long(p.G), long(p.Nw), err);
  };
  for (int deform = 0; deform < 2; ++deform) {
    std::vector<T> y(locs * p.C, nan);
    Operands<T> A;
    A.x = x.data(), A.weight = w.data(), A.rotation = rot.data(), A.out = y.data();
    A.offset = deform ? off.data() : nullptr;
    if (deform) {
      launch(grid, kWarps * 32, [&] { v2::forward_kernel<true, V, Idx, T>(p, A, L); });
      report("forward dcn", rel_err(y, reference_forward<true>(p, A)));
    } else {
      launch(grid, kWarps * 32, [&] { v2::forward_kernel<false, V, Idx, T>(p, A, L); });
      report("forward", rel_err(y, reference_forward<false>(p, A)));
    }
  }
  std::vector<T> gx(p.N * p.H * p.W * p.C, nan);
  Operands<T> B;
  B.cot = gy.data(), B.weight = w.data(), B.rotation = rot.data(), B.out = gx.data();
  launch(grid, kWarps * 32, [&] { v2::grad_image_gather_kernel<V, Idx, T>(p, B, L); });
  report("grad image", rel_err(gx, reference_grad_image(p, B)));
  // The scatter accumulates in float32 whatever T is: float32 tolerance.
  std::vector<float> gxd(p.N * p.H * p.W * p.C, 0.f);
  Operands<T> D;
  D.cot = gy.data(), D.offset = off.data(), D.weight = w.data(), D.rotation = rot.data();
  launch(grid, kWarps * 32, [&] { v2::grad_image_scatter_kernel<V, Idx, T>(p, D, L, gxd.data()); });
  report("grad image dcn", rel_err(gxd, reference_deform_grad_image(p, D)), 1e-5);
}

int main() {
  const Case cases[] = {
      // N, H, W, C, K, S, stride, pad, dil, G, per-sample weight, spread
      {2, 9, 8, 36, 3, 4, 1, 1, 1, 4, false, 1.5f},
      {2, 9, 8, 36, 3, 5, 2, 1, 1, 4, true, 3.0f},
      {1, 7, 6, 32, 3, 4, 1, 1, 1, 1, false, 1.5f},
      {2, 8, 9, 32, 3, 4, 2, 2, 2, 2, false, 2.0f},
      {1, 6, 7, 16, 5, 6, 1, 2, 1, 1, true, 4.0f},
      {2, 5, 6, 13, 3, 4, 1, 1, 1, 1, false, 1.5f},
      {1, 6, 5, 24, 1, 3, 1, 0, 1, 3, false, 1.0f},
  };
  for (const Case& k : cases) {
    check<float, 1, int32_t>(k, "f32");
    check<float, 1, int64_t>(k, "f32");
    check<bf16, 1, int32_t>(k, "bf16");
    if (k.C % 4 == 0) {
      check<float, 4, int32_t>(k, "f32");
      check<float, 4, int64_t>(k, "f32");
    }
    if (k.C % 8 == 0) {
      check<bf16, 8, int32_t>(k, "bf16");
      check<f16, 8, int64_t>(k, "f16");
    }
  }
  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
