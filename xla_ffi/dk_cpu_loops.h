// The CPU loops, compiled once per instruction set. Not a self-standing header: each
// dk_cpu_<isa>.cc includes dk_cpu_kernels.h (standard library, FFI and maths, compiled for the
// baseline), then switches the compiler to its instruction set and includes this file inside
// its own namespace (dk::avx512, dk::avx2, dk::baseline), with
//   DK_CPU_ISA_NAME      the build's name ("avx2"),
//   DK_CPU_VECTOR_BYTES  the width of the machine's vector registers in that set (64, 32, 16).
// Nothing outside that namespace is compiled for the instruction set, so the library's shared
// code (and the standard library's) runs on any CPU of the architecture; dk_cpu.cc calls into a
// build only after checking that the CPU has its instructions.
//
// The arithmetic comes from dk_math.h; this file only decides how the work is split: output rows
// (or samples, where outputs would collide) over the threads of XLA's intra-op pool, and
// channels innermost, contiguous in NHWC, in vectors of the machine's width.

// ------------------------------------------------------------------------------------------
// The channel-vector layer: vectors as wide as the instruction set's registers, never wider.

template <typename F>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(DK_CPU_VECTOR_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(DK_CPU_VECTOR_BYTES)));
};
template <typename F>
using Vec = typename VecOf<F>::type;
template <typename F>
constexpr int64_t kLanes = DK_CPU_VECTOR_BYTES / int64_t(sizeof(F));

// 32-bit words as wide as a float vector (bfloat16 bit manipulation).
typedef uint32_t Word __attribute__((vector_size(DK_CPU_VECTOR_BYTES)));

