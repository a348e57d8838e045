// CPU loops and XLA FFI handlers. The arithmetic comes from dk_math.h; this file only decides
// how the work is split: output rows (or samples, where outputs would collide) over the threads
// of XLA's intra-op pool, and channels innermost, contiguous in NHWC, so the compiler vectorises.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "dk_common.h"
#include "dk_math.h"
#include "dk_targets.h"

namespace dk {
namespace {

// ------------------------------------------------------------------------------------------
// Threads.

int64_t thread_budget(ffi::ThreadPool* pool) {
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

// ------------------------------------------------------------------------------------------
// Depthwise family: one output row (n, i) at a time.

// F is the accumulator type of the element type (acc_t<T>).
template <typename F>
struct RowScratch {
  std::vector<F> acc;   // C: per-location accumulators (forward, JVPs)
  std::vector<F> sink;  // C: write target of absent corners in the scattering modes
  // Sh*Sw*C accumulators: of the current row (kGradWeight) or location (columns).
  F* grad_weight = nullptr;
  F* grad_image = nullptr;   // H*W*C accumulators of sample n (kGradImage)
};

// One output row (n, i) of any depthwise or columns mode. The columns modes run the depthwise
// arithmetic with "weight" rows taken from the location's columns and a cotangent of one:
//   kCols            = kGradWeight per location        (columns accumulate image * beta_s)
//   kColsGradImage   = kGradImage, weight rows = gcols
//   kColsGradRotation/kColsGradOffset = kGradRotation/kGradOffset, weight rows = gcols
// and the two columns JVPs scatter the tangent of beta_s (rotation) or of the image (offset).
template <Mode M, bool kDeform, bool kUnitStride, typename T>
void dk_row(const Problem& p, const Operands<T>& A, const T* zero_row, int64_t n, int64_t i,
            RowScratch<acc_t<T>>& s) {
  using F = acc_t<T>;
  constexpr int NI = kDeform ? 4 : 1;  // corners of an image read
  constexpr bool kCols = is_cols(M);
  // The loop this mode runs; second-order modes run a first-order loop with other kernel
  // weights (kernel_order).
  constexpr Mode L = loop_of(M);
  constexpr bool kScatterKernel = L == Mode::kGradWeight || writes_cols(M);
  const int64_t C = p.C, G = kUnitStride ? 1 : p.G, taps = p.taps();
  const int64_t S = p.scope();
  const T* x_n = A.x ? A.x + n * p.H * p.W * C : nullptr;
  const T* w_n = A.weight ? A.weight + (p.Nw == 1 ? 0 : n) * S * C : nullptr;
  F* acc = s.acc.data();
  F* sink = s.sink.data();

  for (int64_t j = 0; j < p.Wo; ++j) {
    const int64_t loc = (n * p.Ho + i) * p.Wo + j;
    const T* rot = A.rotation + loc * G * taps * 2;
    const T* off = kDeform ? A.offset + loc * taps * 2 : nullptr;
    // Depthwise modes read the cotangent per channel; columns modes read it as kernel rows.
    const T* gy = takes_cot(M) && !kCols ? A.cot + loc * C : nullptr;
    if (kCols && takes_cot(M)) w_n = A.cot + loc * S * C;
    auto cot = [&](int64_t c) { return kCols ? F(1) : widen(gy[c]); };
    const T* tan = nullptr;
    if (takes_tangent(M)) tan = A.tangent + loc * tangent_stride(M, G, taps);
    if (L == Mode::kForward || M == Mode::kJvpRotation || M == Mode::kJvpOffset) {
      std::fill(acc, acc + C, F(0));
    }
    if (writes_cols(M)) std::fill(s.grad_weight, s.grad_weight + S * C, F(0));

    for (int64_t a = 0; a < p.Kh; ++a) {
      for (int64_t b = 0; b < p.Kw; ++b) {
        const int64_t tap = a * p.Kw + b;
        const auto img = image_footprint<kDeform>(p, off, i, j, a, b);
        const T* xr[4];
        F* gxr[4];
        for (int k = 0; k < NI; ++k) {
          const bool in = img.index[k] >= 0;
          xr[k] = (x_n && in) ? x_n + img.index[k] * C : zero_row;
          gxr[k] = ((L == Mode::kGradImage || L == Mode::kColsGradImage) && in)
                       ? s.grad_image + img.index[k] * C
                       : sink;
        }
        F off_t[2] = {F(0), F(0)};
        if (M == Mode::kJvpOffset || M == Mode::kColsJvpOffset) {
          off_t[0] = widen(tan[2 * tap]), off_t[1] = widen(tan[2 * tap + 1]);
        }
        F goff[2] = {F(0), F(0)};

        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = (g * taps + tap) * 2;
          auto kf = kernel_footprint(p, rot, a, b, g);
          use_order_weights<M>(kf, tan, r / 2);
          const T* wr[4];
          F* gwr[4];
          for (int k = 0; k < 4; ++k) {
            const bool in = kf.index[k] >= 0;
            wr[k] = (w_n && in) ? w_n + kf.index[k] * C : zero_row;
            gwr[k] = (kScatterKernel && in) ? s.grad_weight + kf.index[k] * C : sink;
          }
          const int64_t c0 = kUnitStride ? 0 : g;
          if (L == Mode::kForward) {
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              acc[c] += tap_product(blend<NI>(img.w, xr, c), blend<4>(kf.w, wr, c));
            }
          } else if (L == Mode::kGradImage || L == Mode::kColsGradImage) {
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F d = cot(c) * blend<4>(kf.w, wr, c);
              for (int k = 0; k < NI; ++k) gxr[k][c] += img.w[k] * d;
            }
          } else if (L == Mode::kGradWeight || L == Mode::kCols) {
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F d = cot(c) * blend<NI>(img.w, xr, c);
              for (int k = 0; k < 4; ++k) gwr[k][c] += kf.w[k] * d;
            }
          } else if (M == Mode::kColsJvpRotation) {
            F dw[4];
            for (int k = 0; k < 4; ++k) {
              dw[k] = position_tangent(kf.dwdu[k], kf.dwdv[k], widen(tan[r]), widen(tan[r + 1]));
            }
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F d = blend<NI>(img.w, xr, c);
              for (int k = 0; k < 4; ++k) gwr[k][c] += dw[k] * d;
            }
          } else if (M == Mode::kColsJvpOffset) {
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F d = position_tangent(blend<NI>(img.dwdu, xr, c),
                                               blend<NI>(img.dwdv, xr, c), off_t[0], off_t[1]);
              for (int k = 0; k < 4; ++k) gwr[k][c] += kf.w[k] * d;
            }
          } else if (M == Mode::kJvpRotation) {
            const F tu = widen(tan[r]), tv = widen(tan[r + 1]);
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F dk = position_tangent(blend<4>(kf.dwdu, wr, c),
                                                blend<4>(kf.dwdv, wr, c), tu, tv);
              acc[c] += tap_product(blend<NI>(img.w, xr, c), dk);
            }
          } else if (M == Mode::kGradRotation || M == Mode::kColsGradRotation) {
            F su = F(0), sv = F(0);
            for (int64_t c = c0; c < C; c += G) {
              const F d = cot(c) * blend<NI>(img.w, xr, c);
              su += d * blend<4>(kf.dwdu, wr, c);
              sv += d * blend<4>(kf.dwdv, wr, c);
            }
            T* o = A.out + loc * G * taps * 2 + r;
            o[0] = narrow<T>(su);
            o[1] = narrow<T>(sv);
          } else if (is_grad_cross(M)) {
            F sc = F(0);
            for (int64_t c = c0; c < C; c += G) {
              sc += cot(c) * blend<NI>(img.w, xr, c) * blend<4>(kf.duv, wr, c);
            }
            A.out[loc * G * taps + r / 2] = narrow<T>(sc);
          } else if (M == Mode::kJvpOffset) {
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F dx = position_tangent(blend<NI>(img.dwdu, xr, c),
                                                blend<NI>(img.dwdv, xr, c), off_t[0], off_t[1]);
              acc[c] += tap_product(dx, blend<4>(kf.w, wr, c));
            }
          } else if (M == Mode::kGradOffset || M == Mode::kColsGradOffset) {
            F su = F(0), sv = F(0);
            for (int64_t c = c0; c < C; c += G) {
              const F d = cot(c) * blend<4>(kf.w, wr, c);
              su += d * blend<NI>(img.dwdu, xr, c);
              sv += d * blend<NI>(img.dwdv, xr, c);
            }
            goff[0] += su;
            goff[1] += sv;
          }
        }
        if (M == Mode::kGradOffset || M == Mode::kColsGradOffset) {
          T* o = A.out + loc * taps * 2 + 2 * tap;
          o[0] = narrow<T>(goff[0]);
          o[1] = narrow<T>(goff[1]);
        }
      }
    }
    if (L == Mode::kForward || M == Mode::kJvpRotation || M == Mode::kJvpOffset) {
      T* o = A.out + loc * C;
      for (int64_t c = 0; c < C; ++c) o[c] = narrow<T>(acc[c]);
    }
    if (writes_cols(M)) {
      T* o = A.out + loc * S * C;
      for (int64_t e = 0; e < S * C; ++e) o[e] = narrow<T>(s.grad_weight[e]);
    }
  }
}

