// The per-element arithmetic of dk-jax, written once and called by both the CPU loops
// (dk_cpu.cc) and the CUDA kernels (dk_cuda.cu). Everything that decides a number lives here:
// where a tap samples, the bilinear / multilinear weights and their derivatives, and how a
// footprint blends values. The loops around it only decide who computes which element.
//
// Conventions (docs/OPERATORS.md): a read at real position (u, v) of an R x Q plane is zero when
// u <= -1, v <= -1, u >= R or v >= Q; otherwise the four corners floor / floor+1 are blended and
// a corner outside the plane contributes zero. Derivatives are those of the blend, taking the
// right derivative at integers. +-inf positions fall outside (exact zero); NaN positions give
// NaN weights, so they poison what they touch without ever forming an out-of-range index.
#pragma once

#include <cmath>
#include <cstdint>

#include "dk_types.h"

namespace dk {

// Where the blend reads: up to four corners, each a flat index into the plane (row * Q + col)
// or -1 when that corner is outside, with its weight, the weight's derivatives in u and v and
// its second derivative d2w/du dv. Within a cell the weights are linear in u and in v, so
// d2w/du2 = d2w/dv2 = 0, d2w/du dv = +-1, and every third derivative is zero.
// F is the accumulator type (float, or double for float64 inputs).
template <typename F>
struct Footprint {
  int64_t index[4];
  F w[4];
  F dwdu[4];
  F dwdv[4];
  F duv[4];
  bool nan;  // the position is NaN: corner 0 reads element 0 with NaN weights, nothing else
};

template <typename F>
DK_HD Footprint<F> empty_footprint() {
  Footprint<F> f;
  for (int k = 0; k < 4; ++k) {
    f.index[k] = -1;
    f.w[k] = F(0);
    f.dwdu[k] = F(0);
    f.dwdv[k] = F(0);
    f.duv[k] = F(0);
  }
  f.nan = false;
  return f;
}

template <typename F>
DK_HD bool is_nan(F v) {
  return v != v;
}

DK_HD float floor_of(float v) { return floorf(v); }
DK_HD double floor_of(double v) { return floor(v); }

// Bilinear footprint of position (u, v) on an R x Q plane.
template <typename F>
DK_HD Footprint<F> bilinear_footprint(F u, F v, int64_t R, int64_t Q) {
  Footprint<F> f = empty_footprint<F>();
  if (is_nan(u) || is_nan(v)) {
    // Corner 0 reads element 0 with a NaN weight: the result is NaN, the read stays in range.
    const F nan = u + v;
    f.index[0] = (R > 0 && Q > 0) ? 0 : -1;
    f.w[0] = nan;
    f.dwdu[0] = nan;
    f.dwdv[0] = nan;
    f.duv[0] = nan;
    f.nan = true;
    return f;
  }
  if (u <= F(-1) || v <= F(-1) || u >= F(R) || v >= F(Q)) return f;
  const F fy = floor_of(u), fx = floor_of(v);
  const int64_t y0 = int64_t(fy), x0 = int64_t(fx);
  const F ly = u - fy, lx = v - fx;
  const F hy = F(1) - ly, hx = F(1) - lx;
  const bool row0 = y0 >= 0, row1 = y0 + 1 < R;
  const bool col0 = x0 >= 0, col1 = x0 + 1 < Q;
  // Corner order: (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1).
  const bool in[4] = {row0 && col0, row0 && col1, row1 && col0, row1 && col1};
  const int64_t idx[4] = {y0 * Q + x0, y0 * Q + x0 + 1, (y0 + 1) * Q + x0, (y0 + 1) * Q + x0 + 1};
  const F w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const F dwdu[4] = {-hx, -lx, hx, lx};
  const F dwdv[4] = {-hy, hy, -ly, ly};
  const F duv[4] = {F(1), F(-1), F(-1), F(1)};
  // Selects, not branches: whether a corner is inside depends on the data (a kernel tap near
  // the scope's edge), and mispredicted branches here cost the CPU loops more than the blend.
  for (int k = 0; k < 4; ++k) {
    f.index[k] = in[k] ? idx[k] : int64_t(-1);
    f.w[k] = in[k] ? w[k] : F(0);
    f.dwdu[k] = in[k] ? dwdu[k] : F(0);
    f.dwdv[k] = in[k] ? dwdv[k] : F(0);
    f.duv[k] = in[k] ? duv[k] : F(0);
  }
  return f;
}

// The corners and weights of bilinear_footprint (its `index` and `w`, the same numbers) without
// a branch, so that a loop over many positions runs lane-parallel on a CPU's vector unit: the
// forward builds the footprints of a run of locations this way. Every select is computed for
// every position; an outside or NaN position is moved to 0 before the floor, so no conversion
// ever sees a value out of the integer range.
template <typename F>
DK_HD void bilinear_corners(F u, F v, int64_t R, int64_t Q, int64_t* index, F* w) {
  // Bitwise & and |, not && and ||: no short-circuit branch in a loop meant for vector lanes.
  const bool nan = is_nan(u) | is_nan(v);
  const bool inside = (u > F(-1)) & (v > F(-1)) & (u < F(R)) & (v < F(Q));  // false for NaN
  // Clamped (NaN to -2): a position the conversions below can take, the same when inside.
  const F u2 = u > F(-2) ? u : F(-2), v2 = v > F(-2) ? v : F(-2);
  const F uc = u2 < F(R) ? u2 : F(R), vc = v2 < F(Q) ? v2 : F(Q);
  const F fy = floor_of(uc), fx = floor_of(vc);
  const int64_t y0 = int64_t(int32_t(fy)), x0 = int64_t(int32_t(fx));
  const F ly = uc - fy, lx = vc - fx;
  const F hy = F(1) - ly, hx = F(1) - lx;
  const bool row0 = inside & (y0 >= 0), row1 = inside & (y0 + 1 < R);
  const bool col0 = x0 >= 0, col1 = x0 + 1 < Q;
  const bool in[4] = {bool(row0 & col0), bool(row0 & col1), bool(row1 & col0), bool(row1 & col1)};
  const int64_t idx[4] = {y0 * Q + x0, y0 * Q + x0 + 1, (y0 + 1) * Q + x0, (y0 + 1) * Q + x0 + 1};
  const F wk[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  for (int k = 0; k < 4; ++k) {
    index[k] = in[k] ? idx[k] : int64_t(-1);
    w[k] = in[k] ? wk[k] : F(0);
  }
  // A NaN position: corner 0 reads element 0 with a NaN weight, as in bilinear_footprint.
  const int64_t nan_index = (R > 0) & (Q > 0) ? int64_t(0) : int64_t(-1);
  index[0] = nan ? nan_index : index[0];
  w[0] = nan ? u + v : w[0];
}

// Whether a gradient scattered through corner k lands in the plane: the corner lies in it and
// the position is a number. A NaN position's read of element 0 makes its result NaN, but
// nothing flows back through it into the plane (as in the reference, which masks the read).
template <typename F>
DK_HD bool scatters_to(const Footprint<F>& f, int k) {
  return f.index[k] >= 0 && !f.nan;
}

// Footprint of an integer position: a single corner of weight one (rigid image taps).
template <typename F>
DK_HD Footprint<F> point_footprint(int64_t y, int64_t x, int64_t R, int64_t Q) {
  Footprint<F> f = empty_footprint<F>();
  if (y >= 0 && y < R && x >= 0 && x < Q) {
    f.index[0] = y * Q + x;
    f.w[0] = F(1);
  }
  return f;
}

// Real position in the scope of kernel tap `a` (of K) shifted by `r`, the kernel centred in S.
template <typename F>
DK_HD F scope_position(int64_t a, F r, int64_t K, int64_t S) {
  return F(a) + r + F(0.5) * F(S - K);
}

// Integer image position of output index i, tap a: i * stride - pad + a * dilation.
DK_HD int64_t image_position(int64_t i, int64_t a, int64_t stride, int64_t pad, int64_t dil) {
  return i * stride - pad + a * dil;
}

// Sizes of one depthwise problem. Weight may be shared (Nw = 1) or per sample (Nw = N).
struct Problem {
  int64_t N, H, W, C;
  int64_t Ho, Wo;
  int64_t Kh, Kw, Sh, Sw;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t G, Nw;
  DK_HD int64_t taps() const { return Kh * Kw; }
  DK_HD int64_t scope() const { return Sh * Sw; }
};

// Footprint on the scope of kernel tap (a, b) for rotation group g, at a location whose
// rotations start at `rot` (index ((g*Kh + a)*Kw + b)*2 + t).
template <typename T>
DK_HD Footprint<acc_t<T>> kernel_footprint(const Problem& p, const T* rot, int64_t a, int64_t b,
                                           int64_t g) {
  const int64_t r = ((g * p.Kh + a) * p.Kw + b) * 2;
  return bilinear_footprint(scope_position(a, widen(rot[r]), p.Kh, p.Sh),
                            scope_position(b, widen(rot[r + 1]), p.Kw, p.Sw), p.Sh, p.Sw);
}

// Footprint on the image plane of tap (a, b) at output (i, j): a single point for rigid taps,
// a bilinear read shifted by offset[(a*Kw + b)*2 + t] for deformable ones.
template <bool kDeform, typename T>
DK_HD Footprint<acc_t<T>> image_footprint(const Problem& p, const T* off, int64_t i, int64_t j,
                                          int64_t a, int64_t b) {
  using F = acc_t<T>;
  const int64_t hp = image_position(i, a, p.sh, p.ph, p.dh);
  const int64_t wp = image_position(j, b, p.sw, p.pw, p.dw);
  if (!kDeform) return point_footprint<F>(hp, wp, p.H, p.W);
  const int64_t tap = a * p.Kw + b;
  return bilinear_footprint<F>(F(hp) + widen(off[2 * tap]), F(wp) + widen(off[2 * tap + 1]), p.H,
                               p.W);
}

// Blend of the NC corners of a footprint given each corner's value: sum_k weight[k] * value(k).
// V is float, or on the CPU a vector of channels. Four corners are summed as two pairs, which
// halves the dependent chain of multiply-adds.
template <int NC, typename V, typename F, typename Value>
DK_HD V blend_values(const F* weight, const Value& value) {
  if constexpr (NC == 4) {
    return (weight[0] * value(0) + weight[1] * value(1)) +
           (weight[2] * value(2) + weight[3] * value(3));
  } else {
    V acc = weight[0] * value(0);
    for (int k = 1; k < NC; ++k) acc += weight[k] * value(k);
    return acc;
  }
}

// Blend of channel c of the NC corners of a footprint over rows of channel values. Rows of
// absent corners point at a zero row and carry weight 0.
template <int NC, typename T, typename F>
DK_HD F blend(const F* weight, const T* const* rows, int64_t c) {
  return blend_values<NC, F>(weight, [&](int k) { return F(widen(rows[k][c])); });
}

// Pieces of the gradients, one element each. y = sum_taps image * kernel, so:
//   dy/d(image tap) = kernel, dy/d(kernel tap) = image,
//   dy/d(rotation_t) = image * d(kernel)/d(pos_t), dy/d(offset_t) = kernel * d(image)/d(pos_t).
template <typename V>
DK_HD V tap_product(V image, V kernel) {
  return image * kernel;
}
template <typename F>
DK_HD F position_tangent(F d_du, F d_dv, F tu, F tv) {
  return d_du * tu + d_dv * tv;
}

// ---------------------------------------------------------------------------------------------
// Multilinear footprints in D dimensions (nd_linear_sample). Corners are enumerated by the bits
// of k (bit d set: floor+1 along dimension d); they are computed on the fly, so a footprint is
// D floats and D integers whatever 2^D is.
constexpr int kMaxDims = 6;

template <typename F>
struct NdFootprint {
  int dims;
  int state;  // 0: inside, 1: outside (all zero), 2: NaN position
  int64_t base[kMaxDims];
  F frac[kMaxDims];
};

template <typename F>
DK_HD NdFootprint<F> nd_footprint(const F* pos, const int64_t* shape, int dims) {
  NdFootprint<F> f;
  f.dims = dims;
  f.state = 0;
  for (int d = 0; d < dims; ++d) {
    f.base[d] = 0;
    f.frac[d] = F(0);
    if (is_nan(pos[d])) f.state = 2;
  }
  for (int d = 0; d < dims; ++d) {
    // An empty dimension has nothing to read, not even element 0 for a NaN position.
    if (shape[d] == 0) f.state = 1;
  }
  if (f.state != 0) return f;
  for (int d = 0; d < dims; ++d) {
    if (pos[d] <= F(-1) || pos[d] >= F(shape[d])) {
      f.state = 1;
      return f;
    }
  }
  for (int d = 0; d < dims; ++d) {
    const F fl = floor_of(pos[d]);
    f.base[d] = int64_t(fl);
    f.frac[d] = pos[d] - fl;
  }
  return f;
}

// Flat index (over the spatial dims, row-major) of corner k, or -1 when it is outside.
// Corners to visit: none outside, one (element 0, NaN weight) for a NaN position, else 2^D.
template <typename F>
DK_HD int nd_corner_count(const NdFootprint<F>& f) {
  return f.state == 1 ? 0 : f.state == 2 ? 1 : 1 << f.dims;
}

template <typename F>
DK_HD int64_t nd_corner_index(const NdFootprint<F>& f, int k, const int64_t* shape) {
  if (f.state == 2) return 0;
  int64_t idx = 0;
  for (int d = 0; d < f.dims; ++d) {
    const int64_t i = f.base[d] + ((k >> d) & 1);
    if (i < 0 || i >= shape[d]) return -1;
    idx = idx * shape[d] + i;
  }
  return idx;
}

// Whether gradients scattered through the corners land in the data: not for a NaN position,
// whose read of element 0 only makes its result NaN (as scatters_to for bilinear footprints).
template <typename F>
DK_HD bool nd_scatters(const NdFootprint<F>& f) {
  return f.state != 2;
}

// Weight of corner k, and its derivative along dimension e (e < 0: the weight itself).
template <typename F>
DK_HD F nd_corner_weight(const NdFootprint<F>& f, int k, int e) {
  if (f.state == 2) return F(bits_float(0x7fc00000u));
  F w = F(1);
  for (int d = 0; d < f.dims; ++d) {
    const bool hi = (k >> d) & 1;
    if (d == e) {
      w *= hi ? F(1) : F(-1);
    } else {
      w *= hi ? f.frac[d] : F(1) - f.frac[d];
    }
  }
  return w;
}

// nd_linear_sample: data (Nb, *S, C), coord (Nb, M, D).
struct NdProblem {
  int64_t Nb, M, C;
  int dims;
  int64_t shape[8];
  DK_HD int64_t spatial() const {
    int64_t s = 1;
    for (int d = 0; d < dims; ++d) s *= shape[d];
    return s;
  }
};

// Footprint of point `point` (of Nb*M) whose D coordinates start at coord + point * D.
template <typename T>
DK_HD NdFootprint<acc_t<T>> nd_point_footprint(const NdProblem& p, const T* coord, int64_t point) {
  acc_t<T> pos[kMaxDims];
  for (int d = 0; d < p.dims; ++d) pos[d] = widen(coord[point * p.dims + d]);
  return nd_footprint(pos, p.shape, p.dims);
}

}  // namespace dk