// Lanes of channels c .. c + kLanes - 1 of a row, widened to the accumulator type.
inline Vec<float> load_vec(const float* p) {
  Vec<float> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline Vec<double> load_vec(const double* p) {
  Vec<double> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline Vec<float> load_vec(const bf16* p) {
  // bfloat16 is the high half of a float32: widen the 16-bit lanes and shift.
  typedef uint16_t Half __attribute__((vector_size(DK_CPU_VECTOR_BYTES / 2)));
  Half h;
  std::memcpy(&h, p, sizeof h);
  const Word w = __builtin_convertvector(h, Word) << 16;
  Vec<float> v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
inline Vec<float> load_vec(const f16* p) {
  float lanes[kLanes<float>];
  for (int64_t k = 0; k < kLanes<float>; ++k) lanes[k] = widen(p[k]);
  Vec<float> v;
  std::memcpy(&v, lanes, sizeof v);
  return v;
}

// The bits of narrow<bf16>(v) in the high half of each word (the low half is garbage).
inline Word bf16_high_halves(const Vec<float>& v) {
  Word u;
  std::memcpy(&u, &v, sizeof u);
  const Word nan = (u & 0x7fffffffu) > 0x7f800000u;
  const Word rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return (nan & (u | 0x400000u)) | (~nan & rounded);
}

// Lanes back to T, rounded as narrow<T> rounds one value.
template <typename T>
inline void store_vec(T* p, const Vec<acc_t<T>>& v) {
  if constexpr (std::is_same<T, acc_t<T>>::value) {
    std::memcpy(p, &v, sizeof v);
  } else if constexpr (std::is_same<T, bf16>::value) {
    typedef uint16_t Half __attribute__((vector_size(DK_CPU_VECTOR_BYTES / 2)));
    const Half h = __builtin_convertvector(bf16_high_halves(v) >> 16, Half);
    std::memcpy(p, &h, sizeof h);
  } else {
    for (int64_t k = 0; k < kLanes<acc_t<T>>; ++k) p[k] = narrow<T>(v[k]);
  }
}

// blend() on a vector of channels c .. c + kLanes - 1.
template <int NC, typename T, typename F>
inline Vec<F> blend_vec(const F* weight, const T* const* rows, int64_t c) {
  return blend_values<NC, Vec<F>>(weight, [&](int k) { return load_vec(rows[k] + c); });
}

template <typename F>
inline F sum_lanes(const Vec<F>& v) {
  F s = F(0);
  for (int64_t k = 0; k < kLanes<F>; ++k) s += v[k];
  return s;
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
// kOneGroup: a single rotation group (G = 1), so channels are swept with unit stride.
template <Mode M, bool kDeform, bool kOneGroup, typename T>
void dk_row(const Problem& p, const Operands<T>& A, const T* zero_row, int64_t n, int64_t i,
            RowScratch<acc_t<T>>& s) {
  using F = acc_t<T>;
  constexpr int NI = kDeform ? 4 : 1;  // corners of an image read
  constexpr bool kCols = is_cols(M);
  // The loop this mode runs; second-order modes run a first-order loop with other kernel
  // weights (kernel_order).
  constexpr Mode L = loop_of(M);
  constexpr bool kScatterKernel = L == Mode::kGradWeight || writes_cols(M);
  const int64_t C = p.C, G = kOneGroup ? 1 : p.G, taps = p.taps();
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
    auto cot_vec = [&](int64_t c) { return kCols ? Vec<F>{} + F(1) : load_vec(gy + c); };
    const T* tan = nullptr;
    if (takes_tangent(M)) tan = A.tangent + loc * tangent_stride(M, G, taps);
    if constexpr (L == Mode::kForward || M == Mode::kJvpRotation || M == Mode::kJvpOffset) {
      std::fill(acc, acc + C, F(0));
    }
    if constexpr (writes_cols(M)) std::fill(s.grad_weight, s.grad_weight + S * C, F(0));

    for (int64_t a = 0; a < p.Kh; ++a) {
      for (int64_t b = 0; b < p.Kw; ++b) {
        const int64_t tap = a * p.Kw + b;
        const auto img = image_footprint<kDeform>(p, off, i, j, a, b);
        const T* xr[4];
        F* gxr[4];
        for (int k = 0; k < NI; ++k) {
          const bool in = img.index[k] >= 0;
          xr[k] = (x_n && in) ? x_n + img.index[k] * C : zero_row;
          gxr[k] = ((L == Mode::kGradImage || L == Mode::kColsGradImage) && scatters_to(img, k))
                       ? s.grad_image + img.index[k] * C
                       : sink;
        }
        F off_t[2] = {F(0), F(0)};
        if constexpr (M == Mode::kJvpOffset || M == Mode::kColsJvpOffset) {
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
            gwr[k] = (kScatterKernel && scatters_to(kf, k)) ? s.grad_weight + kf.index[k] * C : sink;
          }
          const int64_t c0 = kOneGroup ? 0 : g;
          if constexpr (L == Mode::kForward) {
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              acc[c] += tap_product(blend<NI>(img.w, xr, c), blend<4>(kf.w, wr, c));
            }
          } else if constexpr (L == Mode::kGradImage || L == Mode::kColsGradImage) {
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F d = cot(c) * blend<4>(kf.w, wr, c);
              for (int k = 0; k < NI; ++k) gxr[k][c] += img.w[k] * d;
            }
          } else if constexpr (L == Mode::kGradWeight || L == Mode::kCols) {
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F d = cot(c) * blend<NI>(img.w, xr, c);
              for (int k = 0; k < 4; ++k) gwr[k][c] += kf.w[k] * d;
            }
          } else if constexpr (M == Mode::kColsJvpRotation) {
            F dw[4];
            for (int k = 0; k < 4; ++k) {
              dw[k] = position_tangent(kf.dwdu[k], kf.dwdv[k], widen(tan[r]), widen(tan[r + 1]));
            }
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F d = blend<NI>(img.w, xr, c);
              for (int k = 0; k < 4; ++k) gwr[k][c] += dw[k] * d;
            }
          } else if constexpr (M == Mode::kColsJvpOffset) {
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F d = position_tangent(blend<NI>(img.dwdu, xr, c),
                                               blend<NI>(img.dwdv, xr, c), off_t[0], off_t[1]);
              for (int k = 0; k < 4; ++k) gwr[k][c] += kf.w[k] * d;
            }
          } else if constexpr (M == Mode::kJvpRotation) {
            const F tu = widen(tan[r]), tv = widen(tan[r + 1]);
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F dk = position_tangent(blend<4>(kf.dwdu, wr, c),
                                                blend<4>(kf.dwdv, wr, c), tu, tv);
              acc[c] += tap_product(blend<NI>(img.w, xr, c), dk);
            }
          } else if constexpr (M == Mode::kGradRotation || M == Mode::kColsGradRotation) {
            F su = F(0), sv = F(0);
            int64_t c = c0;
            if constexpr (kOneGroup) {
              // Channels reduced in vectors of lanes (one partial sum per lane), then the rest.
              Vec<F> vu = {}, vv = {};
              for (; c + kLanes<F> <= C; c += kLanes<F>) {
                const Vec<F> d = cot_vec(c) * blend_vec<NI>(img.w, xr, c);
                vu += d * blend_vec<4>(kf.dwdu, wr, c);
                vv += d * blend_vec<4>(kf.dwdv, wr, c);
              }
              su = sum_lanes<F>(vu), sv = sum_lanes<F>(vv);
            }
            for (; c < C; c += G) {
              const F d = cot(c) * blend<NI>(img.w, xr, c);
              su += d * blend<4>(kf.dwdu, wr, c);
              sv += d * blend<4>(kf.dwdv, wr, c);
            }
            T* o = A.out + loc * G * taps * 2 + r;
            o[0] = narrow<T>(su);
            o[1] = narrow<T>(sv);
          } else if constexpr (is_grad_cross(M)) {
            F sc = F(0);
            int64_t c = c0;
            if constexpr (kOneGroup) {
              Vec<F> vc = {};
              for (; c + kLanes<F> <= C; c += kLanes<F>) {
                vc += cot_vec(c) * blend_vec<NI>(img.w, xr, c) * blend_vec<4>(kf.duv, wr, c);
              }
              sc = sum_lanes<F>(vc);
            }
            for (; c < C; c += G) {
              sc += cot(c) * blend<NI>(img.w, xr, c) * blend<4>(kf.duv, wr, c);
            }
            A.out[loc * G * taps + r / 2] = narrow<T>(sc);
          } else if constexpr (M == Mode::kJvpOffset) {
#pragma GCC ivdep
            for (int64_t c = c0; c < C; c += G) {
              const F dx = position_tangent(blend<NI>(img.dwdu, xr, c),
                                                blend<NI>(img.dwdv, xr, c), off_t[0], off_t[1]);
              acc[c] += tap_product(dx, blend<4>(kf.w, wr, c));
            }
          } else if constexpr (M == Mode::kGradOffset || M == Mode::kColsGradOffset) {
            F su = F(0), sv = F(0);
            int64_t c = c0;
            if constexpr (kOneGroup) {
              Vec<F> vu = {}, vv = {};
              for (; c + kLanes<F> <= C; c += kLanes<F>) {
                const Vec<F> d = cot_vec(c) * blend_vec<4>(kf.w, wr, c);
                vu += d * blend_vec<NI>(img.dwdu, xr, c);
                vv += d * blend_vec<NI>(img.dwdv, xr, c);
              }
              su = sum_lanes<F>(vu), sv = sum_lanes<F>(vv);
            }
            for (; c < C; c += G) {
              const F d = cot(c) * blend<4>(kf.w, wr, c);
              su += d * blend<NI>(img.dwdu, xr, c);
              sv += d * blend<NI>(img.dwdv, xr, c);
            }
            goff[0] += su;
            goff[1] += sv;
          }
        }
        if constexpr (M == Mode::kGradOffset || M == Mode::kColsGradOffset) {
          T* o = A.out + loc * taps * 2 + 2 * tap;
          o[0] = narrow<T>(goff[0]);
          o[1] = narrow<T>(goff[1]);
        }
      }
    }
    if constexpr (L == Mode::kForward || M == Mode::kJvpRotation || M == Mode::kJvpOffset) {
      T* o = A.out + loc * C;
      for (int64_t c = 0; c < C; ++c) o[c] = narrow<T>(acc[c]);
    }
    if constexpr (writes_cols(M)) {
      T* o = A.out + loc * S * C;
      for (int64_t e = 0; e < S * C; ++e) o[e] = narrow<T>(s.grad_weight[e]);
    }
  }
}