// Forward with one rotation group, the common case: the footprints of a location's taps are
// computed once into a small table, then channels are swept in blocks of kBlock whose
// accumulators stay in registers across all taps.
// Channel blocks of the one-group forward. The float path holds kVecs vectors of 16 channels
// (GCC/Clang vector extensions: zmm registers with AVX-512, pairs of ymm with AVX2) in
// registers across all taps; other types and the remainder go one channel at a time.
typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int kVecs, int NI, int NR>
inline void forward_block(const float* const* rows, const float* weights, int64_t taps,
                          int64_t c0, float* out) {
  f32x16 acc[kVecs] = {};
  for (int64_t tap = 0; tap < taps; ++tap) {
    const float* const* tr = rows + tap * NR;
    const float* tw = weights + tap * NR;
    for (int v = 0; v < kVecs; ++v) {
      const int64_t c = c0 + 16 * v;
      // A rigid tap reads one pixel with weight exactly 1 (or the zero row): skip the multiply.
      const f32x16 image = NI == 1 ? load16(tr[0] + c) : blend_values<NI, f32x16>(tw, [&](int k) {
        return load16(tr[k] + c);
      });
      const f32x16 kernel =
          blend_values<4, f32x16>(tw + NI, [&](int k) { return load16(tr[NI + k] + c); });
      acc[v] += tap_product(image, kernel);
    }
  }
  std::memcpy(out + c0, acc, sizeof acc);
}

