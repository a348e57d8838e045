// The per-element arithmetic of dk-jax, written once and called by both the CPU loops
// (dk_cpu.cc) and the CUDA kernels (dk_cuda.cu). Everything that decides a number lives here:
// where a tap samples, the bilinear / multilinear weights and their derivatives, and how a
// footprint blends values. The loops around it only decide who computes which element.
//
// Conventions (SPEC.md section 3): a read at real position (u, v) of an R x Q plane is zero when
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
// or -1 when that corner is outside, with its weight and the weight's derivatives in u and v.
struct Footprint {
  int64_t index[4];
  float w[4];
  float dwdu[4];
  float dwdv[4];
};

DK_HD Footprint empty_footprint() {
  Footprint f;
  for (int k = 0; k < 4; ++k) {
    f.index[k] = -1;
    f.w[k] = 0.f;
    f.dwdu[k] = 0.f;
    f.dwdv[k] = 0.f;
  }
  return f;
}

DK_HD bool is_nan(float v) { return v != v; }

// Bilinear footprint of position (u, v) on an R x Q plane.
DK_HD Footprint bilinear_footprint(float u, float v, int64_t R, int64_t Q) {
  Footprint f = empty_footprint();
  if (is_nan(u) || is_nan(v)) {
    // Corner 0 reads element 0 with a NaN weight: the result is NaN, the read stays in range.
    const float nan = u + v;
    f.index[0] = (R > 0 && Q > 0) ? 0 : -1;
    f.w[0] = nan;
    f.dwdu[0] = nan;
    f.dwdv[0] = nan;
    return f;
  }
  if (u <= -1.f || v <= -1.f || u >= float(R) || v >= float(Q)) return f;
  const float fy = floorf(u), fx = floorf(v);
  const int64_t y0 = int64_t(fy), x0 = int64_t(fx);
  const float ly = u - fy, lx = v - fx;
  const float hy = 1.f - ly, hx = 1.f - lx;
  const bool row0 = y0 >= 0, row1 = y0 + 1 < R;
  const bool col0 = x0 >= 0, col1 = x0 + 1 < Q;
  // Corner order: (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1).
  const bool in[4] = {row0 && col0, row0 && col1, row1 && col0, row1 && col1};
  const int64_t idx[4] = {y0 * Q + x0, y0 * Q + x0 + 1, (y0 + 1) * Q + x0, (y0 + 1) * Q + x0 + 1};
  const float w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const float dwdu[4] = {-hx, -lx, hx, lx};
  const float dwdv[4] = {-hy, hy, -ly, ly};
  for (int k = 0; k < 4; ++k) {
    if (!in[k]) continue;
    f.index[k] = idx[k];
    f.w[k] = w[k];
    f.dwdu[k] = dwdu[k];
    f.dwdv[k] = dwdv[k];
  }
  return f;
}

// Footprint of an integer position: a single corner of weight one (rigid image taps).
DK_HD Footprint point_footprint(int64_t y, int64_t x, int64_t R, int64_t Q) {
  Footprint f = empty_footprint();
  if (y >= 0 && y < R && x >= 0 && x < Q) {
    f.index[0] = y * Q + x;
    f.w[0] = 1.f;
  }
  return f;
}