// Forward with one rotation group, the common case. For a run of up to kFootprintRun locations
// of a row, the footprints of every tap are computed at once, one location a vector lane, into a
// table of rows (pointers to the channel rows each corner reads, or to a zero row) and weights:
// entry (tap, corner) of location l at ((tap * NR) + corner) * kFootprintRun + l, where corners
// are the NI image corners then the 4 kernel corners. Then each location's channels are swept in
// blocks of kVecs vectors whose accumulators stay in registers across all taps; the rest of the
// channels go one at a time.
constexpr int64_t kFootprintRun = 16;

template <int kVecs, int NI, int NR, typename T>
inline void forward_block(const T* const* rows, const acc_t<T>* weights, int64_t taps,
                          int64_t c0, T* out) {
  using F = acc_t<T>;
  using V = Vec<F>;
  constexpr int64_t kS = kFootprintRun;
  V acc[kVecs];
  for (int v = 0; v < kVecs; ++v) acc[v] = V{};  // each in a register (`= {}` zeroes memory)
  for (int64_t tap = 0; tap < taps; ++tap) {
    const T* const* tr = rows + tap * NR * kS;
    const F* tw = weights + tap * NR * kS;
    const F kw[4] = {tw[NI * kS], tw[(NI + 1) * kS], tw[(NI + 2) * kS], tw[(NI + 3) * kS]};
    F iw[NI];
    for (int k = 0; k < NI; ++k) iw[k] = tw[k * kS];
    for (int v = 0; v < kVecs; ++v) {
      const int64_t c = c0 + kLanes<F> * v;
      // A rigid tap reads one pixel with weight exactly 1 (or the zero row): skip the multiply.
      const V image = NI == 1 ? load_vec(tr[0] + c) : blend_values<NI, V>(iw, [&](int k) {
        return load_vec(tr[k * kS] + c);
      });
      const V kernel = blend_values<4, V>(kw, [&](int k) { return load_vec(tr[(NI + k) * kS] + c); });
      acc[v] += tap_product(image, kernel);
    }
  }
  for (int v = 0; v < kVecs; ++v) store_vec(out + c0 + kLanes<F> * v, acc[v]);
}