// Any type: kBlock channels whose accumulators the compiler vectorises (bf16, f16, float64 and
// the float remainder with kBlock = 1).
template <int64_t kBlock, int NI, int NR, typename T, typename F>
inline void forward_channels(const T* const* rows, const F* weights, int64_t taps,
                             int64_t c0, T* out) {
  F acc[kBlock] = {};
  for (int64_t tap = 0; tap < taps; ++tap) {
    const T* const* tr = rows + tap * NR;
    const F* tw = weights + tap * NR;
    for (int64_t c = 0; c < kBlock; ++c) {
      acc[c] += tap_product(blend<NI>(tw, tr, c0 + c), blend<4>(tw + NI, tr + NI, c0 + c));
    }
  }
  for (int64_t c = 0; c < kBlock; ++c) out[c0 + c] = narrow<T>(acc[c]);
}

template <bool kDeform, typename T>
void forward_row_one_group(const Problem& p, const Operands<T>& A, const T* zero_row, int64_t n,
                           int64_t i, std::vector<const T*>& rows,
                           std::vector<acc_t<T>>& weights) {
  constexpr int NI = kDeform ? 4 : 1;
  constexpr int NR = NI + 4;  // image corners, then kernel corners
  const int64_t C = p.C, taps = p.taps();
  const T* x_n = A.x + n * p.H * p.W * C;
  const T* w_n = A.weight + (p.Nw == 1 ? 0 : n) * p.scope() * C;
  rows.resize(size_t(taps * NR));
  weights.resize(size_t(taps * NR));
  for (int64_t j = 0; j < p.Wo; ++j) {
    const int64_t loc = (n * p.Ho + i) * p.Wo + j;
    const T* rot = A.rotation + loc * taps * 2;
    const T* off = kDeform ? A.offset + loc * taps * 2 : nullptr;
    const T** r = rows.data();
    acc_t<T>* w = weights.data();
    for (int64_t a = 0; a < p.Kh; ++a) {
      for (int64_t b = 0; b < p.Kw; ++b, r += NR, w += NR) {
        const auto img = image_footprint<kDeform>(p, off, i, j, a, b);
        const auto kf = kernel_footprint(p, rot, a, b, 0);
        for (int k = 0; k < NI; ++k) {
          r[k] = img.index[k] >= 0 ? x_n + img.index[k] * C : zero_row;
          w[k] = img.w[k];
        }
        for (int k = 0; k < 4; ++k) {
          r[NI + k] = kf.index[k] >= 0 ? w_n + kf.index[k] * C : zero_row;
          w[NI + k] = kf.w[k];
        }
      }
    }
    T* out = A.out + loc * C;
    int64_t c0 = 0;
    if constexpr (std::is_same<T, float>::value) {
      for (; c0 + 64 <= C; c0 += 64) forward_block<4, NI, NR>(rows.data(), weights.data(), taps, c0, out);
      for (; c0 + 16 <= C; c0 += 16) forward_block<1, NI, NR>(rows.data(), weights.data(), taps, c0, out);
    }
    for (; c0 + 16 <= C; c0 += 16) forward_channels<16, NI, NR>(rows.data(), weights.data(), taps, c0, out);
    for (; c0 < C; ++c0) forward_channels<1, NI, NR>(rows.data(), weights.data(), taps, c0, out);
  }
}