// Real position in the scope of kernel tap `a` (of K) shifted by `r`, the kernel centred in S.
DK_HD float scope_position(int64_t a, float r, int64_t K, int64_t S) {
  return float(a) + r + 0.5f * float(S - K);
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
DK_HD Footprint kernel_footprint(const Problem& p, const T* rot, int64_t a, int64_t b, int64_t g) {
  const int64_t r = ((g * p.Kh + a) * p.Kw + b) * 2;
  return bilinear_footprint(scope_position(a, to_float(rot[r]), p.Kh, p.Sh),
                            scope_position(b, to_float(rot[r + 1]), p.Kw, p.Sw), p.Sh, p.Sw);
}

// Footprint on the image plane of tap (a, b) at output (i, j): a single point for rigid taps,
// a bilinear read shifted by offset[(a*Kw + b)*2 + t] for deformable ones.
template <bool kDeform, typename T>
DK_HD Footprint image_footprint(const Problem& p, const T* off, int64_t i, int64_t j, int64_t a,
                                int64_t b) {
  const int64_t hp = image_position(i, a, p.sh, p.ph, p.dh);
  const int64_t wp = image_position(j, b, p.sw, p.pw, p.dw);
  if (!kDeform) return point_footprint(hp, wp, p.H, p.W);
  const int64_t tap = a * p.Kw + b;
  return bilinear_footprint(float(hp) + to_float(off[2 * tap]),
                            float(wp) + to_float(off[2 * tap + 1]), p.H, p.W);
}

// Blend of the NC corners of a footprint given each corner's value: sum_k weight[k] * value(k).
// V is float, or on the CPU a vector of channels. Four corners are summed as two pairs, which
// halves the dependent chain of multiply-adds.
template <int NC, typename V, typename Value>
DK_HD V blend_values(const float* weight, const Value& value) {
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
template <int NC, typename T>
DK_HD float blend(const float* weight, const T* const* rows, int64_t c) {
  return blend_values<NC, float>(weight, [&](int k) { return to_float(rows[k][c]); });
}

// Pieces of the gradients, one element each. y = sum_taps image * kernel, so:
//   dy/d(image tap) = kernel, dy/d(kernel tap) = image,
//   dy/d(rotation_t) = image * d(kernel)/d(pos_t), dy/d(offset_t) = kernel * d(image)/d(pos_t).
template <typename V>
DK_HD V tap_product(V image, V kernel) {
  return image * kernel;
}
DK_HD float position_tangent(float d_du, float d_dv, float tu, float tv) {
  return d_du * tu + d_dv * tv;
}

// ---------------------------------------------------------------------------------------------
// Multilinear footprints in D dimensions (nd_linear_sample). Corners are enumerated by the bits
// of k (bit d set: floor+1 along dimension d); they are computed on the fly, so a footprint is
// D floats and D integers whatever 2^D is.
constexpr int kMaxDims = 6;

struct NdFootprint {
  int dims;
  int state;  // 0: inside, 1: outside (all zero), 2: NaN position
  int64_t base[kMaxDims];
  float frac[kMaxDims];
};

DK_HD NdFootprint nd_footprint(const float* pos, const int64_t* shape, int dims) {
  NdFootprint f;
  f.dims = dims;
  f.state = 0;
  for (int d = 0; d < dims; ++d) {
    f.base[d] = 0;
    f.frac[d] = 0.f;
    if (is_nan(pos[d])) f.state = 2;
  }
  if (f.state == 2) return f;
  for (int d = 0; d < dims; ++d) {
    if (pos[d] <= -1.f || pos[d] >= float(shape[d])) {
      f.state = 1;
      return f;
    }
  }
  for (int d = 0; d < dims; ++d) {
    const float fl = floorf(pos[d]);
    f.base[d] = int64_t(fl);
    f.frac[d] = pos[d] - fl;
  }
  return f;
}

// Flat index (over the spatial dims, row-major) of corner k, or -1 when it is outside.
// Corners to visit: none outside, one (element 0, NaN weight) for a NaN position, else 2^D.
DK_HD int nd_corner_count(const NdFootprint& f) {
  return f.state == 1 ? 0 : f.state == 2 ? 1 : 1 << f.dims;
}

DK_HD int64_t nd_corner_index(const NdFootprint& f, int k, const int64_t* shape) {
  if (f.state == 2) return 0;
  int64_t idx = 0;
  for (int d = 0; d < f.dims; ++d) {
    const int64_t i = f.base[d] + ((k >> d) & 1);
    if (i < 0 || i >= shape[d]) return -1;
    idx = idx * shape[d] + i;
  }
  return idx;
}

// Weight of corner k, and its derivative along dimension e (e < 0: the weight itself).
DK_HD float nd_corner_weight(const NdFootprint& f, int k, int e) {
  if (f.state == 2) return bits_float(0x7fc00000u);
  float w = 1.f;
  for (int d = 0; d < f.dims; ++d) {
    const bool hi = (k >> d) & 1;
    if (d == e) {
      w *= hi ? 1.f : -1.f;
    } else {
      w *= hi ? f.frac[d] : 1.f - f.frac[d];
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
DK_HD NdFootprint nd_point_footprint(const NdProblem& p, const T* coord, int64_t point) {
  float pos[kMaxDims];
  for (int d = 0; d < p.dims; ++d) pos[d] = to_float(coord[point * p.dims + d]);
  return nd_footprint(pos, p.shape, p.dims);
}

}  // namespace dk