// bfloat16 blocks: a bfloat16 is the high half of a float32, so one load of 2 * kLanes channels
// gives the even channels (each 32-bit word shifted up) and the odd ones (the word's low half
// cleared) as two float vectors, two instructions in all; they are summed apart and interleaved
// back on the store. kPairs pairs of vectors span 2 * kLanes * kPairs channels.
inline void load_bf16_pair(const bf16* p, Vec<float>& even, Vec<float>& odd) {
  Word w;
  std::memcpy(&w, p, sizeof w);
  const Word e = w << 16, o = w & 0xffff0000u;
  std::memcpy(&even, &e, sizeof even);
  std::memcpy(&odd, &o, sizeof odd);
}

template <int kPairs, int NI, int NR>
inline void forward_block_bf16(const bf16* const* rows, const float* weights, int64_t taps,
                               int64_t c0, bf16* out) {
  using V = Vec<float>;
  constexpr int64_t kSpan = 2 * kLanes<float>;
  constexpr int64_t kS = kFootprintRun;
  V even[kPairs], odd[kPairs];
  for (int v = 0; v < kPairs; ++v) even[v] = odd[v] = V{};
  for (int64_t tap = 0; tap < taps; ++tap) {
    const bf16* const* tr = rows + tap * NR * kS;
    const float* tw = weights + tap * NR * kS;
    float w[NR];
    for (int k = 0; k < NR; ++k) w[k] = tw[k * kS];
    for (int v = 0; v < kPairs; ++v) {
      const int64_t c = c0 + kSpan * v;
      V xe[NI], xo[NI], we[4], wo[4];
      for (int k = 0; k < NI; ++k) load_bf16_pair(tr[k * kS] + c, xe[k], xo[k]);
      for (int k = 0; k < 4; ++k) load_bf16_pair(tr[(NI + k) * kS] + c, we[k], wo[k]);
      auto blend_of = [&](const float* bw, const V* rows_v, auto nc) {
        return blend_values<decltype(nc)::value, V>(bw, [&](int k) { return rows_v[k]; });
      };
      const std::integral_constant<int, NI> ni;
      const std::integral_constant<int, 4> four;
      const V ie = NI == 1 ? xe[0] : blend_of(w, xe, ni);
      const V io = NI == 1 ? xo[0] : blend_of(w, xo, ni);
      even[v] += tap_product(ie, blend_of(w + NI, we, four));
      odd[v] += tap_product(io, blend_of(w + NI, wo, four));
    }
  }
  for (int v = 0; v < kPairs; ++v) {
    const Word word = (bf16_high_halves(even[v]) >> 16) | (bf16_high_halves(odd[v]) & 0xffff0000u);
    std::memcpy(out + c0 + kSpan * v, &word, sizeof word);
  }
}