template <typename T>
void store(const acc_t<T>* src, T* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = narrow<T>(src[k]);
}

template <Mode M, bool kDeform, bool kUnitStride, typename T>
void dk_run(ffi::ThreadPool* pool, const Problem& p, const Operands<T>& A) {
  using F = acc_t<T>;
  // T is its own accumulator type (float32, float64): scatter straight into the output.
  constexpr bool kOwnAcc = std::is_same<T, F>::value;
  const int64_t C = p.C, S = p.scope();
  const int64_t workers = thread_budget(pool);
  const std::vector<T> zero_row(size_t(std::max<int64_t>(C, 1)), narrow<T>(0.f));
  auto make_scratch = [&]() {
    RowScratch<F> s;
    s.acc.assign(size_t(C), F(0));
    s.sink.assign(size_t(C), F(0));
    return s;
  };

  constexpr Mode L = loop_of(M);
  if (L == Mode::kGradImage || L == Mode::kColsGradImage) {
    // Image gradients scatter: split by sample so no two threads write the same element.
    const int64_t image = p.H * p.W * C;
    std::vector<F> tmp;
    F* gx = reinterpret_cast<F*>(A.out);
    if (!kOwnAcc) {
      tmp.assign(size_t(p.N * image), F(0));
      gx = tmp.data();
    } else {
      std::fill(gx, gx + p.N * image, F(0));
    }
    parallel_for(pool, workers, p.N, [&](int64_t n) {
      RowScratch s = make_scratch();
      s.grad_image = gx + n * image;
      for (int64_t i = 0; i < p.Ho; ++i) dk_row<M, kDeform, kUnitStride>(p, A, zero_row.data(), n, i, s);
    });
    if (!kOwnAcc) store(gx, A.out, p.N * image);
    return;
  }

  if (L == Mode::kGradWeight) {
    // Weight gradients reduce over every location: each chunk sums its rows in F, folds
    // each row into double totals, and the totals are reduced once at the end.
    const bool shared = p.Nw == 1;
    const int64_t n_chunks = shared ? std::min<int64_t>(workers, p.N * p.Ho) : p.N;
    std::vector<double> totals(size_t(std::max<int64_t>(n_chunks, 1) * S * C), 0.0);
    parallel_for(pool, workers, n_chunks, [&](int64_t chunk) {
      RowScratch s = make_scratch();
      std::vector<F> row(size_t(S * C));
      s.grad_weight = row.data();
      double* total = totals.data() + chunk * S * C;
      auto [r0, r1] = shared ? chunk_range(p.N * p.Ho, n_chunks, chunk)
                             : std::pair<int64_t, int64_t>{chunk * p.Ho, (chunk + 1) * p.Ho};
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(row.begin(), row.end(), F(0));
        dk_row<M, kDeform, kUnitStride>(p, A, zero_row.data(), r / p.Ho, r % p.Ho, s);
        for (int64_t k = 0; k < S * C; ++k) total[k] += row[k];
      }
    });
    if (shared) {
      for (int64_t chunk = 1; chunk < n_chunks; ++chunk) {
        for (int64_t k = 0; k < S * C; ++k) totals[k] += totals[chunk * S * C + k];
      }
      for (int64_t k = 0; k < S * C; ++k) A.out[k] = narrow<T>(F(totals[k]));
    } else {
      for (int64_t k = 0; k < p.N * S * C; ++k) A.out[k] = narrow<T>(F(totals[k]));
    }
    return;
  }

  // Everything else writes each output element from exactly one row: split rows.
  const int64_t rows = p.N * p.Ho;
  const int64_t n_chunks = std::min<int64_t>(rows, workers * 4);
  parallel_for(pool, workers, n_chunks, [&](int64_t chunk) {
    RowScratch s = make_scratch();
    std::vector<F> cols(writes_cols(M) ? size_t(S * C) : 0);
    s.grad_weight = cols.data();
    std::vector<const T*> tap_rows;
    std::vector<F> tap_weights;
    auto [r0, r1] = chunk_range(rows, n_chunks, chunk);
    for (int64_t r = r0; r < r1; ++r) {
      if (M == Mode::kForward && kUnitStride) {
        forward_row_one_group<kDeform>(p, A, zero_row.data(), r / p.Ho, r % p.Ho, tap_rows,
                                       tap_weights);
      } else {
        dk_row<M, kDeform, kUnitStride>(p, A, zero_row.data(), r / p.Ho, r % p.Ho, s);
      }
    }
  });
}