template <int NI, int NR, typename T>
inline void forward_channel(const T* const* rows, const acc_t<T>* weights, int64_t taps,
                            int64_t c, T* out) {
  using F = acc_t<T>;
  constexpr int64_t kS = kFootprintRun;
  F acc = F(0);
  for (int64_t tap = 0; tap < taps; ++tap) {
    const T* r[NR];
    F w[NR];
    for (int k = 0; k < NR; ++k) {
      r[k] = rows[(tap * NR + k) * kS];
      w[k] = weights[(tap * NR + k) * kS];
    }
    acc += tap_product(blend<NI>(w, r, c), blend<4>(w + NI, r + NI, c));
  }
  out[c] = narrow<T>(acc);
}

// Vectors per channel block of the forward: 8 accumulators leave room for the loads and blends
// in the 16 vector registers of AVX2 and SSE2 (32 with AVX-512 and NEON), and amortise the
// reads of a location's tap table over 8 vectors (measured better than 2 or 4 with AVX2 and
// AVX-512).
constexpr int kForwardVecs = 8;

// Scratch of one thread of the forward: the footprint table of a run of locations.
template <typename T>
struct ForwardScratch {
  std::vector<const T*> rows;
  std::vector<acc_t<T>> weights;
};

// The table entries of one corner set of a tap for `count` locations: the bilinear corners
// (bilinear_corners of dk_math.h) of position(l), as rows of `plane` (C channels a row) or the
// zero row. Branch-free, so the compiler runs it over the vector lanes.
template <int kCorners, typename T, typename F, typename Position>
inline void corner_run(int64_t count, const Position& position, int64_t R, int64_t Q,
                       const T* plane, int64_t C, const T* zero_row, const T** __restrict rows,
                       F* __restrict w) {
  for (int64_t l = 0; l < count; ++l) {
    int64_t il[4];
    F wl[4];
    const auto [u, v] = position(l);
    bilinear_corners(u, v, R, Q, il, wl);
    for (int k = 0; k < kCorners; ++k) {
      rows[k * kFootprintRun + l] = il[k] >= 0 ? plane + il[k] * C : zero_row;
      w[k * kFootprintRun + l] = wl[k];
    }
  }
}

template <bool kDeform, typename T>
void forward_row_one_group(const Problem& p, const Operands<T>& A, const T* zero_row, int64_t n,
                           int64_t i, ForwardScratch<T>& s) {
  using F = acc_t<T>;
  constexpr int NI = kDeform ? 4 : 1;
  constexpr int NR = NI + 4;  // image corners, then kernel corners
  constexpr int64_t kLane = kLanes<F>;
  constexpr int64_t kRun = kFootprintRun;
  const int64_t C = p.C, taps = p.taps();
  const T* x_n = A.x + n * p.H * p.W * C;
  const T* w_n = A.weight + (p.Nw == 1 ? 0 : n) * p.scope() * C;
  s.rows.resize(size_t(taps * NR * kRun));
  s.weights.resize(size_t(taps * NR * kRun));
  // Copies of the sizes: the lambdas below must not read them through `p`, which the table's
  // stores could alias as far as the compiler knows.
  const int64_t H = p.H, W = p.W, Kh = p.Kh, Kw = p.Kw, Sh = p.Sh, Sw = p.Sw;
  const int64_t sw = p.sw, pw = p.pw, dw = p.dw, stride = taps * 2;
  for (int64_t j0 = 0; j0 < p.Wo; j0 += kRun) {
    const int64_t count = std::min(kRun, p.Wo - j0);
    const int64_t loc0 = (n * p.Ho + i) * p.Wo + j0;
    for (int64_t a = 0; a < Kh; ++a) {
      const int64_t hp = image_position(i, a, p.sh, p.ph, p.dh);
      for (int64_t b = 0; b < Kw; ++b) {
        const int64_t tap = a * Kw + b;
        const T** rows = s.rows.data() + tap * NR * kRun;
        F* w = s.weights.data() + tap * NR * kRun;
        // The image corners (image_footprint of dk_math.h, over the lanes).
        if constexpr (kDeform) {
          const T* off = A.offset + loc0 * stride + 2 * tap;
          corner_run<4>(count, [=](int64_t l) {
            const int64_t wp = image_position(j0 + l, b, sw, pw, dw);
            return std::pair<F, F>{F(hp) + widen(off[l * stride]),
                                   F(wp) + widen(off[l * stride + 1])};
          }, H, W, x_n, C, zero_row, rows, w);
        } else {
          const bool row_in = hp >= 0 && hp < H;
          for (int64_t l = 0; l < count; ++l) {
            const int64_t wp = image_position(j0 + l, b, sw, pw, dw);
            const bool in = row_in & (wp >= 0) & (wp < W);
            rows[l] = in ? x_n + (hp * W + wp) * C : zero_row;
            w[l] = in ? F(1) : F(0);
          }
        }
        // The kernel corners (kernel_footprint).
        const T* rot = A.rotation + loc0 * stride + 2 * tap;
        corner_run<4>(count, [=](int64_t l) {
          return std::pair<F, F>{scope_position(a, widen(rot[l * stride]), Kh, Sh),
                                 scope_position(b, widen(rot[l * stride + 1]), Kw, Sw)};
        }, Sh, Sw, w_n, C, zero_row, rows + NI * kRun, w + NI * kRun);
      }
    }
    for (int64_t l = 0; l < count; ++l) {
      const T* const* rows = s.rows.data() + l;
      const F* weights = s.weights.data() + l;
      T* out = A.out + (loc0 + l) * C;
      int64_t c0 = 0;
      if constexpr (std::is_same<T, bf16>::value) {
        for (; c0 + kForwardVecs * kLane <= C; c0 += kForwardVecs * kLane) {
          forward_block_bf16<kForwardVecs / 2, NI, NR>(rows, weights, taps, c0, out);
        }
        for (; c0 + 2 * kLane <= C; c0 += 2 * kLane) {
          forward_block_bf16<1, NI, NR>(rows, weights, taps, c0, out);
        }
      }
      for (; c0 + kForwardVecs * kLane <= C; c0 += kForwardVecs * kLane) {
        forward_block<kForwardVecs, NI, NR>(rows, weights, taps, c0, out);
      }
      for (; c0 + kLane <= C; c0 += kLane) {
        forward_block<1, NI, NR>(rows, weights, taps, c0, out);
      }
      for (; c0 < C; ++c0) forward_channel<NI, NR>(rows, weights, taps, c0, out);
    }
  }
}

template <typename T>
void store(const acc_t<T>* src, T* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = narrow<T>(src[k]);
}

template <Mode M, bool kDeform, bool kOneGroup, typename T>
void dk_run(ffi::ThreadPool* pool, const Problem& p, const Operands<T>& A) {
  using F = acc_t<T>;
  // T is its own accumulator type (float32, float64): scatter straight into the output.
  constexpr bool kOwnAcc = std::is_same<T, F>::value;
  const int64_t C = p.C, S = p.scope();
  const int64_t workers = thread_budget(pool);
  // Rows of absent corners point here; the forward's vector loads read up to a vector of it.
  const std::vector<T> zero_row(size_t(std::max<int64_t>(C, 1)), narrow<T>(0.f));
  auto make_scratch = [&]() {
    RowScratch<F> s;
    s.acc.assign(size_t(C), F(0));
    s.sink.assign(size_t(C), F(0));
    return s;
  };

  constexpr Mode L = loop_of(M);
  if constexpr (L == Mode::kGradImage || L == Mode::kColsGradImage) {
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
      for (int64_t i = 0; i < p.Ho; ++i) {
        dk_row<M, kDeform, kOneGroup>(p, A, zero_row.data(), n, i, s);
      }
    });
    if (!kOwnAcc) store(gx, A.out, p.N * image);
    return;
  }

  if constexpr (L == Mode::kGradWeight) {
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
        dk_row<M, kDeform, kOneGroup>(p, A, zero_row.data(), r / p.Ho, r % p.Ho, s);
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
    ForwardScratch<T> forward;
    auto [r0, r1] = chunk_range(rows, n_chunks, chunk);
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (M == Mode::kForward && kOneGroup) {
        forward_row_one_group<kDeform>(p, A, zero_row.data(), r / p.Ho, r % p.Ho, forward);
      } else {
        dk_row<M, kDeform, kOneGroup>(p, A, zero_row.data(), r / p.Ho, r % p.Ho, s);
      }
    }
  });
}