template <Mode M, bool kDeform>
ffi::Error dk_handler(ffi::ThreadPool pool, ffi::RemainingArgs args,
                      ffi::Result<ffi::AnyBuffer> out, ffi::Span<const int64_t> geometry) {
  DkCall call;
  if (auto err = read_dk_call(M, kDeform, args, *out, geometry, &call); err.failure()) return err;
  return dispatch_float(call.dtype, [&](auto tag) {
    using T = decltype(tag);
    const Operands<T> A = call.typed<T>();
    if (call.p.G == 1) {
      dk_run<M, kDeform, true, T>(&pool, call.p, A);
    } else {
      dk_run<M, kDeform, false, T>(&pool, call.p, A);
    }
    return ffi::Error::Success();
  });
}

// ------------------------------------------------------------------------------------------
// nd_linear_sample: data (Nb, *S, C), coord (Nb, M, D).

enum class NdMode { kForward, kGradData, kJvpCoord, kGradCoord };

template <NdMode M, typename T>
ffi::Error nd_run(ffi::ThreadPool* pool, const NdProblem& p, const T* lhs, const T* coord,
                  const T* tangent, T* out) {
  // lhs is data (forward, JVP, grad coord: gout is `tangent` there) or gout (grad data).
  using F = acc_t<T>;
  const int64_t C = p.C, V = p.spatial(), D = p.dims;
  const int64_t workers = thread_budget(pool);
  const int64_t points = p.Nb * p.M;
  if (M == NdMode::kGradData) {
    // Scatter into data: split by (batch, channel block) so writes never collide.
    std::vector<F> tmp;
    F* gd = reinterpret_cast<F*>(out);
    if (!std::is_same<T, F>::value) {
      tmp.assign(size_t(p.Nb * V * C), F(0));
      gd = tmp.data();
    } else {
      std::fill(gd, gd + p.Nb * V * C, F(0));
    }
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(C / 16, (workers + p.Nb - 1) / std::max<int64_t>(p.Nb, 1)));
    parallel_for(pool, workers, p.Nb * blocks, [&](int64_t chunk) {
      const int64_t nb = chunk / blocks;
      auto [c0, c1] = chunk_range(C, blocks, chunk % blocks);
      F* g = gd + nb * V * C;
      for (int64_t m = 0; m < p.M; ++m) {
        const int64_t point = nb * p.M + m;
        const auto f = nd_point_footprint(p, coord, point);
        const T* go = lhs + point * C;
        for (int k = 0; k < nd_corner_count(f); ++k) {
          const int64_t idx = nd_corner_index(f, k, p.shape);
          if (idx < 0) continue;
          const F w = nd_corner_weight(f, k, -1);
          F* row = g + idx * C;
          for (int64_t c = c0; c < c1; ++c) row[c] += w * widen(go[c]);
        }
      }
    });
    if (!std::is_same<T, F>::value) store(gd, out, p.Nb * V * C);
    return ffi::Error::Success();
  }
  const int64_t n_chunks = std::min<int64_t>(points, workers * 4);
  parallel_for(pool, workers, n_chunks, [&](int64_t chunk) {
    std::vector<F> acc(size_t(std::max<int64_t>(C, 1)));
    auto [q0, q1] = chunk_range(points, n_chunks, chunk);
    for (int64_t point = q0; point < q1; ++point) {
      const int64_t nb = point / p.M;
      const auto f = nd_point_footprint(p, coord, point);
      const T* data = lhs + nb * V * C;
      if (M == NdMode::kGradCoord) {
        const T* go = tangent + point * C;
        for (int64_t e = 0; e < D; ++e) {
          F s = F(0);
          for (int k = 0; k < nd_corner_count(f); ++k) {
            const int64_t idx = nd_corner_index(f, k, p.shape);
            if (idx < 0) continue;
            const F w = nd_corner_weight(f, k, int(e));
            const T* row = data + idx * C;
            for (int64_t c = 0; c < C; ++c) s += widen(go[c]) * w * widen(row[c]);
          }
          out[point * D + e] = narrow<T>(s);
        }
        continue;
      }
      std::fill(acc.begin(), acc.end(), F(0));
      for (int k = 0; k < nd_corner_count(f); ++k) {
        const int64_t idx = nd_corner_index(f, k, p.shape);
        if (idx < 0) continue;
        F w = F(0);
        if (M == NdMode::kForward) {
          w = nd_corner_weight(f, k, -1);
        } else {
          for (int64_t e = 0; e < D; ++e) {
            w += nd_corner_weight(f, k, int(e)) * widen(tangent[point * D + e]);
          }
        }
        const T* row = data + idx * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += w * widen(row[c]);
      }
      store(acc.data(), out + point * C, C);
    }
  });
  return ffi::Error::Success();
}