// The kernel of (mode, deformable) for every element type and rotation-group count.
template <Mode M, bool kDeform>
ffi::Error dk_kernel(ffi::ThreadPool* pool, const DkCall& call) {
  return dispatch_float(call.dtype, [&](auto tag) {
    using T = decltype(tag);
    const Operands<T> A = call.typed<T>();
    if (call.p.G == 1) {
      dk_run<M, kDeform, true, T>(pool, call.p, A);
    } else {
      dk_run<M, kDeform, false, T>(pool, call.p, A);
    }
    return ffi::Error::Success();
  });
}

// ------------------------------------------------------------------------------------------
// nd_linear_sample: data (Nb, *S, C), coord (Nb, M, D).

template <NdMode M, typename T>
void nd_run(ffi::ThreadPool* pool, const NdProblem& p, const T* lhs, const T* coord,
            const T* tangent, T* out) {
  using F = acc_t<T>;
  const int64_t C = p.C, V = p.spatial(), D = p.dims;
  const int64_t workers = thread_budget(pool);
  const int64_t points = p.Nb * p.M;
  if constexpr (M == NdMode::kGradData) {
    // Scatter into data: split by (batch, channel block) so writes never collide.
    std::vector<F> tmp;
    F* gd = reinterpret_cast<F*>(out);
    if (!std::is_same<T, F>::value) {
      tmp.assign(size_t(p.Nb * V * C), F(0));
      gd = tmp.data();
    } else {
      std::fill(gd, gd + p.Nb * V * C, F(0));
    }
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>(C / 16, (workers + p.Nb - 1) / std::max<int64_t>(p.Nb, 1)));
    parallel_for(pool, workers, p.Nb * blocks, [&](int64_t chunk) {
      const int64_t nb = chunk / blocks;
      auto [c0, c1] = chunk_range(C, blocks, chunk % blocks);
      F* g = gd + nb * V * C;
      for (int64_t m = 0; m < p.M; ++m) {
        const int64_t point = nb * p.M + m;
        const auto f = nd_point_footprint(p, coord, point);
        if (!nd_scatters(f)) continue;
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
    return;
  }
  const int64_t n_chunks = std::min<int64_t>(points, workers * 4);
  parallel_for(pool, workers, n_chunks, [&](int64_t chunk) {
    std::vector<F> acc(size_t(std::max<int64_t>(C, 1)));
    auto [q0, q1] = chunk_range(points, n_chunks, chunk);
    for (int64_t point = q0; point < q1; ++point) {
      const int64_t nb = point / p.M;
      const auto f = nd_point_footprint(p, coord, point);
      const T* data = lhs + nb * V * C;
      if constexpr (M == NdMode::kGradCoord) {
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
        if constexpr (M == NdMode::kForward) {
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
}

template <NdMode M>
ffi::Error nd_kernel(ffi::ThreadPool* pool, const NdCall& call) {
  return dispatch_float(call.dtype, [&](auto tag) {
    using T = decltype(tag);
    nd_run<M, T>(pool, call.p, static_cast<const T*>(call.lhs), static_cast<const T*>(call.coord),
                 static_cast<const T*>(call.tangent), static_cast<T*>(call.out));
    return ffi::Error::Success();
  });
}

// This build's table of entry points (data only: no code of the instruction set runs to read it).
#define DK_KERNEL_ENTRY_dk(mode, deform) &dk_kernel<Mode::mode, deform>,
#define DK_KERNEL_ENTRY_nd(mode, deform) &nd_kernel<NdMode::mode>,
#define DK_KERNEL_ENTRY(name, family, mode, deform) DK_KERNEL_ENTRY_##family(mode, deform)
constexpr CpuKernels kKernels = {DK_CPU_ISA_NAME, DK_TARGETS(DK_KERNEL_ENTRY)};
#undef DK_KERNEL_ENTRY