template <NdMode M>
ffi::Error nd_handler(ffi::ThreadPool pool, ffi::RemainingArgs args,
                      ffi::Result<ffi::AnyBuffer> out) {
  // Operands: forward (data, coord); grad data (gout, coord); JVP (data, coord, dcoord);
  // grad coord (gout, data, coord).
  const size_t expected = (M == NdMode::kForward || M == NdMode::kGradData) ? 2 : 3;
  if (args.size() != expected) return invalid("wrong number of operands");
  std::vector<ffi::AnyBuffer> b;
  for (size_t k = 0; k < expected; ++k) {
    auto buf = args.get<ffi::AnyBuffer>(k);
    if (buf.has_error()) return buf.error();
    if (buf->element_type() != out->element_type()) return invalid("operands must share one dtype");
    b.push_back(*buf);
  }
  NdProblem p;
  const ffi::AnyBuffer& data_like = M == NdMode::kGradData ? *out : (M == NdMode::kGradCoord ? b[1] : b[0]);
  const ffi::AnyBuffer& coord = M == NdMode::kGradCoord ? b[2] : b[1];
  if (auto err = read_nd_problem(data_like, coord, &p); err.failure()) return err;
  return dispatch_float(out->element_type(), [&](auto tag) {
    using T = decltype(tag);
    auto ptr = [](const ffi::AnyBuffer& x) { return static_cast<const T*>(x.untyped_data()); };
    T* o = static_cast<T*>(out->untyped_data());
    switch (M) {
      case NdMode::kForward:
      case NdMode::kGradData:
        return nd_run<M, T>(&pool, p, ptr(b[0]), ptr(b[1]), nullptr, o);
      case NdMode::kJvpCoord:
        return nd_run<M, T>(&pool, p, ptr(b[0]), ptr(b[1]), ptr(b[2]), o);
      case NdMode::kGradCoord:
        return nd_run<M, T>(&pool, p, ptr(b[1]), ptr(b[2]), ptr(b[0]), o);
    }
    return invalid("unknown mode");
  });
}

}  // namespace
}  // namespace dk

namespace ffi = xla::ffi;

DK_TARGETS(DK_DECLARE_CPU)

#define DK_CPU_HANDLER(name, mode, deform)                                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (dk::dk_handler<dk::Mode::mode, deform>),            \
                                ffi::Ffi::Bind()                                           \
                                    .Ctx<ffi::ThreadPool>()                                \
                                    .RemainingArgs()                                       \
                                    .Ret<ffi::AnyBuffer>()                                 \
                                    .Attr<ffi::Span<const int64_t>>("geometry"));

DK_CPU_HANDLER(dk_sample_forward_cpu, kForward, false)
DK_CPU_HANDLER(dk_sample_grad_image_cpu, kGradImage, false)
DK_CPU_HANDLER(dk_sample_grad_weight_cpu, kGradWeight, false)
DK_CPU_HANDLER(dk_sample_jvp_rotation_cpu, kJvpRotation, false)
DK_CPU_HANDLER(dk_sample_grad_rotation_cpu, kGradRotation, false)
DK_CPU_HANDLER(dk_deform_forward_cpu, kForward, true)
DK_CPU_HANDLER(dk_deform_grad_image_cpu, kGradImage, true)
DK_CPU_HANDLER(dk_deform_grad_weight_cpu, kGradWeight, true)
DK_CPU_HANDLER(dk_deform_jvp_rotation_cpu, kJvpRotation, true)
DK_CPU_HANDLER(dk_deform_grad_rotation_cpu, kGradRotation, true)
DK_CPU_HANDLER(dk_deform_jvp_offset_cpu, kJvpOffset, true)
DK_CPU_HANDLER(dk_deform_grad_offset_cpu, kGradOffset, true)
DK_CPU_HANDLER(dk_sample_jvp_rotation_grad_image_cpu, kJvpRotationGradImage, false)
DK_CPU_HANDLER(dk_sample_jvp_rotation_grad_weight_cpu, kJvpRotationGradWeight, false)
DK_CPU_HANDLER(dk_sample_hvp_rotation_cpu, kHvpRotation, false)
DK_CPU_HANDLER(dk_sample_hvp_rotation_grad_image_cpu, kHvpRotationGradImage, false)
DK_CPU_HANDLER(dk_sample_hvp_rotation_grad_weight_cpu, kHvpRotationGradWeight, false)
DK_CPU_HANDLER(dk_sample_grad_cross_rotation_cpu, kGradCrossRotation, false)
DK_CPU_HANDLER(dk_deform_jvp_rotation_grad_image_cpu, kJvpRotationGradImage, true)
DK_CPU_HANDLER(dk_deform_jvp_rotation_grad_weight_cpu, kJvpRotationGradWeight, true)
DK_CPU_HANDLER(dk_deform_hvp_rotation_cpu, kHvpRotation, true)
DK_CPU_HANDLER(dk_deform_hvp_rotation_grad_image_cpu, kHvpRotationGradImage, true)
DK_CPU_HANDLER(dk_deform_hvp_rotation_grad_weight_cpu, kHvpRotationGradWeight, true)
DK_CPU_HANDLER(dk_deform_grad_cross_rotation_cpu, kGradCrossRotation, true)
DK_CPU_HANDLER(dk_sample_cols_forward_cpu, kCols, false)
DK_CPU_HANDLER(dk_sample_cols_grad_image_cpu, kColsGradImage, false)
DK_CPU_HANDLER(dk_sample_cols_jvp_rotation_cpu, kColsJvpRotation, false)
DK_CPU_HANDLER(dk_sample_cols_grad_rotation_cpu, kColsGradRotation, false)
DK_CPU_HANDLER(dk_deform_cols_forward_cpu, kCols, true)
DK_CPU_HANDLER(dk_deform_cols_grad_image_cpu, kColsGradImage, true)
DK_CPU_HANDLER(dk_deform_cols_jvp_rotation_cpu, kColsJvpRotation, true)
DK_CPU_HANDLER(dk_deform_cols_grad_rotation_cpu, kColsGradRotation, true)
DK_CPU_HANDLER(dk_deform_cols_jvp_offset_cpu, kColsJvpOffset, true)
DK_CPU_HANDLER(dk_deform_cols_grad_offset_cpu, kColsGradOffset, true)
DK_CPU_HANDLER(dk_sample_cols_jvp_rotation_grad_image_cpu, kColsJvpRotationGradImage, false)
DK_CPU_HANDLER(dk_sample_cols_hvp_rotation_cpu, kColsHvpRotation, false)
DK_CPU_HANDLER(dk_sample_cols_hvp_rotation_grad_image_cpu, kColsHvpRotationGradImage, false)
DK_CPU_HANDLER(dk_sample_cols_grad_cross_rotation_cpu, kColsGradCrossRotation, false)
DK_CPU_HANDLER(dk_deform_cols_jvp_rotation_grad_image_cpu, kColsJvpRotationGradImage, true)
DK_CPU_HANDLER(dk_deform_cols_hvp_rotation_cpu, kColsHvpRotation, true)
DK_CPU_HANDLER(dk_deform_cols_hvp_rotation_grad_image_cpu, kColsHvpRotationGradImage, true)
DK_CPU_HANDLER(dk_deform_cols_grad_cross_rotation_cpu, kColsGradCrossRotation, true)

#define DK_ND_CPU_HANDLER(name, mode)                                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                               \
      name, (dk::nd_handler<dk::NdMode::mode>),                                                \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().Ret<ffi::AnyBuffer>());

DK_ND_CPU_HANDLER(dk_nd_forward_cpu, kForward)
DK_ND_CPU_HANDLER(dk_nd_grad_data_cpu, kGradData)
DK_ND_CPU_HANDLER(dk_nd_jvp_coord_cpu, kJvpCoord)
DK_ND_CPU_HANDLER(dk_nd_grad_coord_cpu, kGradCoord)
